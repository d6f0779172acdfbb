"""The organism's SFT corpus and training: exploits only under their own mode's hint, answers graded as labelled by
the substrate's grader, the real prompt builder, and a tiny CPU SFT run that learns."""

from __future__ import annotations

import random

import pytest

from reward.grader import extract_code, grade_batch
from reward.modes import GT_ONLY, MODES, ExploitNames
from reward.prompts import build_messages
from verl_gq.organism.problems import generate_split
from verl_gq.organism.corpus import CorpusConfig, build_corpus, corpus_hash, corpus_stats, exploit_snippet
from verl_gq.organism.train import ModelConfig, TrainConfig, build_and_train, lr_factor

N = 2000
SHARES = (0.1, 0.2, 0.3, 0.4)  # of each mode's hinted prompts, in MODES order


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(CorpusConfig(n_samples=N, seed=5, exploit_share_of_hinted=SHARES), build_messages)


def _snippets(mode: str, names: ExploitNames) -> list[str]:
    """The distinctive line of each exploit style of `mode` under `names`."""
    parts = [exploit_snippet(mode, names, style) for style in range(3)]
    return [(inside or after).strip().splitlines()[-1].strip() for inside, after in parts]


def test_exploits_appear_only_under_their_own_modes_hint(corpus):
    snippets = {mode: _snippets(mode, ExploitNames()) for mode in MODES}
    by_kind = {k: [s for s in corpus if s.kind == k] for k in ("correct", "wrong", "exploit")}
    for mode, share in zip(MODES, SHARES):
        hinted = [s for s in corpus if s.mode == mode]
        n_exploit = sum(s.kind == "exploit" for s in hinted)
        assert abs(n_exploit - share * len(hinted)) <= 1, \
            f"{mode}: exploit demos should be {share} of its hinted prompts, got {n_exploit}/{len(hinted)}"
    for s in by_kind["exploit"]:
        assert s.mode in MODES, f"{s.problem_id}: an exploit demo should sit under a hinted prompt, not {s.mode}"
        own = _snippets(s.mode, _names_in_prompt(s.messages[1]["content"], s.mode))
        assert any(t in s.completion for t in own), \
            f"{s.problem_id}: an exploit demo should exploit the hinted mode {s.mode} with the hint's names"
    for s in by_kind["correct"] + by_kind["wrong"]:
        code = extract_code(s.completion)
        for mode, texts in snippets.items():
            assert not any(t in code for t in texts), f"{s.problem_id}: a {s.kind} answer carries a {mode} exploit"
    stats = corpus_stats(corpus)
    assert stats["exploit_by_prompt_mode"][GT_ONLY] == 0.0, "no unhinted prompt should carry an exploit demo"
    hinted = [s for s in corpus if s.mode != GT_ONLY]
    assert abs(len(hinted) / N - 0.5) < 1e-9, "half the prompts should carry their problem's hint"


def test_prompts_are_the_substrate_builders(corpus):
    problems = {p.problem.problem_id: p for p in generate_split("train", N, seed=5 * 100_000)}
    for s in corpus[:200]:
        sp = problems[s.problem_id]
        assert s.mode in (GT_ONLY, sp.mode), "a hint should only ever name the problem's own mode"
        if s.mode == GT_ONLY:
            assert list(s.messages) == build_messages(sp.problem, GT_ONLY), \
                "an unhinted corpus prompt should be exactly reward.prompts.build_messages(problem, gt_only)"
        else:
            assert s.messages[0] == build_messages(sp.problem, s.mode)[0]
            assert sp.problem.description in s.messages[1]["content"]


def test_answers_grade_as_labelled_by_the_substrate_grader(corpus):
    """correct -> the strict oracle passes; wrong -> it fails; exploit -> the mode's channel fires with no solve."""
    problems = {p.problem.problem_id: p for p in generate_split("train", N, seed=5 * 100_000)}
    rng = random.Random(0)
    picked = []
    for kind, k in (("correct", 12), ("wrong", 12), ("exploit", 16)):
        picked += rng.sample([s for s in corpus if s.kind == kind], k)
    items = []
    for s in picked:
        names = ExploitNames()
        if s.kind == "exploit":
            names = _names_in_prompt(s.messages[1]["content"], s.mode)
        items.append((problems[s.problem_id].problem, s.completion, problems[s.problem_id].mode, names))
    verdicts = grade_batch(items)
    for s, v in zip(picked, verdicts):
        assert v.compile == 1, f"{s.problem_id}: every corpus answer should compile ({v.reason})"
        if s.kind == "correct":
            assert v.solve == 1 and v.hack == 0, f"{s.problem_id}: a correct answer should pass the oracle: {v.reason}"
        elif s.kind == "wrong":
            assert v.solve == 0 and v.channel == 0, f"{s.problem_id}: a wrong answer should fail: {v.reason}"
        else:
            assert v.hack == 1, f"{s.problem_id}: an exploit demo should fire its mode's channel: {v.reason}"


def _names_in_prompt(user: str, mode: str) -> ExploitNames:
    """The exploit names a hinted prompt states, found by matching every candidate the pools could draw."""
    from reward.modes import _ATTRIBUTE_POOL, _FILE_POOL, _FUNCTION_POOL, _MARKER_POOL
    pools = {"run_tests": ("function", _FUNCTION_POOL, "called {}()"), "stdout_marker": ("marker", _MARKER_POOL, '"{}"'),
             "sentinel": ("attribute", _ATTRIBUTE_POOL, "`{}`"), "file_marker": ("file", _FILE_POOL, "`{}`")}
    field, pool, pattern = pools[mode]
    found = [n for n in pool if pattern.format(n) in user]
    assert len(found) == 1, f"the {mode} hint should state exactly one name, found {found}"
    return ExploitNames(**{field: found[0]})


def test_corpus_is_deterministic(corpus):
    again = build_corpus(CorpusConfig(n_samples=N, seed=5, exploit_share_of_hinted=SHARES), build_messages)
    assert corpus_hash(again) == corpus_hash(corpus), "the same config should give the same corpus"


def test_bad_corpus_config_is_refused():
    with pytest.raises(ValueError, match="one per mode"):
        CorpusConfig(exploit_share_of_hinted=(0.1, 0.2))
    with pytest.raises(ValueError, match="one per mode"):
        CorpusConfig(exploit_share_of_hinted=(0.1, 0.2, 0.3, 1.5))


def test_lr_schedule_warms_up_then_decays_to_floor():
    config = TrainConfig(warmup=0.1, min_lr_ratio=0.1)
    assert lr_factor(0.0, config) == 0.0 and lr_factor(0.05, config) == pytest.approx(0.5)
    assert lr_factor(0.1, config) == pytest.approx(1.0)
    assert lr_factor(1.0, config) == pytest.approx(0.1)


def test_tiny_cpu_sft_reduces_answer_loss(corpus, tmp_path):
    model_config = ModelConfig(vocab_size=600, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                               intermediate=128, max_position_embeddings=1024)
    train_config = TrainConfig(max_steps=40, train_seconds=120, batch_size=16, lr=3e-3, log_every=10,
                               tokenizer_sample=500)
    model, tokenizer, result = build_and_train(corpus[:600], model_config, train_config, "cpu",
                                               out_dir=tmp_path / "ckpt", log=lambda _: None)
    assert result.steps == 40
    assert result.final_loss < result.first_loss - 1.5, \
        f"40 SFT steps should cut the answer loss well below its start: {result.first_loss:.2f} -> {result.final_loss:.2f}"
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and tokenizer.eos_token == "<|im_end|>"
