"""The result channel read as it streams: JSON-object records, one a line, each bounded before it is parsed.

The program under test can write anything on this channel, so the grader's cost must not grow with what it writes.
A `RecordReader` is the `reader` of one `Sandbox.run`: it receives each chunk once and scans only that chunk for
line ends (never the bytes before it), refuses a line longer than `record_cap` before parsing any of it, parses
each record alone and hands it to `take`, which keeps only what the verdict needs. The first record that breaks the
expected sequence ends the read: the sandbox closes the channel, and the program dies at its next write. So one
execution costs the grader at most one scan of `SandboxLimits.result_cap` bytes plus the parse of records of at
most `record_cap` bytes each, and only those records that continue a valid sequence are ever parsed after the first.

Every job's channel starts with two records the harness writes before any candidate code runs (see
reward/_harness.py): {"compile": ...}, then {"ready": true} (or the problem's own {"setup_error"}/{"input_error"}).
`RecordReader` checks these; subclasses (the oracle's and the exploit channels' readers) check the rest.
"""

from __future__ import annotations

import json

from reward.problem import Problem

_SHOWN_CHARS = 300


class ProblemError(ValueError):
    """The problem's own data is broken (setup code, an input or an expected expression fails): not the candidate's
    doing. Raised rather than scored, so a broken problem is found, not silently zeroed."""


class RecordReader:
    """Reads one execution's result channel (call it with each chunk; True means stop reading)."""

    def __init__(self, record_cap: int):
        self.record_cap = record_cap
        self._partial = bytearray()
        self.count = 0  # records taken so far
        self.problem = ""  # what was wrong with the channel itself (over-long, not JSON, not an object)
        self.compiled: bool | None = None  # None until the compile record arrives
        self.compile_error = ""
        self.ready = False
        self.setup_error = ""  # the problem's setup code or an input failed in the sandbox (ProblemError)
        self.stopped = False

    def __call__(self, chunk: bytes) -> bool:
        if self.stopped:
            return True
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if len(self._partial) + len(chunk) - start > self.record_cap:
                    return self._stop(f"result record {self.count} is over {self.record_cap} bytes")
                self._partial += chunk[start:]
                return False
            if len(self._partial) + end - start > self.record_cap:
                return self._stop(f"result record {self.count} is over {self.record_cap} bytes")
            line = bytes(self._partial) + chunk[start:end] if self._partial else chunk[start:end]
            self._partial.clear()
            start = end + 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                return self._stop(f"result record {self.count} is not JSON")
            if type(record) is not dict:
                return self._stop(f"result record {self.count} is not an object")
            self.count += 1
            if self._take_preamble(record) if self.count <= 2 else self.take(record):
                self.stopped = True
                return True

    def _stop(self, problem: str) -> bool:
        self.problem = problem
        self._partial.clear()
        self.stopped = True
        return True

    @property
    def partial(self) -> bool:
        """The channel ended inside a record (a line without its end)."""
        return bool(self._partial)

    def _take_preamble(self, record: dict) -> bool:
        if self.count == 1:
            if "compile" not in record:
                self.problem = "result channel malformed: no compile report first"
                return True
            self.compiled = record["compile"] is True
            if not self.compiled:
                self.compile_error = str(record.get("error", ""))[:_SHOWN_CHARS]
            return not self.compiled
        if "setup_error" in record or "input_error" in record:
            self.setup_error = (f"setup_code fails in the sandbox: {record['setup_error']}" if "setup_error" in record
                                else f"test {record.get('i')} input_expr does not evaluate in the sandbox: "
                                     f"{record['input_error']}")
            return True
        self.ready = record == {"ready": True}
        if not self.ready:
            self.problem = "result channel malformed before the program ran"
        return not self.ready

    def take(self, record: dict) -> bool:
        """One record after {"ready"}: keep what the verdict needs; True to stop reading."""
        raise NotImplementedError

    def preamble_failure(self, problem: Problem, end: str) -> tuple[bool, str]:
        """(compiled, why the program never got to run, or "") from the trusted records written before any candidate
        code ran. `end` says how the execution ended. Raises ProblemError when the problem's own set-up failed."""
        if self.setup_error:
            raise ProblemError(f"problem {problem.problem_id}: {self.setup_error}")
        if self.compiled is None:
            return False, f"no compile report ({self.problem or end})"
        if not self.compiled:
            return False, f"does not compile: {self.compile_error}"
        if not self.ready:
            return True, self.problem or f"stopped before the program ran ({end})"
        return True, ""

    def channel_problem(self, overflow: tuple[str, ...]) -> str:
        """What was wrong with the channel as a byte stream, or ""."""
        if "result" in overflow:
            return "result channel over its size cap"
        if self.problem:
            return self.problem
        return "result channel ends in a partial record" if self.partial else ""


def shown(value) -> str:
    """A decoded value (or anything JSON can encode) for a verdict reason, cut to a readable length."""
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:120] + "..."
