"""LeetCode problems (newfacade/LeetCodeDataset, MIT) as `Problem` records.

Two layers:
- raw: the upstream jsonl.gz files (shared/data/leetcode, two layouts: v0.2.0 keeps difficulty, question id,
  description and starter code under `meta`; v0.3.1 has them at top level). `raw_problems` turns one raw file into
  Medium+Hard `Problem`s; `scripts/vendor_leetcode.py` runs it once and writes the vendored files.
- vendored: reward/data/leetcode/problems-{train,test}.jsonl.gz (one `Problem.to_json()` a line) plus
  screen.json (is each problem kept: its reference solution passed the strict oracle under the sandbox
  limits, and its tests do not all expect one value).
  `load_problems(split)` reads them; nothing at training time touches the raw files.

Tests come from the `test` field's `check(candidate)` function, parsed with `ast`. Two assert shapes exist in the
data and both are accepted:
    assert candidate(<args>) == <expected>
    assert is_same_list(candidate(<args>), <expected>)   # also is_same_tree: ListNode/TreeNode results
Any other statement raises `LeetCodeFormatError` naming the problem and the line (none occur in the shipped
files; the loader would rather stop than drop a test silently). The `input_output` field is not used: in v0.2.0
it is the same cases as the asserts one to one, and in v0.3.1 it is written in LeetCode notation (null/true,
trees as lists, string outputs unquoted) that needs type-aware conversion, while the asserts are Python already.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

from reward.problem import Problem, TestCase

RAW_TRAIN_FILE = "LeetCodeDataset-v0.2.0-train.jsonl.gz"
RAW_TEST_FILE = "LeetCodeDataset-v0.3.1-test.jsonl.gz"
RAW_FILES: dict[str, str] = {"train": RAW_TRAIN_FILE, "test": RAW_TEST_FILE}
SPLITS: tuple[str, ...] = ("train", "test")
KEPT_DIFFICULTIES: tuple[str, ...] = ("Medium", "Hard")

VENDORED_DIR = Path(__file__).resolve().parent / "data" / "leetcode"
SCREEN_FILE = "screen.json"

# Functions of the dataset's setup code that compare linked-list / tree results structurally.
_STRUCTURAL_COMPARATORS = ("is_same_list", "is_same_tree")


class LeetCodeFormatError(ValueError):
    """A raw LeetCode row does not have the shape this loader understands."""


def parse_check_tests(test_src: str, parameters: tuple[str, ...], problem_id: str) -> tuple[TestCase, ...]:
    """Parse `def check(candidate): assert ...` into TestCases (keyword args source, expected source), in file order.

    `parameters` are the method's parameter names (without self): positional arguments, which a few v0.2.0 asserts
    use, are written as keywords, so every input_expr is a keyword-argument list as TestCase requires.
    """
    try:
        module = ast.parse(test_src)
    except SyntaxError as exc:
        raise LeetCodeFormatError(f"problem {problem_id}: `test` field does not parse: {exc}") from exc
    checks = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if len(checks) != 1:
        raise LeetCodeFormatError(f"problem {problem_id}: `test` field should define exactly one check(candidate)")
    source = _Source(test_src)
    tests = []
    for statement in checks[0].body:
        where = f"problem {problem_id}, test line {statement.lineno}"
        if not isinstance(statement, ast.Assert):
            raise LeetCodeFormatError(f"{where}: expected an assert, got {ast.unparse(statement)[:80]!r}")
        call, expected = _split_assert(statement.test, where)
        tests.append(TestCase(input_expr=_call_args_source(source, call, parameters, where),
                              expected_expr=source.segment(expected)))
    if not tests:
        raise LeetCodeFormatError(f"problem {problem_id}: check(candidate) has no asserts")
    return tuple(tests)


def _split_assert(test: ast.expr, where: str) -> tuple[ast.Call, ast.expr]:
    """(candidate call, expected expression) of one of the two accepted assert shapes."""
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and _is_candidate_call(test.left)):
        return test.left, test.comparators[0]
    if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id in _STRUCTURAL_COMPARATORS
            and len(test.args) == 2 and not test.keywords and _is_candidate_call(test.args[0])):
        return test.args[0], test.args[1]
    raise LeetCodeFormatError(
        f"{where}: assert should be `candidate(...) == expected` or `is_same_list/is_same_tree(candidate(...), "
        f"expected)`, got {ast.unparse(test)[:120]!r}")


def _is_candidate_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "candidate"


class _Source:
    """Source text of ast nodes by offset (ast.get_source_segment re-splits the file per call: quadratic here)."""

    def __init__(self, text: str):
        self.encoded = text.encode("utf-8")  # ast column offsets count utf-8 bytes
        self.line_starts = [0]
        for line in self.encoded.splitlines(keepends=True):
            self.line_starts.append(self.line_starts[-1] + len(line))

    def segment(self, node: ast.AST) -> str:
        start = self.line_starts[node.lineno - 1] + node.col_offset
        end = self.line_starts[node.end_lineno - 1] + node.end_col_offset
        return self.encoded[start:end].decode("utf-8")


def _call_args_source(source: _Source, call: ast.Call, parameters: tuple[str, ...], where: str) -> str:
    """The call's arguments as keyword source text, e.g. "nums = [2,7,11,15], target = 9"."""
    if len(call.args) > len(parameters):
        raise LeetCodeFormatError(f"{where}: {len(call.args)} positional arguments but the method takes {parameters}")
    parts = []
    for name, arg in zip(parameters, call.args):
        if isinstance(arg, ast.Starred):
            raise LeetCodeFormatError(f"{where}: starred argument in candidate(...) is not supported")
        parts.append(f"{name} = {source.segment(arg)}")
    for keyword in call.keywords:
        if keyword.arg is None:
            raise LeetCodeFormatError(f"{where}: **kwargs in candidate(...) is not supported")
        parts.append(f"{keyword.arg} = {source.segment(keyword.value)}")
    return ", ".join(parts)


