"""Monitors and the interventions that act on their flags: the other way to use a clean/hack pair set.

A monitor scores each live rollout and flags it (`probe`: a linear classifier on the policy's activations, trained on
the pairs only; `gt_labels`: the grader's own hack label, flipped at a set accuracy, a reference that READS LABELS).
An intervention acts on the flags through the reward or the advantage (`penalty`, `screening`). Routers never score
a live rollout; these arms do. Imports numpy and torch only: verl_gq/verl/trainer.py wires them into verl.
"""

from verl_gq.monitor.config import INTERVENTIONS, MONITORS, MonitorSpec
from verl_gq.monitor.interventions import grpo_advantage, monitored_advantage
from verl_gq.monitor.labels import GroundTruthLabelMonitor, sample_keys
from verl_gq.monitor.probe import LinearProbe, ProbeMonitor, fit_probe, flag_quality


def build_monitor(spec: MonitorSpec, pairs, seed: int):
    """The monitor of a spec: ProbeMonitor (on `pairs`, token-id pairs) or GroundTruthLabelMonitor."""
    if spec.kind == "probe":
        return ProbeMonitor(spec, pairs, seed)
    return GroundTruthLabelMonitor(spec.accuracy, seed)


__all__ = [
    "INTERVENTIONS", "MONITORS", "GroundTruthLabelMonitor", "LinearProbe", "MonitorSpec", "ProbeMonitor",
    "build_monitor", "fit_probe",
    "flag_quality", "grpo_advantage", "monitored_advantage", "sample_keys",
]
