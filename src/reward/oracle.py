"""The strict oracle: every hidden test, in a fresh isolated execution, compared type-strictly OUTSIDE it.

The sandboxed child only evaluates the test INPUTS (before the candidate's code runs), calls
`Solution().<method>(**kwargs)` and writes each result's canonical plain form (`_canonical.encode`). The expected
values are evaluated here, in the grader, from trusted problem data and never enter the child. So an always-equal
object, an int subclass, a patched print/json/builtins or a forged result line can only ever state a plain value,
and that value must equal the expected one: the child does not know it.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass

from reward import _canonical
from reward.problem import Problem
from reward.records import ProblemError, RecordReader, shown
from reward.sandbox import PACKAGES_DIR, Execution

# Setup code may import what the sandbox offers beyond the stdlib (sortedcontainers); the grader runs the same setup
# code to evaluate expected values, so it finds the same packages (after any installed ones).
if PACKAGES_DIR not in sys.path:
    sys.path.append(PACKAGES_DIR)

_SHOWN_CHARS = 120


@dataclass(frozen=True)
class OracleResult:
    compiled: bool  # the program parsed and compiled (reported by the child before any candidate code ran)
    solved: bool  # every test produced the expected value
    reason: str  # why not solved (or "all N tests passed")


def oracle_job(problem: Problem, program: str) -> dict:
    """The job for `_harness.run_job`: inputs only (compiled), no expected values."""
    return {"kind": "oracle", "program": program, "setup_code": problem.setup_code, "method": problem.method_name,
            "inputs": list(compiled_inputs(problem))}


def _compile_each(problem: Problem, sources: list[str], what: str) -> tuple[types.CodeType, ...]:
    codes = []
    for i, source in enumerate(sources):
        try:
            codes.append(compile(source, f"<{what}>", "eval"))
        except Exception as e:
            raise ProblemError(f"problem {problem.problem_id}: test {i} {what} {source[:_SHOWN_CHARS]!r} does not "
                               f"compile: {e!r}") from e
    return tuple(codes)


@functools.lru_cache(maxsize=4096)
def compiled_inputs(problem: Problem) -> tuple[types.CodeType, ...]:
    """Each test's input as the code object of `dict(<input_expr>)`, compiled here once per problem (cached).

    The sandboxed child receives code objects (the job is marshalled) and evaluates them without parsing: parsing
    the ~100 test inputs of a LeetCode problem cost it about 4 ms of every execution. They are trusted problem data,
    compiled by the grader's own interpreter, whose base interpreter (same version, same marshal format) runs the
    sandbox."""
    return _compile_each(problem, [f"dict({t.input_expr})" for t in problem.tests], "input")


@functools.lru_cache(maxsize=4096)
def compiled_expected(problem: Problem) -> tuple[types.CodeType, ...]:
    """Each test's expected expression as a code object: only the flawed graders that compare in the candidate's
    process (eq_override, exit_code) ever send these into a sandbox."""
    return _compile_each(problem, [t.expected_expr for t in problem.tests], "expected_expr")


@functools.lru_cache(maxsize=8)
def _setup_namespace(setup_code: str) -> dict:
    namespace: dict = {"__name__": "reward_expected"}
    exec(setup_code, namespace)  # trusted problem data (the dataset's helpers and imports)
    return namespace


@functools.lru_cache(maxsize=4096)
def expected_forms(problem: Problem) -> tuple:
    """Canonical forms of every test's expected value, evaluated here from trusted data (cached per problem)."""
    try:
        namespace = _setup_namespace(problem.setup_code)
    except Exception as e:
        raise ProblemError(f"problem {problem.problem_id}: setup_code fails in the grader: {e!r}") from e
    forms = []
    for i, test in enumerate(problem.tests):
        try:
            form = _canonical.encode(eval(test.expected_expr, dict(namespace)))
        except Exception as e:
            raise ProblemError(f"problem {problem.problem_id}: test {i} expected_expr "
                               f"{test.expected_expr[:_SHOWN_CHARS]!r} does not evaluate: {e!r}") from e
        if not _canonical.comparable(form):
            raise ProblemError(f"problem {problem.problem_id}: test {i} expected value has a type the oracle "
                               f"cannot compare: {form}")
        forms.append(form)
    return tuple(forms)


class OracleReader(RecordReader):
    """The oracle's reader of one execution: compares each test's result with the expected value as it arrives, and
    stops at the first failed, malformed or forged record (as the original benchmark stops at its first failure).
    It keeps only how far the program got and why it stopped."""

    def __init__(self, problem: Problem, record_cap: int):
        super().__init__(record_cap)
        self.expected = expected_forms(problem)
        self.passed = 0  # tests passed, in order
        self.done = False  # the {"done": n} record came after the last test
        self.failure = ""

    def take(self, record: dict) -> bool:
        n, i = len(self.expected), self.passed
        index_ok = record.get("i") == i and type(record.get("i")) is int
        if self.done:
            self.failure = "result channel malformed after the last test (forged or corrupted)"
        elif "exec_error" in record and self.count == 3:  # the first record after {"ready"}
            self.failure = f"program raised before the tests: {str(record['exec_error'])[:_SHOWN_CHARS]}"
        elif record.keys() == {"done"} and type(record["done"]) is int and record["done"] == n == i:
            self.done = True
            return False
        elif i < n and index_ok and record.keys() == {"i", "error"}:
            self.failure = f"test {i} raised {str(record['error'])[:_SHOWN_CHARS]}"
        elif i < n and index_ok and record.keys() == {"i", "v"}:
            try:
                ok = _canonical.same(self.expected[i], record["v"])
            except RecursionError:
                ok = False
            if ok:
                self.passed += 1
                return False
            self.failure = f"wrong answer on test {i}: expected {shown(self.expected[i])}, got {shown(record['v'])}"
        else:
            self.failure = (f"result channel malformed at test {i} (forged or corrupted)" if i < n
                            else "result channel malformed after the last test (forged or corrupted)")
        return True


def judge(problem: Problem, execution: Execution, reader: OracleReader) -> OracleResult:
    """Decide compile/solve from an oracle execution of `problem` whose result channel `reader` read. Never trusts
    anything but plain decoded values. Raises ProblemError when the problem's own set-up failed in the sandbox."""
    if execution.sandbox_error:
        return OracleResult(False, False, execution.describe_end())
    compiled, failure = reader.preamble_failure(problem, execution.describe_end())
    if failure:
        return OracleResult(compiled, False, failure)
    if reader.failure:
        return OracleResult(True, False, reader.failure)
    n = len(reader.expected)
    trouble = reader.channel_problem(execution.overflow)
    if reader.passed < n:
        return OracleResult(True, False, f"no result for test {reader.passed} of {n} "
                                         f"({trouble or execution.describe_end()})")
    if not reader.done:
        return OracleResult(True, False, "result channel malformed after the last test (forged or corrupted)")
    if trouble:
        return OracleResult(True, False, trouble)
    return OracleResult(True, True, f"all {n} tests passed")
