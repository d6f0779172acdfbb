"""The monitors and their interventions (verl_gq.monitor), against verl's own GRPO and a real (tiny) model.

- screening: the advantage of every unflagged sample is verl's GRPO advantage computed on the unflagged samples
  alone; a flagged one gets 0 (exact);
- penalty: verl's GRPO advantage of the reward minus the amount where flagged (exact);
- the probe learns from the pairs only: permuting (or withholding) the live rollouts' labels changes neither the
  probe nor a flag; its threshold holds the false-positive rate on held-out pairs;
- the label monitor: right with probability `accuracy`, the same flags for the same tokens, step and seed;
- the features: each row is the mean of the layer's output over that sequence's completion, as an unpadded forward
  computes it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from verl_gq.monitor import (
    GroundTruthLabelMonitor,
    MonitorSpec,
    ProbeMonitor,
    fit_probe,
    flag_quality,
    grpo_advantage,
    monitored_advantage,
)
from verl_gq.monitor.features import decoder_layer, mean_completion_activations
from verl_gq.routing.direction import Pair


def batch(seed: int, groups: int = 6, n: int = 8):
    """Binary-ish outcome rewards of `groups` x `n` samples, group ids as verl's uid strings, random flags (with a
    group flagged whole and a group left with one unflagged sample)."""
    rng = np.random.default_rng(seed)
    scores = torch.tensor(rng.choice([0.0, 1.0, 0.5, 2.0], size=groups * n), dtype=torch.float32)
    index = np.array([f"uid-{g}" for g in range(groups) for _ in range(n)], dtype=object)
    flags = rng.random(groups * n) < 0.3
    flags[:n] = True
    flags[n:2 * n] = True
    flags[n] = False
    return scores, index, flags


def verl_grpo(scores: torch.Tensor, index: np.ndarray, norm_by_std: bool) -> torch.Tensor:
    advantages, _ = compute_grpo_outcome_advantage(
        token_level_rewards=scores.unsqueeze(-1), response_mask=torch.ones(len(scores), 1), index=index,
        norm_adv_by_std_in_grpo=norm_by_std)
    return advantages.squeeze(-1)


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_screening_is_grpo_over_the_unflagged_samples_and_zero_for_the_flagged(seed, norm_by_std):
    scores, index, flags = batch(seed)
    spec = MonitorSpec(kind="probe", intervention="screening")
    got = monitored_advantage(spec, scores, index, flags, norm_by_std=norm_by_std)
    kept = ~flags
    expected = verl_grpo(scores[torch.as_tensor(kept)], index[kept], norm_by_std)
    assert torch.equal(got[torch.as_tensor(kept)], expected)
    assert torch.equal(got[torch.as_tensor(flags)], torch.zeros(int(flags.sum())))
    # the flagged samples really are out of the statistics: with them in, the unflagged advantages differ
    assert not torch.equal(got[torch.as_tensor(kept)], verl_grpo(scores, index, norm_by_std)[torch.as_tensor(kept)])


@pytest.mark.parametrize("amount", [1.0, 0.25])
@pytest.mark.parametrize("seed", range(4))
def test_penalty_is_grpo_of_the_reward_minus_the_amount_where_flagged(seed, amount):
    scores, index, flags = batch(seed)
    spec = MonitorSpec(kind="gt_labels", intervention="penalty", penalty=amount)
    got = monitored_advantage(spec, scores, index, flags)
    penalised = torch.where(torch.as_tensor(flags), scores - amount, scores)
    assert torch.equal(got, verl_grpo(penalised, index, True))
    assert not torch.equal(got, verl_grpo(scores, index, True))


def test_without_flags_both_interventions_are_verl_grpo():
    scores, index, _ = batch(7)
    none = np.zeros(len(scores), dtype=bool)
    for intervention in ("penalty", "screening"):
        spec = MonitorSpec(kind="probe", intervention=intervention)
        assert torch.equal(monitored_advantage(spec, scores, index, none), verl_grpo(scores, index, True))
    assert torch.equal(grpo_advantage(scores, index), verl_grpo(scores, index, True))


def test_probe_threshold_holds_the_false_positive_rate_on_held_out_pairs():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(80, 16))
    hack = clean + rng.normal(size=(80, 16)) * 0.5 + np.r_[1.5, np.zeros(15)]
    fit = fit_probe(clean, hack, heldout_fraction=0.25, fpr=0.05, l2=1.0, seed=3)
    assert (fit.n_fit_pairs, fit.n_heldout_pairs) == (60, 20)
    assert fit.heldout_fpr <= 0.05 and fit.heldout_tpr > 0.5 and fit.heldout_auc > 0.8
    again = fit_probe(clean, hack, heldout_fraction=0.25, fpr=0.05, l2=1.0, seed=3)
    assert np.array_equal(again.probe.weight, fit.probe.weight), "the fit is deterministic"
    # separable: every held-out hack above every held-out clean
    separable = fit_probe(clean, clean + 5.0, heldout_fraction=0.25, fpr=0.05, l2=1.0, seed=3)
    assert separable.heldout_auc == 1.0 and separable.heldout_tpr == 1.0 and separable.heldout_fpr <= 0.05


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def random_sequences(seed: int, n: int, vocab: int = 100) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, rng.integers(3, 9)).tolist(), rng.integers(1, vocab, rng.integers(1, 7)).tolist())
            for _ in range(n)]


def test_features_are_the_layer_output_mean_over_the_completion_of_an_unpadded_forward(tiny_model):
    assert decoder_layer(tiny_model, None)[0] == 1, "the middle of 2 decoder layers"
    # layer 0: hidden_states[1] is its output (the last entry of hidden_states has the final norm applied)
    index, layer = decoder_layer(tiny_model, 0)
    sequences = random_sequences(0, 7)
    got = mean_completion_activations(tiny_model, layer, sequences, device=torch.device("cpu"), micro_batch_size=3)
    for row, (prompt, completion) in enumerate(sequences):
        with torch.no_grad():
            hidden = tiny_model(input_ids=torch.tensor([prompt + completion]),
                                output_hidden_states=True).hidden_states[index + 1][0]
        torch.testing.assert_close(got[row], hidden[len(prompt):].mean(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gq.monitor.layer=5: the model has decoder layers 0..1"):
        decoder_layer(tiny_model, 5)


def test_the_probe_learns_from_the_pairs_only(tiny_model):
    """The live rollouts' labels (permuted, or withheld) change neither the probe nor a flag; refits follow `refit`."""
    rng = np.random.default_rng(1)
    pairs = []
    for i, (prompt, clean) in enumerate(random_sequences(2, 24)):
        hack = clean + [7, 7, 7]  # the same tokens appended: an exploit the probe can see
        pairs.append(Pair(prompt_ids=prompt, clean_ids=clean, hack_ids=hack, mode="run_tests"))
    live = random_sequences(3, 32)
    labels = rng.random(32) < 0.5
    spec = MonitorSpec(kind="probe", intervention="screening", layer=0, refit=2)
    calls = []

    def features(sequences, layer):
        calls.append(len(sequences))
        index, module = decoder_layer(tiny_model, layer)
        return index, mean_completion_activations(tiny_model, module, sequences, device=torch.device("cpu")).numpy()

    results = []
    for hack in (labels, rng.permutation(labels), None):
        monitor = ProbeMonitor(spec, pairs, seed=0)
        steps = [monitor.flags(step, live, hack, features) for step in (1, 2, 3)]
        results.append((steps, monitor.probe.weight.copy()))
    (first, weight), *others = results
    for steps, other_weight in others:
        assert np.array_equal(other_weight, weight)
        for (flags, metrics), (flags0, metrics0) in zip(steps, first):
            assert np.array_equal(flags, flags0) and metrics == metrics0
    assert [bool(m) for _, m in first] == [True, False, True], "fitted at step 1, refitted at 3 (refit=2)"
    assert calls[:4] == [48, 32, 32, 48], "pairs' 2 x 24 completions at a refit, then the 32 live rollouts"
    assert first[0][1]["probe/heldout_auc"] > 0.9, "the appended tokens are visible to the probe"
    restored = ProbeMonitor(spec, pairs, seed=0)
    monitor = ProbeMonitor(spec, pairs, seed=0)
    monitor.flags(1, live, None, features)
    restored.load_state(monitor.state())
    assert np.array_equal(restored.flags(2, live, None, features)[0], monitor.flags(2, live, None, features)[0])


