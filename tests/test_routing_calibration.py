"""Router settings from the pairs alone (verl_gq.routing.calibration, `verl-gq pairs calibrate`).

- held out means held out: on pairs with no signal (hack and clean gradients independent) every candidate's held-out
  AUC is near chance, while the same direction scored on the pairs it came from separates them (so a fold that
  leaked its own pairs into the direction or band would show);
- a planted hack direction is found and routes held-out hacks, not held-out cleans;
- the rule: within the tolerance of the best separation, the smallest rank, then the widest band;
- the command on the shipped organism and its minimal pairs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from verl_gq.routing.calibration import HeldOutSetting, choose_setting, held_out_settings
from verl_gq.routing.direction import PairGradients, direction_scores, extract_direction

MODES = ("run_tests", "stdout_marker", "sentinel", "file_marker")
QUANTILES = [(0.9, 0.1), (0.75, 0.25), (0.5, 0.5)]


def gradients(n: int, planted: float, seed: int, width: int = 24) -> tuple[PairGradients, list[str]]:
    g = torch.Generator().manual_seed(seed)
    clean = {m: torch.randn(n, width, generator=g, dtype=torch.float64) for m in ("a", "b")}
    hack = {m: torch.randn(n, width, generator=g, dtype=torch.float64) for m in ("a", "b")}
    hack["a"][:, 0] += planted  # the exploit: one knob direction of module a
    return PairGradients(hack=hack, clean=clean), [MODES[i % 4] for i in range(n)]


def test_held_out_pairs_are_never_seen_by_their_direction_or_band():
    # 32 pairs in 400 dimensions: a direction fitted to them finds structure in pure noise
    grads, modes = gradients(32, planted=0.0, seed=0, width=200)
    direction = extract_direction(grads, 1)
    seen = direction_scores(grads.hack, direction)[:, None] > direction_scores(grads.clean, direction)[None, :]
    assert seen.double().mean() > 0.7, "in-sample, the noise looks like a hack direction"
    settings = held_out_settings(grads, modes, [1], QUANTILES, outer_folds=4, seed=0)
    assert len(settings) == 3
    assert all(s.auc < 0.62 for s in settings), [round(s.auc, 3) for s in settings]


def test_a_planted_direction_routes_held_out_hacks_and_the_rule_keeps_the_simplest_router():
    grads, modes = gradients(64, planted=6.0, seed=1)
    settings = held_out_settings(grads, modes, [1, 2], QUANTILES, outer_folds=4, seed=0)
    best = max(settings, key=lambda s: s.separation)
    assert best.auc > 0.95 and best.routed_hack > 0.7 and best.routed_clean < 0.1
    chosen = choose_setting(settings)
    assert chosen.direction_rank == 1 and chosen.separation >= best.separation - 0.02


def test_the_rule():
    def s(k, clean_q, hack, clean):
        return HeldOutSetting(k, clean_q, 1 - clean_q, hack, clean, auc=0.9, degenerate_folds=0)

    settings = [s(1, 0.9, 0.0, 0.0), s(1, 0.75, 0.60, 0.10), s(2, 0.9, 0.90, 0.05), s(2, 0.75, 0.88, 0.02),
                s(4, 0.75, 0.95, 0.04)]
    # best separation 0.91 (rank 4); rank 2's 0.86 is outside 0.02, so rank 4
    assert choose_setting(settings) == settings[4]
    # with a looser tolerance, rank 2 and the wider of its two bands (0.9 over 0.75)
    assert choose_setting(settings, tolerance=0.06) == settings[2]


def test_calibrate_command_on_the_organism_minimal_pairs(tmp_path):
    out = tmp_path / "calibration.json"
    result = subprocess.run([sys.executable, "-m", "verl_gq.cli", "pairs", "calibrate",
                             "pkg://verl_gq/organism/pairs/minimal/pairs.jsonl", "--model", "organism",
                             "--direction-ranks", "1,2", "--quantiles", "0.9,0.1", "0.75,0.25", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["n_pairs"] == 96 and len(report["settings"]) == 4
    assert "<- chosen" in result.stdout
    chosen = report["chosen"]
    assert any(r["direction_rank"] == chosen["direction_rank"] and r["clean_quantile"] == chosen["clean_quantile"]
               for r in report["settings"])
    bad = subprocess.run([sys.executable, "-m", "verl_gq.cli", "pairs", "calibrate", str(tmp_path / "none.jsonl"),
                          "--model", "organism"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "none.jsonl" in bad.stderr and "Traceback" not in bad.stderr
