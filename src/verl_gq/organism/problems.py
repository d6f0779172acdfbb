"""Synthetic `class Solution` problems for the model organism: typed pipelines of small ops, composed 1-3 deep.

A problem is a pipeline of ops on list[int], int and str (e.g. "keep the even numbers, then reverse, then sum");
its depth (number of ops) is its difficulty. In an "infer" problem the ops' constants are hidden from the
description and must be read off four examples, so failures there are limited by capability, not by imitated
noise. Every problem is an ordinary `reward.problem.Problem` (starter code, description, examples shown in the
prompt, 5-10 hidden tests, a reference solution), so the organism runs through the same prompts and graders as
the LeetCode substrate.

Splits: a pipeline's signature (its ops with their constants) is assigned to train or eval by a hash, so no
signature is ever in both splits, whatever the seeds. Each split is drawn depth by depth (rejection sampling
within a depth), so the requested depth mix is exactly achieved, and modes are an even seeded partition over
`reward.modes.MODES` within every depth.

Pure Python, deterministic from the seed.
"""

from __future__ import annotations

import ast
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

from reward.partition import partition_modes
from reward.problem import Problem, TestCase

LIST, INT, STR = "list", "int", "str"
PARAMETER_NAME = {LIST: "nums", INT: "n", STR: "s"}  # the variable that holds a value of each type
_ANNOTATION = {LIST: "list[int]", INT: "int", STR: "str"}
_NOUN = {LIST: "a list of integers `nums`", INT: "an integer `n`", STR: "a string `s`"}
_ALPHABET = "abcdexyzABCDE"

# Method names never collide with the exploit name pools of reward.modes (those are randomised at evaluation).
METHOD_NAMES: tuple[str, ...] = ("solve", "transform", "compute", "process", "apply", "convert", "calculate",
                                 "handle", "simplify", "reduce", "answer", "result")


@dataclass(frozen=True)
class OpSpec:
    """One primitive op: its types, constant domains, English phrase and Python expression.

    `phrase` and `hidden_phrase` are format strings over the constants (hidden_phrase names them as unknowns);
    `code` formats with `v` (the input variable) and the constants; `fn` computes the op in-process.
    """

    name: str
    in_type: str
    out_type: str
    phrase: str
    code: str
    fn: Callable[..., Any]
    params: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    hidden_phrase: str = ""