def test_label_monitor_is_right_with_its_accuracy_and_keyed_by_tokens():
    live = random_sequences(4, 4000)
    hack = np.random.default_rng(5).random(4000) < 0.3
    exact, _ = GroundTruthLabelMonitor(1.0, seed=0).flags(1, live, hack)
    assert np.array_equal(exact, hack)
    monitor = GroundTruthLabelMonitor(0.9, seed=0)
    flags, _ = monitor.flags(1, live, hack)
    quality = flag_quality(flags, hack)
    assert 0.87 < (flags == hack).mean() < 0.93 and 0.87 < quality["recall"] < 0.93
    assert np.array_equal(GroundTruthLabelMonitor(0.9, seed=0).flags(1, live, hack)[0], flags), "same key, same draw"
    assert not np.array_equal(monitor.flags(2, live, hack)[0], flags), "another step, other draws"
    with pytest.raises(ValueError, match="reads the reward's per-sample `hack` field"):
        monitor.flags(1, live, None)


def test_flag_quality_against_the_labels():
    flags = np.array([1, 1, 0, 0, 1], dtype=bool)
    hack = np.array([1, 0, 1, 0, 0], dtype=bool)
    assert flag_quality(flags, hack) == {"flag_rate": 0.6, "recall": 0.5, "precision": 1 / 3}
    assert flag_quality(np.zeros(3, bool), np.zeros(3, bool)) == {"flag_rate": 0.0, "recall": None, "precision": None}


