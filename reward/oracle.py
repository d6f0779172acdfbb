"""The strict oracle: every hidden test, in a fresh isolated execution, compared type-strictly OUTSIDE it.

The sandboxed child only evaluates the test INPUTS (before the candidate's code runs), calls
`Solution().<method>(**kwargs)` and writes each result's canonical plain form (`_canonical.encode`). The expected
values are evaluated here, in the grader, from trusted problem data and never enter the child. So an always-equal
object, an int subclass, a patched print/json/builtins or a forged result line can only ever state a plain value,
and that value must equal the expected one: the child does not know it.
"""

from __future__ import annotations

import functools
import json
import sys
import types
from dataclasses import dataclass

from reward import _canonical
from reward.problem import Problem
from reward.sandbox import PACKAGES_DIR, Execution

# Setup code may import what the sandbox offers beyond the stdlib (sortedcontainers); the grader runs the same setup
# code to evaluate expected values, so it finds the same packages (after any installed ones).
if PACKAGES_DIR not in sys.path:
    sys.path.append(PACKAGES_DIR)

_SHOWN_CHARS = 120


class ProblemError(ValueError):
    """The problem's own data is broken (setup code, an input or an expected expression fails): not the candidate's
    doing. Raised rather than scored, so a broken problem is found, not silently zeroed."""


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


def _shown(form) -> str:
    text = json.dumps(form)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def parse_records(raw: bytes) -> tuple[list[dict], str]:
    """Complete JSON-object lines of a result channel, and what was wrong with it ("" if nothing)."""
    lines = raw.split(b"\n")
    records = []
    for k, line in enumerate(lines[:-1]):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return records, f"result channel record {k} is not JSON"
        if type(record) is not dict:
            return records, f"result channel record {k} is not an object"
        records.append(record)
    return records, "result channel ends in a partial record" if lines[-1] else ""


def preamble(problem: Problem, records: list[dict], execution: Execution) -> tuple[bool, str, int]:
    """Check the trusted records written before any candidate code ran: compile report, then set-up.

    Returns (compiled, failure reason or "", index of the first record after {"ready"}). Raises ProblemError when
    the child reports that the problem's own setup or inputs fail."""
    if not records or "compile" not in records[0]:
        return False, f"no compile report ({execution.describe_end()})", 0
    if records[0]["compile"] is not True:
        return False, f"does not compile: {records[0].get('error', '')}", 1
    if len(records) < 2:
        return True, f"stopped before the program ran ({execution.describe_end()})", 1
    second = records[1]
    if "setup_error" in second:
        raise ProblemError(f"problem {problem.problem_id}: setup_code fails in the sandbox: {second['setup_error']}")
    if "input_error" in second:
        raise ProblemError(f"problem {problem.problem_id}: test {second.get('i')} input_expr does not evaluate "
                           f"in the sandbox: {second['input_error']}")
    if second != {"ready": True}:
        return True, "result channel malformed before the program ran", 2
    return True, "", 2


class FirstFailure:
    """`stop` callback for `Sandbox.run`: True as soon as the streamed oracle records show a failed or malformed
    test, so the execution is cut there (what the final `judge` reports is unchanged: that record is kept)."""

    def __init__(self, problem: Problem):
        self.expected = expected_forms(problem)
        self.offset = 0
        self.next_test = 0

    def __call__(self, raw: bytes) -> bool:
        end = raw.rfind(b"\n") + 1
        for line in raw[self.offset:end].split(b"\n")[:-1]:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                return True
            if type(record) is not dict or "exec_error" in record:
                return True
            if "i" in record:
                if (record.keys() != {"i", "v"} or record["i"] != self.next_test
                        or self.next_test >= len(self.expected)):
                    return True
                try:
                    if not _canonical.same(self.expected[self.next_test], record["v"]):
                        return True
                except RecursionError:
                    return True
                self.next_test += 1
        self.offset = end
        return False


def judge(problem: Problem, execution: Execution) -> OracleResult:
    """Decide compile/solve from an oracle execution of `problem`. Never trusts anything but plain decoded values."""
    if execution.sandbox_error:
        return OracleResult(False, False, execution.describe_end())
    records, channel_problem = parse_records(execution.records)
    if "result" in execution.overflow:
        channel_problem = "result channel over its size cap"
    compiled, failure, start = preamble(problem, records, execution)
    if failure:
        return OracleResult(compiled, False, failure)
    expected = expected_forms(problem)
    body = records[start:]
    if body and "exec_error" in body[0]:
        return OracleResult(True, False, f"program raised before the tests: {body[0]['exec_error']}")
    for i, want in enumerate(expected):
        if i >= len(body):
            why = channel_problem or execution.describe_end()
            return OracleResult(True, False, f"no result for test {i} of {len(expected)} ({why})")
        record = body[i]
        if record.keys() == {"i", "error"} and record["i"] == i:
            return OracleResult(True, False, f"test {i} raised {str(record['error'])[:_SHOWN_CHARS]}")
        if record.keys() != {"i", "v"} or record["i"] != i:
            return OracleResult(True, False, f"result channel malformed at test {i} (forged or corrupted)")
        try:
            ok = _canonical.same(want, record["v"])
        except RecursionError:
            ok = False
        if not ok:
            return OracleResult(True, False, f"wrong answer on test {i}: expected {_shown(want)}, "
                                             f"got {_shown(record['v'])}")
    rest = body[len(expected):]
    if rest != [{"done": len(expected)}]:
        return OracleResult(True, False, "result channel malformed after the last test (forged or corrupted)")
    if channel_problem:
        return OracleResult(True, False, channel_problem)
    return OracleResult(True, True, f"all {len(expected)} tests passed")