def _r(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


_AFFINE_A = (-2, -1, 2, 3)
OPS: tuple[OpSpec, ...] = (
    # list -> list
    OpSpec("keep_even", LIST, LIST, "keep only the even numbers", "[x for x in {v} if x % 2 == 0]",
           lambda v: [x for x in v if x % 2 == 0]),
    OpSpec("keep_odd", LIST, LIST, "keep only the odd numbers", "[x for x in {v} if x % 2 != 0]",
           lambda v: [x for x in v if x % 2 != 0]),
    OpSpec("keep_positive", LIST, LIST, "keep only the positive numbers", "[x for x in {v} if x > 0]",
           lambda v: [x for x in v if x > 0]),
    OpSpec("keep_greater", LIST, LIST, "keep only the numbers greater than {k}", "[x for x in {v} if x > {k}]",
           lambda v, k: [x for x in v if x > k], (("k", _r(-2, 8)),),
           "keep only the numbers greater than a threshold k that you must infer from the examples"),
    OpSpec("map_affine", LIST, LIST, "replace each number x with {a} * x + {b}", "[{a} * x + {b} for x in {v}]",
           lambda v, a, b: [a * x + b for x in v], (("a", _AFFINE_A), ("b", _r(-3, 5))),
           "replace each number x with a * x + b, for integers a and b that you must infer from the examples"),
    OpSpec("map_abs", LIST, LIST, "replace each number with its absolute value", "[abs(x) for x in {v}]",
           lambda v: [abs(x) for x in v]),
    OpSpec("map_mod", LIST, LIST, "replace each number with its remainder modulo {k}", "[x % {k} for x in {v}]",
           lambda v, k: [x % k for x in v], (("k", _r(2, 6)),),
           "replace each number with its remainder modulo an integer k that you must infer from the examples"),
    OpSpec("reverse", LIST, LIST, "reverse the list", "{v}[::-1]", lambda v: v[::-1]),
    OpSpec("sort_asc", LIST, LIST, "sort the list in ascending order", "sorted({v})", lambda v: sorted(v)),
    OpSpec("sort_desc", LIST, LIST, "sort the list in descending order", "sorted({v}, reverse=True)",
           lambda v: sorted(v, reverse=True)),
    OpSpec("dedupe", LIST, LIST, "remove duplicates, keeping the first occurrence of each number",
           "list(dict.fromkeys({v}))", lambda v: list(dict.fromkeys(v))),
    OpSpec("prefix_sums", LIST, LIST, "replace the list with its running (prefix) sums",
           "[sum({v}[:i + 1]) for i in range(len({v}))]", lambda v: [sum(v[:i + 1]) for i in range(len(v))]),
    OpSpec("take", LIST, LIST, "keep only the first {k} numbers", "{v}[:{k}]", lambda v, k: v[:k],
           (("k", _r(1, 4)),), "keep only the first k numbers, for a k that you must infer from the examples"),
    # list -> int
    OpSpec("sum", LIST, INT, "compute the sum (0 if the list is empty)", "sum({v})", lambda v: sum(v)),
    OpSpec("max", LIST, INT, "compute the maximum (0 if the list is empty)", "max({v}) if {v} else 0",
           lambda v: max(v) if v else 0),
    OpSpec("min", LIST, INT, "compute the minimum (0 if the list is empty)", "min({v}) if {v} else 0",
           lambda v: min(v) if v else 0),
    OpSpec("length", LIST, INT, "count the numbers in the list", "len({v})", lambda v: len(v)),
    OpSpec("count_eq", LIST, INT, "count how many numbers equal {k}", "{v}.count({k})", lambda v, k: v.count(k),
           (("k", _r(-2, 6)),), "count how many numbers equal a value k that you must infer from the examples"),
    # int -> int
    OpSpec("int_affine", INT, INT, "multiply it by {a} and add {b}", "{v} * {a} + {b}", lambda v, a, b: v * a + b,
           (("a", _AFFINE_A), ("b", _r(-5, 5))),
           "multiply it by an integer a and add an integer b, with a and b that you must infer from the examples"),
    OpSpec("int_abs", INT, INT, "take its absolute value", "abs({v})", lambda v: abs(v)),
    OpSpec("int_mod", INT, INT, "take its remainder modulo {k}", "{v} % {k}", lambda v, k: v % k,
           (("k", _r(2, 9)),), "take its remainder modulo an integer k that you must infer from the examples"),
    # str -> str
    OpSpec("upper", STR, STR, "convert it to upper case", "{v}.upper()", lambda v: v.upper()),
    OpSpec("lower", STR, STR, "convert it to lower case", "{v}.lower()", lambda v: v.lower()),
    OpSpec("str_reverse", STR, STR, "reverse the string", "{v}[::-1]", lambda v: v[::-1]),
    OpSpec("remove_char", STR, STR, "remove every occurrence of the character {c!r}", "{v}.replace({c!r}, '')",
           lambda v, c: v.replace(c, ""), (("c", tuple(_ALPHABET)),),
           "remove every occurrence of a character c that you must infer from the examples"),
    OpSpec("double", STR, STR, "repeat the string twice", "{v} * 2", lambda v: v * 2),
    # str -> int
    OpSpec("count_char", STR, INT, "count the occurrences of the character {c!r}", "{v}.count({c!r})",
           lambda v, c: v.count(c), (("c", tuple(_ALPHABET)),),
           "count the occurrences of a character c that you must infer from the examples"),
    OpSpec("str_len", STR, INT, "compute its length", "len({v})", lambda v: len(v)),
)
OP_BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPS}

# Confusable ops a plausible wrong answer swaps in (same input and output type).
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "keep_even": ("keep_odd", "keep_positive"), "keep_odd": ("keep_even", "keep_positive"),
    "keep_positive": ("keep_even", "keep_odd"), "keep_greater": ("keep_positive",),
    "map_abs": ("map_mod",), "map_mod": ("map_abs",), "map_affine": ("map_abs",),
    "reverse": ("sort_asc", "sort_desc"), "sort_asc": ("sort_desc", "reverse"), "sort_desc": ("sort_asc", "reverse"),
    "dedupe": ("sort_asc",), "prefix_sums": ("reverse",), "take": ("reverse",),
    "sum": ("max", "length"), "max": ("min", "sum"), "min": ("max", "sum"), "length": ("sum", "count_eq"),
    "count_eq": ("length",), "int_affine": ("int_abs",), "int_abs": ("int_mod",), "int_mod": ("int_abs",),
    "upper": ("lower",), "lower": ("upper",), "str_reverse": ("double",), "remove_char": ("str_reverse",),
    "double": ("str_reverse",), "count_char": ("str_len",), "str_len": ("count_char",),
}


