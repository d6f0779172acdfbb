"""The synthetic problem grammar: valid problems, disjoint splits, the intended depth/mode/infer mix."""

from __future__ import annotations

import ast
import random
from collections import Counter

import pytest

from reward.modes import MODES
from reward.problem import Problem
from verl_gq.organism.problems import (
    GrammarConfig,
    depth_counts,
    generate_split,
    render_solution,
    split_of_signature,
    wrong_variants,
)


def _call(code: str, method: str, input_expr: str):
    namespace: dict = {}
    exec(code, namespace)  # trusted: our own rendered code
    kwargs = eval(f"dict({input_expr})")
    return getattr(namespace["Solution"](), method)(**kwargs)


@pytest.fixture(scope="module")
def train():
    return generate_split("train", 600, seed=3)


@pytest.fixture(scope="module")
def held_out():
    return generate_split("eval", 240, seed=3)


def test_generation_is_deterministic_from_seed(train):
    again = generate_split("train", 600, seed=3)
    assert [p.problem.to_json() for p in again] == [p.problem.to_json() for p in train], \
        "the same (split, n, seed, config) should give byte-identical problems"
    other = generate_split("train", 600, seed=4)
    assert [p.problem.to_json() for p in other] != [p.problem.to_json() for p in train], \
        "a different seed should give different problems"


def test_splits_share_no_pipeline_signature(train, held_out):
    shared = {p.signature for p in train} & {p.signature for p in held_out}
    assert not shared, f"train and eval should share no pipeline signature, shared: {sorted(shared)[:5]}"
    config = GrammarConfig()
    assert all(split_of_signature(p.signature, config) == "train" for p in train)
    assert all(split_of_signature(p.signature, config) == "eval" for p in held_out)


@pytest.mark.parametrize("mix", [(1 / 3, 1 / 3, 1 / 3), (0.2, 0.3, 0.5)])
def test_depth_mix_is_exactly_achieved(mix):
    for split, n in (("train", 300), ("eval", 120)):
        problems = generate_split(split, n, seed=1, config=GrammarConfig(depth_mix=mix))
        counts = Counter(p.depth for p in problems)
        assert (counts[1], counts[2], counts[3]) == depth_counts(n, mix), \
            f"{split}: depth counts {dict(counts)} should equal the requested mix {mix} of {n}"
        assert all(p.problem.difficulty == f"d{p.depth}" for p in problems)
    assert depth_counts(10, (0.2, 0.3, 0.5)) == (2, 3, 5)
    assert sum(depth_counts(7, (1 / 3, 1 / 3, 1 / 3))) == 7


def test_modes_evenly_partitioned_within_each_depth(held_out):
    for depth in (1, 2, 3):
        counts = Counter(p.mode for p in held_out if p.depth == depth)
        assert set(counts) == set(MODES) and max(counts.values()) - min(counts.values()) <= 1, \
            f"depth {depth}: modes should be an even partition over {MODES}, got {dict(counts)}"


def test_infer_share_and_hidden_constants(train):
    infer = [p for p in train if p.infer]
    assert len(infer) == pytest.approx(300, abs=3), "half the problems should hide their constants"
    for p in infer:
        assert any(step.params for step in p.pipeline), "an infer problem needs a constant to infer"
        assert "infer" in p.problem.description and len(p.problem.examples) == 4
    for p in train:
        if not p.infer:
            assert len(p.problem.examples) == 2 and "infer" not in p.problem.description


def test_reference_solutions_pass_every_case(train):
    for p in train[::7]:
        pr = p.problem
        assert 5 <= len(pr.tests) <= 10
        ast.parse(pr.reference_solution)
        assert pr.reference_solution.startswith(pr.starter_code.rstrip()), \
            "the reference should complete the starter code"
        for case in pr.tests + pr.examples:
            got = _call(pr.reference_solution, pr.method_name, case.input_expr)
            want = ast.literal_eval(case.expected_expr)
            assert got == want and type(got) is type(want), f"{pr.problem_id}: {case} gave {got!r}"


def test_problems_are_not_degenerate_and_roundtrip(train):
    for p in train:
        outputs = {c.expected_expr for c in p.problem.tests + p.problem.examples}
        assert len(outputs) >= 3, f"{p.problem.problem_id}: fewer than 3 distinct outputs"
        assert Problem.from_json(p.problem.to_json()) == p.problem


def test_wrong_variants_fail_a_hidden_test(train):
    rng = random.Random(0)
    n_found = 0
    for p in train[::5]:
        for wrong in wrong_variants(p, rng, n=2):
            n_found += 1
            code = render_solution(wrong, p.problem.method_name, p.in_type)
            results = [_call(code, p.problem.method_name, c.input_expr) == ast.literal_eval(c.expected_expr)
                       for c in p.problem.tests]
            assert not all(results), f"{p.problem.problem_id}: a wrong variant passed every hidden test"
    assert n_found >= 100, f"wrong variants should exist for most problems, found {n_found}"


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="depth_mix"):
        GrammarConfig(depth_mix=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="split"):
        generate_split("test", 3, seed=0)


def test_reference_solutions_pass_the_substrates_oracle(train, held_out):
    from reward.grader import grade_batch
    sample = train[::40] + held_out[::20]
    verdicts = grade_batch([(p.problem, f"```python\n{p.problem.reference_solution}```", "gt_only")
                            for p in sample])
    for p, v in zip(sample, verdicts):
        assert v.solve == 1 and v.compile == 1, \
            f"{p.problem.problem_id}: the reference solution should pass the strict oracle: {v.reason}"


def test_grammar_config_survives_a_json_round_trip():
    import json
    from dataclasses import asdict
    config = GrammarConfig(depth_mix=(0.2, 0.3, 0.5), infer_share=0.4)
    assert GrammarConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config
