"""The result channel's reader (reward.records, reward.oracle.OracleReader) on real byte streams: records split
anywhere across chunks, a record over its cap refused before it is parsed, each chunk scanned once, the read cut at
the first failure. The end-to-end figures (what a flood costs the grader) are in test_reward_hostile_suite.py."""

from __future__ import annotations

import json
import random
import time

import pytest

from reward.oracle import OracleReader, judge
from reward.problem import Problem, TestCase
from reward.records import ProblemError, RecordReader
from reward.sandbox import Execution

PROBLEM = Problem(problem_id="add-one", source="synthetic", difficulty="Easy", description="add one",
                  starter_code="class Solution:\n    def f(self, a):\n        ", method_name="f",
                  setup_code="from typing import *\n", tests=tuple(TestCase(f"a = {a}", str(a + 1)) for a in range(3)))
PREAMBLE = b'{"compile": true}\n{"ready": true}\n'
PASSING = PREAMBLE + b'{"i": 0, "v": 1}\n{"i": 1, "v": 2}\n{"i": 2, "v": 3}\n{"done": 3}\n'


def _ended(records: bytes = b"", overflow: tuple[str, ...] = ()) -> Execution:
    return Execution(exit_code=0, signal=None, timed_out=False, cpu_s=0.0, records=records, stdout=b"", stderr=b"",
                     overflow=overflow)


def _read(reader: RecordReader, stream: bytes, chunk_sizes) -> bool:
    """Feed `stream` in chunks as the sandbox does; True when the reader asked to stop."""
    at = 0
    for size in chunk_sizes:
        if at >= len(stream):
            break
        if reader(stream[at:at + size]):
            return True
        at += size
    return False


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "random"])
def test_a_passing_stream_reads_the_same_however_it_is_cut_into_chunks(chunking):
    sizes = {"whole": [len(PASSING)], "bytewise": [1] * len(PASSING),
             "random": [random.Random(7).randint(1, 9) for _ in PASSING]}[chunking]
    reader = OracleReader(PROBLEM, record_cap=64)
    assert not _read(reader, PASSING, sizes)
    result = judge(PROBLEM, _ended(), reader)
    assert result.solved and result.reason == "all 3 tests passed", result


def test_the_read_stops_at_the_first_wrong_forged_or_extra_record_and_says_why():
    cases = {
        b'{"i": 0, "v": 1}\n{"i": 1, "v": 7}\n{"i": 2, "v": 3}\n': "wrong answer on test 1: expected 2, got 7",
        b'{"i": 0, "v": 1}\n{"i": 2, "v": 3}\n': "result channel malformed at test 1 (forged or corrupted)",
        b'{"i": true, "v": 1}\n': "result channel malformed at test 0",  # a bool is not the index 0... nor 1
        b'{"done": 3}\n': "result channel malformed at test 0",
        b'{"i": 0, "v": 1}\n{"i": 1, "v": 2}\n{"i": 2, "v": 3}\n{"done": 3}\n{"done": 3}\n':
            "result channel malformed after the last test",
        b'{"exec_error": "NameError: x"}\n': "program raised before the tests: NameError: x",
        b'{"i": 0, "error": "ZeroDivisionError"}\n': "test 0 raised ZeroDivisionError",
        b'[1, 2]\n{"i": 0, "v": 1}\n': "no result for test 0 of 3 (result record 2 is not an object)",
        b'{"i": 0, "v": [[[[\n': "no result for test 0 of 3 (result record 2 is not JSON)",
    }
    for body, reason in cases.items():
        reader = OracleReader(PROBLEM, record_cap=64)
        stopped = _read(reader, PREAMBLE + body + b'{"i": 0, "v": 1}\n' * 50, [7] * 1000)
        assert stopped, f"{body!r}: the reader should ask to close the channel"
        result = judge(PROBLEM, _ended(), reader)
        assert not result.solved and reason in result.reason, f"{body!r}: {result.reason}"


def test_a_record_over_its_cap_is_refused_before_any_of_it_is_parsed():
    head = b'{"i": 0, "v": 1'
    at_cap = PREAMBLE + head + b" " * (63 - len(head)) + b"}\n"  # a record of exactly 64 bytes
    reader = OracleReader(PROBLEM, record_cap=64)
    assert not _read(reader, at_cap, [5] * 100) and reader.passed == 1, "a record of exactly the cap is read"
    over = PREAMBLE + head + b" " * (65 - len(head))  # no line end yet: refused as soon as it passes the cap
    reader = OracleReader(PROBLEM, record_cap=64)
    assert _read(reader, over, [len(PREAMBLE), 60, 5]) and reader.problem == "result record 2 is over 64 bytes"
    assert "over 64 bytes" in judge(PROBLEM, _ended(), reader).reason


def test_each_chunk_is_scanned_once_so_a_long_line_costs_linear_time():
    # 32 MiB with no line end, in 64 KiB chunks (as the sandbox reads), under a cap that lets it all in: rescanning
    # or copying the buffer per chunk (what the grader once did) takes seconds here; one scan takes milliseconds
    reader = RecordReader(record_cap=64 << 20)
    chunk = b"A" * (64 << 10)
    start = time.process_time()
    for _ in range(512):
        assert not reader(chunk)
    assert time.process_time() - start < 0.5 and reader.partial


def test_the_preamble_decides_compile_and_a_broken_problem_raises():
    reader = OracleReader(PROBLEM, record_cap=64)
    _read(reader, b'{"compile": false, "error": "SyntaxError: bad"}\n', [100])
    result = judge(PROBLEM, _ended(), reader)
    assert (result.compiled, result.solved, result.reason) == (False, False, "does not compile: SyntaxError: bad")
    reader = OracleReader(PROBLEM, record_cap=256)
    _read(reader, b'{"compile": true}\n{"setup_error": "NameError: helper"}\n', [100])
    with pytest.raises(ProblemError, match="setup_code fails in the sandbox: NameError: helper"):
        judge(PROBLEM, _ended(), reader)
    reader = OracleReader(PROBLEM, record_cap=64)
    _read(reader, PASSING[:-3], [1000])  # ends inside the last record
    assert judge(PROBLEM, _ended(), reader).reason == (
        "result channel malformed after the last test (forged or corrupted)")
    reader = OracleReader(PROBLEM, record_cap=64)
    _read(reader, PASSING, [1000])
    assert judge(PROBLEM, _ended(overflow=("result",)), reader).reason == "result channel over its size cap"


def test_the_shipped_problems_results_fit_the_default_caps_with_room():
    from reward.leetcode import load_problems
    from reward.oracle import expected_forms
    from reward.sandbox import SandboxLimits

    limits = SandboxLimits()
    largest_record = largest_total = 0
    for split in ("train", "test"):
        for problem in load_problems(split):
            sizes = [len(json.dumps({"i": i, "v": form})) + 1 for i, form in enumerate(expected_forms(problem))]
            largest_record, largest_total = max(largest_record, max(sizes)), max(largest_total, sum(sizes))
    assert largest_record * 4 <= limits.record_cap and largest_total * 4 <= limits.result_cap, (
        f"a correct answer must fit the caps with room (floats may print longer than expected): largest record "
        f"{largest_record} B (cap {limits.record_cap}), largest channel {largest_total} B (cap {limits.result_cap})")