def method_parameters(starter_code: str, method_name: str, problem_id: str) -> tuple[str, ...]:
    """Parameter names (without self) of Solution.<method_name> in the starter code."""
    try:
        module = ast.parse(starter_code.rstrip() + "\n        pass\n")
    except SyntaxError as exc:
        raise LeetCodeFormatError(f"problem {problem_id}: starter code does not parse: {exc}") from exc
    for node in ast.walk(module):
        if isinstance(node, ast.FunctionDef) and node.name == method_name:
            names = [a.arg for a in node.args.posonlyargs + node.args.args]
            if not names or names[0] != "self" or node.args.vararg or node.args.kwarg:
                raise LeetCodeFormatError(f"problem {problem_id}: {method_name} should be (self, <named params>)")
            return tuple(names[1:])
    raise LeetCodeFormatError(f"problem {problem_id}: starter code does not define {method_name}")


def _raw_fields(row: dict) -> tuple[int, str, str, str]:
    """(question_id, difficulty, description, starter code) from either raw layout."""
    if "meta" in row:  # v0.2.0 layout; its `question_title` holds the full problem text
        meta = row["meta"]
        return meta["question_id"], meta["difficulty"], meta["question_title"], meta["lang_code"]
    return row["question_id"], row["difficulty"], row["problem_description"], row["starter_code"]