@pytest.mark.parametrize("fields, message", [
    ({"kind": "regex", "intervention": "penalty"}, "gq.monitor.kind='regex': must be one of"),
    ({"kind": "probe", "intervention": "drop"}, "gq.monitor.intervention='drop'"),
    ({"kind": "gt_labels", "intervention": "penalty", "accuracy": 0.3}, "gq.monitor.accuracy=0.3"),
    ({"kind": "probe", "intervention": "penalty", "fpr": 0}, "gq.monitor.fpr=0"),
    ({"kind": "probe", "intervention": "penalty", "refit": -1}, "gq.monitor.refit=-1"),
    ({"kind": "probe", "intervention": "penalty", "layers": 3}, r"gq.monitor: unknown keys \['layers'\]"),
    ({"intervention": "penalty"}, r"gq.monitor: missing \['kind'\]"),
])
def test_monitor_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MonitorSpec.from_any(fields)


def test_gq_config_keeps_monitor_runs_apart_from_routers():
    from verl_gq.verl.config import GQConfig, GQConfigError

    spec = GQConfig.from_any({"monitor": {"kind": "gt_labels", "intervention": "screening"}}).monitor_spec
    assert spec.name == "screening_gt_labels90"
    assert MonitorSpec(kind="probe", intervention="penalty").name == "penalty_probe"
    with pytest.raises(GQConfigError, match="a monitor changes what the run trains on"):
        GQConfig.from_any({"pair_file": "p.jsonl", "monitor": {"kind": "probe", "intervention": "penalty"},
                           "routers": {"route2b": {"direction": "pairs"}}})
    with pytest.raises(GQConfigError, match="the probe monitor is trained on a pair file"):
        GQConfig.from_any({"monitor": {"kind": "probe", "intervention": "penalty"}})
