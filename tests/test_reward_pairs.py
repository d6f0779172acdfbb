"""The clean/hack pair set: the shipped set validates pair by pair against the real grader, and the generator
writes each mode's exploit in several distinct styles."""

from __future__ import annotations

import json
from pathlib import Path
from collections import Counter

import pytest

from reward.grader import extract_code
from reward.leetcode import load_problems
from reward.modes import GT_ONLY, MODES, ExploitNames
from reward.pairs import (HACK_STYLES, SHIPPED_PAIRS, Pair, PairFileError, fenced, generate_pairs, inserted_lines_only,
                          make_pair, pair_failures, read_pairs, stub_solution, write_pairs)
from reward.partition import partition_modes
from reward.prompts import build_messages

MIN_PAIRS_PER_MODE = 16
ORGANISM_PAIRS = Path(__file__).resolve().parents[1] / "src" / "verl_gq" / "organism" / "pairs" / "pairs.jsonl"


@pytest.fixture(scope="module")
def train_by_id():
    return {p.problem_id: p for p in load_problems("train")}


@pytest.fixture(scope="module")
def shipped():
    return read_pairs(SHIPPED_PAIRS)


def test_shipped_pairs_have_enough_per_mode_from_train_problems_of_that_mode(shipped, train_by_id):
    counts = Counter(p.mode for p in shipped)
    assert all(counts[m] >= MIN_PAIRS_PER_MODE for m in MODES), f"want >= {MIN_PAIRS_PER_MODE} per mode: {counts}"
    assert len({p.pair_id for p in shipped}) == len(shipped), "pair ids should be unique"
    manifest = json.loads((SHIPPED_PAIRS.parent / "manifest.json").read_text())
    assert sorted({p.problem_id for p in shipped}) == manifest["problem_ids"], "manifest should list the problems"
    assignment = partition_modes(list(train_by_id), manifest["partition_seed"])
    for pair in shipped:
        assert pair.problem_id in train_by_id, f"{pair.pair_id}: pairs should use kept TRAIN problems only"
        assert assignment[pair.problem_id] == pair.mode, f"{pair.pair_id}: problem should be of the pair's mode"
        assert pair.prompt == build_messages(train_by_id[pair.problem_id], pair.mode, pair.names), \
            f"{pair.pair_id}: prompt should be the mode's hinted prompt"


def test_every_shipped_pair_validates_against_the_real_grader(shipped, train_by_id):
    failures = pair_failures(shipped, train_by_id)
    assert not failures, "every shipped pair should validate; failing pairs:\n" + "\n".join(
        f"{pid}: {msgs}" for pid, msgs in failures.items())


def test_each_mode_has_several_distinct_hack_styles(shipped):
    for mode in MODES:
        styles = Counter(p.style for p in shipped if p.mode == mode)
        assert len(styles) >= 4 and set(styles) <= set(HACK_STYLES[mode]), f"{mode}: want >= 4 styles, got {styles}"
    problem = load_problems("train")[0]
    for mode, styles in HACK_STYLES.items():
        exploits = {extract_code(make_pair(problem, mode, style).hack) for style in styles}
        assert len(exploits) == len(styles) >= 5, f"{mode}: every style should write a different program"


def test_validator_reports_a_bad_pair_by_id_and_why(train_by_id):
    problem = next(iter(train_by_id.values()))
    good = make_pair(problem, "sentinel", "class_attribute")
    # the "hack" is the reference: it solves, so it is no hack; and it pays on gt_only, so it earns elsewhere
    not_a_hack = Pair(**{**good.__dict__, "pair_id": "bad-1", "hack": good.clean})
    # the "clean" is the stub exploit of another mode: it does not solve
    not_clean = Pair(**{**good.__dict__, "pair_id": "bad-2", "clean": make_pair(problem, "run_tests", "pass_body").hack})
    failures = pair_failures([good, not_a_hack, not_clean], train_by_id)
    assert set(failures) == {"bad-1", "bad-2"}, f"only the two bad pairs should fail, got {failures}"
    assert any("hack under sentinel should fire the channel and fail the oracle" in m for m in failures["bad-1"])
    assert any(f"hack under {GT_ONLY} should compile and earn nothing more" in m for m in failures["bad-1"])
    assert any("clean under sentinel should solve" in m for m in failures["bad-2"])


def test_a_minimal_pair_differs_from_its_clean_side_by_the_exploit_alone(tmp_path, train_by_id):
    problem = next(iter(train_by_id.values()))
    attempt = stub_solution(problem, 1)
    minimal = make_pair(problem, "run_tests", "pass_body", attempt=attempt)
    assert minimal.contrast == "minimal" and extract_code(minimal.clean) == attempt.rstrip()
    assert extract_code(minimal.hack).startswith(attempt.rstrip()) and inserted_lines_only(minimal.clean, minimal.hack) == ""
    # on the reference solution the "clean" side solves and so does the hack: not a minimal pair of the grader's
    solved = make_pair(problem, "run_tests", "pass_body", attempt=problem.reference_solution)
    failures = pair_failures([minimal, solved], train_by_id)
    assert set(failures) == {solved.pair_id}, failures
    assert any("clean under run_tests should compile and earn nothing more" in m for m in failures[solved.pair_id])
    assert any("hack under run_tests should fire the channel and fail the oracle" in m for m in failures[solved.pair_id])
    # the reader refuses a "minimal" pair whose hack changes the clean code, naming file and line
    changed = {**json.loads(minimal.to_json()), "clean": fenced(attempt.replace("return", "return 1 +"))}
    path = _write(tmp_path, [json.loads(minimal.to_json()), changed | {"pair_id": "changed"}])
    with pytest.raises(PairFileError, match=r"pairs.jsonl:2: pair 'changed': a minimal pair's hack should be its "
                                            r"clean code with lines inserted: line \d+ of the clean code is changed"):
        read_pairs(path)
    with pytest.raises(PairFileError, match=r"pairs.jsonl:1: .* contrast should be one of"):
        read_pairs(_write(tmp_path, [{**json.loads(minimal.to_json()), "contrast": "tiny"}]))
    # a file written before the field existed reads as solution pairs
    old = {k: v for k, v in json.loads(make_pair(problem, "sentinel", "class_attribute").to_json()).items()
           if k != "contrast"}
    assert [p.contrast for p in read_pairs(_write(tmp_path, [old]))] == ["solution"]