def problem_from_raw(row: dict) -> Problem:
    """One raw LeetCodeDataset row as a Problem (any difficulty)."""
    task = row.get("task_id", "<no task_id>")
    try:
        question_id, difficulty, description, starter = _raw_fields(row)
        entry_point, completion, setup, test_src = row["entry_point"], row["completion"], row["prompt"], row["test"]
    except KeyError as exc:
        raise LeetCodeFormatError(f"raw row {task}: missing field {exc}") from exc
    problem_id = f"lc-{question_id}"
    prefix = "Solution()."
    if not entry_point.startswith(prefix):
        raise LeetCodeFormatError(f"problem {problem_id}: entry_point {entry_point!r} should be 'Solution().<method>'")
    method_name = entry_point.removeprefix(prefix)
    return Problem(
        problem_id=problem_id,
        source="leetcode",
        difficulty=difficulty,
        description=description.strip(),
        starter_code=starter.rstrip() + "\n        ",
        method_name=method_name,
        setup_code=setup,
        tests=parse_check_tests(test_src, method_parameters(starter, method_name, problem_id), problem_id),
        reference_solution=completion,
    )


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def raw_problems(path: Path) -> list[Problem]:
    """Medium+Hard problems of one raw file, in file order."""
    problems = [problem_from_raw(row) for row in read_jsonl_gz(path)]
    return [p for p in problems if p.difficulty in KEPT_DIFFICULTIES]


def constant_expected(problem: Problem) -> bool:
    """True when every test expects the same value, so a method returning one constant passes the oracle."""
    return len({t.expected_expr.replace(" ", "") for t in problem.tests}) == 1


def raw_splits(raw_dir: Path) -> dict[str, list[Problem]]:
    """Train (v0.2.0 train) and test (v0.3.1 test) Medium+Hard problems; raises if a question is in both."""
    splits = {split: raw_problems(Path(raw_dir) / RAW_FILES[split]) for split in SPLITS}
    assert_disjoint(splits)
    return splits


def assert_disjoint(splits: dict[str, list[Problem]]) -> None:
    ids = {split: [p.problem_id for p in problems] for split, problems in splits.items()}
    for split, split_ids in ids.items():
        if len(set(split_ids)) != len(split_ids):
            raise LeetCodeFormatError(f"split {split}: duplicate problem ids")
    shared = set(ids["train"]) & set(ids["test"])
    if shared:
        raise LeetCodeFormatError(f"train and test should share no problem, but share {sorted(shared)[:10]}")


def write_problems(path: Path, problems: list[Problem]) -> None:
    """One Problem.to_json() a line, gzip with mtime 0 so the same problems give the same bytes (and hash)."""
    payload = "".join(p.to_json() + "\n" for p in problems).encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
        handle.write(payload)
    Path(path).write_bytes(buffer.getvalue())


def read_problems(path: Path) -> list[Problem]:
    return [Problem.from_dict(row) for row in read_jsonl_gz(path)]


def problems_path(split: str, data_dir: Path = VENDORED_DIR) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return Path(data_dir) / f"problems-{split}.jsonl.gz"


@dataclass(frozen=True)
class ProblemScreen:
    """Whether a vendored problem is used, and why.

    kept = reference_passed and not constant_expected: the reference solution passed every test under the strict
    oracle and the sandbox limits, and the tests do not all expect one value (else a constant return "solves" it).
    """

    kept: bool
    reference_passed: bool
    constant_expected: bool
    reason: str  # the oracle's verdict reason for the reference


def load_screen(data_dir: Path = VENDORED_DIR) -> dict[str, ProblemScreen]:
    path = Path(data_dir) / SCREEN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `scripts/vendor_leetcode.py` to grade the references")
    records = json.loads(path.read_text())["problems"]
    return {pid: ProblemScreen(**record) for pid, record in records.items()}


def load_problems(split: str, data_dir: Path = VENDORED_DIR, kept_only: bool = True) -> list[Problem]:
    """The vendored problems of a split, in file order; with kept_only, only those the screen keeps."""
    problems = read_problems(problems_path(split, data_dir))
    if not kept_only:
        return problems
    screen = load_screen(data_dir)
    missing = [p.problem_id for p in problems if p.problem_id not in screen]
    if missing:
        raise LeetCodeFormatError(f"{SCREEN_FILE} has no entry for {missing[:10]}: re-run the vendor step")
    return [p for p in problems if screen[p.problem_id].kept]