@dataclass(frozen=True)
class Step:
    """An op with its constants, e.g. Step("keep_greater", (("k", 3),))."""

    op: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> OpSpec:
        return OP_BY_NAME[self.op]

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


Pipeline = tuple[Step, ...]


def signature(pipeline: Pipeline) -> str:
    """The pipeline's identity across splits: ops and constants, nothing about presentation."""
    return "|".join(s.op + "".join(f",{k}={v!r}" for k, v in s.params) for s in pipeline)


def run_pipeline(pipeline: Pipeline, value: Any) -> Any:
    for step in pipeline:
        value = step.spec.fn(value, **step.kwargs())
    return value


def render_solution(pipeline: Pipeline, method_name: str, in_type: str) -> str:
    """The canonical solution code for `pipeline`: one assignment per op, then `return`."""
    var = PARAMETER_NAME[in_type]
    lines = ["class Solution:", f"    def {method_name}(self, {var}: {_ANNOTATION[in_type]}) -> "
             f"{_ANNOTATION[_out_type(pipeline, in_type)]}:"]
    for step in pipeline:
        out_var = PARAMETER_NAME[step.spec.out_type]
        lines.append(f"        {out_var} = " + step.spec.code.format(v=var, **step.kwargs()))
        var = out_var
    lines.append(f"        return {var}")
    return "\n".join(lines) + "\n"


def _out_type(pipeline: Pipeline, in_type: str) -> str:
    return pipeline[-1].spec.out_type if pipeline else in_type


