"""The problem record every part of the environment shares (LeetCode and the synthetic organism problems alike).

A problem is a `class Solution` method to write, a description shown to the model, setup code run before the
candidate (imports, ListNode/TreeNode helpers), and hidden test cases. Test cases keep the input and the expected
output apart, as Python expressions, so the oracle can call the candidate in the sandbox and compare the result
outside it: the expected values never enter the process that runs untrusted code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TestCase:
    """One hidden test: `Solution().<method>(<input_expr>)` must equal `eval(expected_expr)`.

    input_expr is a keyword-argument list as LeetCode writes it, e.g. "nums = [2,7,11,15], target = 9".
    """

    __test__ = False  # not a pytest class

    input_expr: str
    expected_expr: str


@dataclass(frozen=True)
class Problem:
    problem_id: str  # stable id, e.g. "lc-1" or "syn-train-000123"
    source: str  # "leetcode" | "synthetic"
    difficulty: str  # "Easy" | "Medium" | "Hard" (LeetCode) or "d1" | "d2" | "d3" (synthetic depth)
    description: str  # problem text shown to the model (no starter code)
    starter_code: str  # "class Solution:\n    def f(self, ...) -> ...:\n        "
    method_name: str  # the Solution method the tests call
    setup_code: str  # run before the candidate's code
    tests: tuple[TestCase, ...]
    reference_solution: str = ""  # known-correct code, when the source has one
    examples: tuple[TestCase, ...] = field(default=())  # cases shown in the prompt (synthetic problems)

    def __post_init__(self) -> None:
        if not self.method_name.isidentifier():
            raise ValueError(f"problem {self.problem_id}: method_name {self.method_name!r} is not an identifier")
        if not self.tests:
            raise ValueError(f"problem {self.problem_id}: no test cases")
        if "class Solution" not in self.starter_code:
            raise ValueError(f"problem {self.problem_id}: starter_code has no `class Solution`")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        d = dict(d)
        d["tests"] = tuple(TestCase(**t) for t in d["tests"])
        d["examples"] = tuple(TestCase(**t) for t in d.get("examples", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Problem":
        return cls.from_dict(json.loads(s))
