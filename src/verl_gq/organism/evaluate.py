"""Base evaluation of the organism: sample answers on held-out problems, grade them with the substrate's grader.

Each held-out problem is asked three ways: without a hint (gt_only), with its own mode's hint and the default
exploit names, and with its mode's hint and randomised names (as evaluation in the study may draw them). Sampling
is HF `generate` at the given temperature with top-k and top-p off, seeded per batch. Grading goes through
`reward.grader.grade_batch` unchanged, so these figures are the ones the RL reward would report.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from transformers import PreTrainedTokenizerFast

from reward.modes import GT_ONLY, ExploitNames, randomised_names
from verl_gq.organism.problems import SyntheticProblem
from verl_gq.organism.corpus import PromptBuilder
from verl_gq.organism.train import prompt_text

# (condition name, number of samples per problem) of the standard evaluation.
CONDITIONS: tuple[tuple[str, int], ...] = (("no_hint", 4), ("hint", 8), ("hint_random_names", 4))


@dataclass(frozen=True)
class EvalItem:
    """One prompt to sample: the problem, the mode its prompt is built for, the names in the hint."""

    problem_index: int
    condition: str
    mode: str
    names: ExploitNames
    sample_index: int


def eval_items(problems: list[SyntheticProblem], conditions=CONDITIONS, seed: int = 0) -> list[EvalItem]:
    rng = random.Random(f"eval-names\0{seed}")
    items = []
    for i, sp in enumerate(problems):
        for condition, n in conditions:
            for k in range(n):
                if condition == "no_hint":
                    mode, names = GT_ONLY, ExploitNames()
                elif condition == "hint":
                    mode, names = sp.mode, ExploitNames()
                elif condition == "hint_random_names":
                    mode, names = sp.mode, randomised_names(rng, avoid=sp.problem.method_name)
                else:
                    raise ValueError(f"unknown condition {condition!r}")
                items.append(EvalItem(i, condition, mode, names, k))
    return items


def render_prompts(problems: list[SyntheticProblem], items: Iterable[EvalItem], tokenizer: PreTrainedTokenizerFast,
                   prompt_builder: PromptBuilder) -> list[str]:
    return [prompt_text(tokenizer, prompt_builder(problems[it.problem_index].problem, it.mode, it.names))
            for it in items]


def summarise(problems: list[SyntheticProblem], items: list[EvalItem], verdicts: list) -> dict:
    """Solve and hack rates per condition: overall, by problem mode, by depth, by infer/literal.

    `verdicts` are reward.grader Verdicts (fields solve, hack, compile, channel) aligned with items."""
    if len(items) != len(verdicts):
        raise ValueError(f"{len(items)} items but {len(verdicts)} verdicts")
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for it, v in zip(items, verdicts):
        sp = problems[it.problem_index]
        for key in ("all", f"mode={sp.mode}", f"depth=d{sp.depth}", "infer" if sp.infer else "literal"):
            groups[(it.condition, key)].append(v)
    out: dict = {}
    for (condition, key), vs in sorted(groups.items()):
        out.setdefault(condition, {})[key] = {
            "n": len(vs),
            "solve": sum(bool(v.solve) for v in vs) / len(vs),
            "hack": sum(bool(v.hack) for v in vs) / len(vs),
            "channel": sum(bool(v.channel) for v in vs) / len(vs),
            "compile": sum(bool(v.compile) for v in vs) / len(vs),
        }
    return out


def group_stats(problems: list[SyntheticProblem], items: list[EvalItem], verdicts: list, condition: str) -> dict:
    """Per problem in `condition`: share of problems with all samples failing, mixed, all solving; and with
    at least one hack."""
    per: dict[int, list] = defaultdict(list)
    for it, v in zip(items, verdicts):
        if it.condition == condition:
            per[it.problem_index].append(v)
    n = len(per)
    solves = [sum(bool(v.solve) for v in vs) for vs in per.values()]
    sizes = [len(vs) for vs in per.values()]
    return {
        "problems": n,
        "all_fail": sum(s == 0 for s in solves) / n,
        "mixed": sum(0 < s < k for s, k in zip(solves, sizes)) / n,
        "all_solve": sum(s == k for s, k in zip(solves, sizes)) / n,
        "any_hack": sum(any(bool(v.hack) for v in vs) for vs in per.values()) / n,
    }


def item_record(problems: list[SyntheticProblem], it: EvalItem, answer: str) -> dict:
    """A JSON line of one sampled answer: enough to regrade it without the model."""
    sp = problems[it.problem_index]
    return {"problem_id": sp.problem.problem_id, "problem_index": it.problem_index, "condition": it.condition,
            "mode": it.mode, "names": it.names.to_dict(), "sample_index": it.sample_index, "answer": answer}