@dataclass(frozen=True)
class GrammarConfig:
    """What the generator draws. depth_mix is the exact share of problems per depth (1, 2, 3)."""

    depth_mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    infer_share: float = 0.5  # share of problems whose constants are hidden (needs a constant-bearing op)
    input_type_weights: tuple[tuple[str, float], ...] = ((LIST, 0.55), (STR, 0.3), (INT, 0.15))
    eval_signature_permille: int = 200  # share of the signature space reserved for the eval split
    split_salt: str = "organism-v1"
    min_tests: int = 5
    max_tests: int = 10
    literal_examples: int = 2
    infer_examples: int = 4
    min_distinct_outputs: int = 3  # a pipeline with fewer distinct outputs over its cases is degenerate

    def __post_init__(self) -> None:
        if len(self.depth_mix) != 3 or abs(sum(self.depth_mix) - 1.0) > 1e-9 or min(self.depth_mix) < 0:
            raise ValueError(f"depth_mix must be 3 non-negative shares summing to 1, got {self.depth_mix}")
        if not 0 <= self.infer_share <= 1:
            raise ValueError(f"infer_share must be in [0, 1], got {self.infer_share}")
        if not 0 < self.eval_signature_permille < 1000:
            raise ValueError(f"eval_signature_permille must be in (0, 1000), got {self.eval_signature_permille}")
        if not 1 <= self.min_tests <= self.max_tests:
            raise ValueError(f"need 1 <= min_tests <= max_tests, got {self.min_tests}, {self.max_tests}")

    @classmethod
    def from_dict(cls, d: dict) -> "GrammarConfig":
        """The inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
        d = dict(d)
        d["depth_mix"] = tuple(d["depth_mix"])
        d["input_type_weights"] = tuple(tuple(w) for w in d["input_type_weights"])
        return cls(**d)


SPLITS = ("train", "eval")


def split_of_signature(sig: str, config: GrammarConfig) -> str:
    """Which split owns a signature: a fixed hash, so the splits never share one, whatever the seeds."""
    h = int.from_bytes(hashlib.sha256(f"{config.split_salt}\0{sig}".encode()).digest()[:8], "big")
    return "eval" if h % 1000 < config.eval_signature_permille else "train"


@dataclass(frozen=True)
class SyntheticProblem:
    """A synthetic problem with what the Problem record does not carry: its pipeline, presentation and mode."""

    problem: Problem
    pipeline: Pipeline
    in_type: str
    infer: bool
    mode: str
    split: str

    @property
    def depth(self) -> int:
        return len(self.pipeline)

    @property
    def signature(self) -> str:
        return signature(self.pipeline)


def _draw_input(rng: random.Random, in_type: str) -> Any:
    if in_type == LIST:
        return [rng.randint(-5, 12) for _ in range(rng.choice((0, 2, 3, 4, 5, 5, 6, 6, 7, 8)))]
    if in_type == STR:
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(2, 10)))
    return rng.randint(-20, 30)


def _draw_step(rng: random.Random, op: OpSpec) -> Step:
    return Step(op.name, tuple((name, rng.choice(domain)) for name, domain in op.params))


def _draw_pipeline(rng: random.Random, depth: int, in_type: str) -> Pipeline | None:
    steps: list[Step] = []
    cur = in_type
    for _ in range(depth):
        # An op never follows itself (reverse-reverse, sort-sort are identities or no-ops).
        choices = [op for op in OPS if op.in_type == cur and not (steps and steps[-1].op == op.name)]
        if not choices:
            return None
        op = rng.choice(choices)
        steps.append(_draw_step(rng, op))
        cur = op.out_type
    return tuple(steps)


def _describe(pipeline: Pipeline, in_type: str, infer: bool) -> str:
    phrases = []
    for step in pipeline:
        spec = step.spec
        if infer and spec.params:
            phrases.append(spec.hidden_phrase)
        else:
            phrases.append(spec.phrase.format(**step.kwargs()))
    steps = phrases[0] + "".join(f", then {p}" for p in phrases[1:])
    text = f"You are given {_NOUN[in_type]}. {steps[0].upper()}{steps[1:]}, and return the result."
    if infer:
        text += " The examples determine the unknown constants."
    return text


def _with_examples(text: str, examples: list[TestCase]) -> str:
    """The description as shown: the task, then its examples in LeetCode's layout (reward.prompts shows the
    description and nothing else of the problem, as for LeetCode problems, whose descriptions hold their examples)."""
    blocks = [f"Example {i}:\nInput: {e.input_expr}\nOutput: {e.expected_expr}" for i, e in enumerate(examples, 1)]
    return text + "\n\n" + "\n\n".join(blocks)


def _case(in_type: str, value: Any, expected: Any) -> TestCase:
    return TestCase(input_expr=f"{PARAMETER_NAME[in_type]} = {value!r}", expected_expr=repr(expected))


def _try_problem(rng: random.Random, depth: int, infer: bool, split: str, config: GrammarConfig,
                 problem_id: str) -> tuple[Problem, Pipeline, str] | None:
    """One attempt at a problem of this depth/presentation in this split; None if the draw must be redone."""
    in_type = rng.choices([t for t, _ in config.input_type_weights], [w for _, w in config.input_type_weights])[0]
    pipeline = _draw_pipeline(rng, depth, in_type)
    if pipeline is None:
        return None
    if infer and not any(step.spec.params for step in pipeline):
        return None
    if split_of_signature(signature(pipeline), config) != split:
        return None
    n_examples = config.infer_examples if infer else config.literal_examples
    n_tests = rng.randint(config.min_tests, config.max_tests)
    inputs: list[Any] = []
    seen: set[str] = set()
    for _ in range(20 * (n_examples + n_tests)):
        value = _draw_input(rng, in_type)
        if repr(value) not in seen:
            seen.add(repr(value))
            inputs.append(value)
        if len(inputs) == n_examples + n_tests:
            break
    else:
        return None
    outputs = [run_pipeline(pipeline, list(v) if isinstance(v, list) else v) for v in inputs]
    if len({repr(o) for o in outputs}) < config.min_distinct_outputs:
        return None
    method = rng.choice(METHOD_NAMES)
    out_type = _out_type(pipeline, in_type)
    cases = [_case(in_type, i, o) for i, o in zip(inputs, outputs)]
    problem = Problem(
        problem_id=problem_id,
        source="synthetic",
        difficulty=f"d{depth}",
        description=_with_examples(_describe(pipeline, in_type, infer), cases[:n_examples]),
        starter_code=f"class Solution:\n    def {method}(self, {PARAMETER_NAME[in_type]}: {_ANNOTATION[in_type]}) -> "
                     f"{_ANNOTATION[out_type]}:\n        ",
        method_name=method,
        setup_code="",
        tests=tuple(cases[n_examples:]),
        reference_solution=render_solution(pipeline, method, in_type),
        examples=tuple(cases[:n_examples]),
    )
    return problem, pipeline, in_type


def depth_counts(n: int, depth_mix: tuple[float, float, float]) -> tuple[int, int, int]:
    """Exact per-depth counts for n problems (largest remainder), so the mix is met to within one problem."""
    raw = [n * share for share in depth_mix]
    counts = [int(r) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def generate_split(split: str, n: int, seed: int, config: GrammarConfig = GrammarConfig(),
                   max_attempts_per_problem: int = 10_000) -> list[SyntheticProblem]:
    """n problems of `split`, deterministic from (split, n, seed, config).

    Depth counts follow `depth_counts`; within each depth the infer share is exact (rounded) and the modes are
    `reward.partition.partition_modes` of that depth's ids (the real data's even seeded partition over MODES);
    each problem's signature belongs to `split` (see split_of_signature).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}\0{split}")
    out: list[SyntheticProblem] = []
    for depth, count in zip((1, 2, 3), depth_counts(n, config.depth_mix)):
        n_infer = round(count * config.infer_share)
        infer_flags = [True] * n_infer + [False] * (count - n_infer)
        rng.shuffle(infer_flags)
        ids = [f"syn-{split}-{seed}-{len(out) + i:06d}" for i in range(count)]
        modes = partition_modes(ids, seed=rng.randrange(2**31))
        for infer, problem_id in zip(infer_flags, ids):
            for _ in range(max_attempts_per_problem):
                drawn = _try_problem(rng, depth, infer, split, config, problem_id)
                if drawn is not None:
                    break
            else:
                raise RuntimeError(f"no valid depth-{depth} infer={infer} {split} problem in "
                                   f"{max_attempts_per_problem} draws: the grammar/config leaves none")
            problem, pipeline, in_type = drawn
            out.append(SyntheticProblem(problem, pipeline, in_type, infer, modes[problem_id], split))
    return out