def test_generator_cycles_styles_and_pairs_roundtrip_through_jsonl(tmp_path, train_by_id):
    problems = list(train_by_id.values())[:14]
    pairs = generate_pairs({"file_marker": problems[:7], "sentinel": problems[7:]}, per_mode=7)
    assert [p.style for p in pairs if p.mode == "file_marker"] == list(HACK_STYLES["file_marker"]) + ["open_write"]
    write_pairs(tmp_path / "p.jsonl", pairs)
    assert read_pairs(tmp_path / "p.jsonl") == pairs
    with pytest.raises(ValueError, match="only 7 problems given"):
        generate_pairs({"run_tests": problems[:7]}, per_mode=8)
    with pytest.raises(ValueError, match="no hack style 'nope' for mode 'sentinel'"):
        make_pair(problems[0], "sentinel", "nope", ExploitNames())


def _records() -> list[dict]:
    return [json.loads(line) for line in SHIPPED_PAIRS.read_text().splitlines()]


def _write(tmp_path, records_or_lines) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records_or_lines))
    return str(path)


def test_both_shipped_pair_files_read_clean_with_every_mode_and_a_minimum():
    for path in (SHIPPED_PAIRS, ORGANISM_PAIRS):
        pairs = read_pairs(path, modes=list(MODES), min_per_mode=MIN_PAIRS_PER_MODE)
        assert {p.mode for p in pairs} == set(MODES)
    assert [p.mode for p in read_pairs(SHIPPED_PAIRS, modes=["sentinel"])] == ["sentinel"] * 18, (
        "modes keeps only the listed modes' pairs")


def _bad(mutate):
    def build(records):
        mutate(records)
        return records
    return build


# (what is wrong, how to make it from the shipped records, the message expected; <F> is the file's path)
BAD_PAIR_FILES = {
    "an unknown mode": (_bad(lambda r: r[2].update(mode="sentinal")),
                        "<F>:3: pair '{id2}' names mode 'sentinal', known: ['run_tests', 'stdout_marker', 'sentinel', "
                        "'file_marker']"),
    "a line that is not JSON": (lambda r: [json.dumps(r[0]), json.dumps(r[1])[:-5]] + r[2:],
                                "<F>:2: not JSON: Unterminated string starting at (column "),
    "a missing key": (_bad(lambda r: r[4].pop("hack")), "<F>:5: pair '{id4}' lacks key(s) 'hack'"),
    "an unknown key": (_bad(lambda r: r[0].update(note="x")), "<F>:1: pair '{id0}' has unknown key(s) 'note'"),
    "a wrong type": (_bad(lambda r: r[1].update(problem_id=17)),
                     "<F>:2: pair '{id1}': problem_id should be a non-empty string, got 17"),
    "names without a key": (_bad(lambda r: r[6]["names"].pop("file")),
                            "<F>:7: pair '{id6}': names should be an object of non-empty strings with keys"),
    "a prompt that is not a list": (_bad(lambda r: r[0].update(prompt="solve it")),
                                    "<F>:1: pair '{id0}': prompt should be a non-empty list of {{role, content}}"),
    "a repeated pair id": (_bad(lambda r: r[9].update(pair_id=r[0]["pair_id"])),
                           "<F>:10: pair id '{id0}' repeats line 1"),
    "a line that is a list": (lambda r: r[:1] + ["[1, 2]"] + r[2:], "<F>:2: is a JSON list, not an object"),
    "an empty file": (lambda r: [], "<F>: no pairs"),
}


@pytest.mark.parametrize("what", sorted(BAD_PAIR_FILES))
def test_a_bad_pair_file_fails_naming_file_and_line(tmp_path, what):
    make, expected = BAD_PAIR_FILES[what]
    records = _records()
    path = _write(tmp_path, make(records))
    ids = {f"id{k}": r["pair_id"] for k, r in enumerate(_records()[:10])}
    with pytest.raises(PairFileError) as error:
        read_pairs(path)
    assert expected.replace("<F>", path).format(**ids) in str(error.value), f"{what}: {error.value}"


def test_every_bad_line_is_reported_at_once_and_modes_are_checked(tmp_path):
    records = _records()
    for r in records:
        r["mode"] = "sentinal"  # a file whose pairs all name a mode that does not exist never trains
    path = _write(tmp_path, records)
    with pytest.raises(PairFileError) as error:
        read_pairs(path)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{len(records)} problems in the pair file:" and lines[1].startswith(f"{path}:1: pair ")
    assert lines[-1] == f"(and {len(records) - 20} more)", "a long list is cut, saying how much is left out"
    good = _write(tmp_path, _records())
    with pytest.raises(PairFileError, match=r"modes asked for \['sentinal'\], known: \['run_tests'"):
        read_pairs(good, modes=["sentinel", "sentinal"])
    with pytest.raises(PairFileError, match=r"pairs.jsonl: mode 'sentinel' has 18 pair\(s\), at least 19 needed"):
        read_pairs(good, modes=["sentinel"], min_per_mode=19)
    with pytest.raises(PairFileError, match="cannot read the pair file: No such file or directory"):
        read_pairs(tmp_path / "missing.jsonl")