def wrong_variants(sp: SyntheticProblem, rng: random.Random, n: int = 1) -> list[Pipeline]:
    """Up to n plausible wrong pipelines: one op swapped for a confusable op, a constant moved, or an op dropped.

    Each returned pipeline fails at least one of the problem's hidden tests (checked by running it).
    """
    inputs = [_eval_input(t.input_expr) for t in sp.problem.tests]
    expected = [run_pipeline(sp.pipeline, _copy(i)) for i in inputs]
    found: list[Pipeline] = []
    for _ in range(20 * n):
        cand = _mutate(sp.pipeline, sp.in_type, rng)
        if cand is None or cand in found:
            continue
        if any(run_pipeline(cand, _copy(i)) != e for i, e in zip(inputs, expected)):
            found.append(cand)
            if len(found) == n:
                break
    return found


def _mutate(pipeline: Pipeline, in_type: str, rng: random.Random) -> Pipeline | None:
    i = rng.randrange(len(pipeline))
    step = pipeline[i]
    kind = rng.choice(("swap", "constant", "drop"))
    if kind == "constant" and step.params:
        name, value = rng.choice(step.params)
        domain = dict(step.spec.params)[name]
        new = rng.choice([d for d in domain if d != value])
        return pipeline[:i] + (Step(step.op, tuple((k, new if k == name else v) for k, v in step.params)),) \
            + pipeline[i + 1:]
    if kind == "drop" and len(pipeline) > 1:
        cand = pipeline[:i] + pipeline[i + 1:]
        return cand if _types_chain(cand, in_type) and _out_type(cand, in_type) == _out_type(pipeline, in_type) \
            else None
    alt = OP_BY_NAME[rng.choice(CONFUSABLE[step.op])]
    return pipeline[:i] + (_draw_step(rng, alt),) + pipeline[i + 1:]


def _types_chain(pipeline: Pipeline, in_type: str) -> bool:
    cur = in_type
    for step in pipeline:
        if step.spec.in_type != cur:
            return False
        cur = step.spec.out_type
    return True


def _eval_input(input_expr: str) -> Any:
    # input_expr is "<param> = <literal>" as written by _case.
    return ast.literal_eval(input_expr.split("=", 1)[1].strip())


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value
