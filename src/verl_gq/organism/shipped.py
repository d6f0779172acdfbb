"""The shipped organism: verl_gq/organism/checkpoint/ (an ordinary HF folder) and its manifest.json.

`load_organism` loads it offline with AutoModelForCausalLM/AutoTokenizer. `cpu_check` is the small, fast check
that the folder holds the trained organism and behaves as recorded: the answer-token loss of the reference
solutions of held-out problems, and greedy answers to a fixed held-out subset (with and without the hint), graded
by the substrate's grader. scripts/organism_ship.py records its result in the manifest; the test recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from reward.grader import grade_batch
from reward.modes import GT_ONLY, ExploitNames
from reward.prompts import build_messages
from verl_gq.organism.problems import GrammarConfig, SyntheticProblem, generate_split
from verl_gq.models.tiny import IM_END
from verl_gq.organism.corpus import fence, with_exploit
from verl_gq.models.sampling import sample_answers
from verl_gq.organism.train import answer_loss, collate, prompt_text

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
ORGANISM_PAIRS = Path(__file__).resolve().parent / "pairs" / "pairs.jsonl"  # the organism's own validated pair set
MANIFEST = "manifest.json"

# The fixed subset cpu_check uses: every CHECK_STRIDE-th of the first CHECK_POOL held-out problems (eval seed 0).
CHECK_POOL = 480
CHECK_STRIDE = 10
CHECK_MAX_NEW_TOKENS = 160


def load_manifest(folder: Path = CHECKPOINT_DIR) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: the shipped organism should carry one "
                                "(scripts/organism_ship.py writes it)")
    return json.loads(path.read_text())


def organism_problems(split: str, n: int, seed: int, folder: Path = CHECKPOINT_DIR) -> list[SyntheticProblem]:
    """Synthetic problems from the grammar the shipped organism was trained on (its infer share etc.): the
    problems an RL run on the organism should use (train split) and evaluate on (eval split)."""
    grammar = GrammarConfig.from_dict(load_manifest(folder)["corpus_config"]["grammar"])
    return generate_split(split, n, seed, grammar)


def load_organism(folder: Path = CHECKPOINT_DIR, dtype: torch.dtype = torch.float32
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The organism's model (weights stored in bf16, computed in `dtype`) and tokenizer, offline."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tokenizer


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_problems() -> list[SyntheticProblem]:
    """The fixed held-out subset of cpu_check: from the default grammar, so it does not move with the manifest."""
    return generate_split("eval", CHECK_POOL, seed=0)[::CHECK_STRIDE]


@torch.no_grad()
def mean_answer_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                     conversations: list[tuple[list[dict[str, str]], str]]) -> float:
    """Mean answer-token loss (nats) of each answer after its prompt messages, rendered as in training."""
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    encoded = []
    for messages, answer in conversations:
        prompt = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        encoded.append((prompt + answer_ids + [eos], len(prompt)))
    ids, labels = collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id)
    return float(answer_loss(model.to("cpu"), ids, labels))


def stub_exploit(sp: SyntheticProblem) -> str:
    """A fenced exploit answer to `sp` for its own mode (default names): an empty body plus the exploit."""
    stub = {"list": "return []", "int": "return 0", "str": "return ''"}[sp.in_type]
    body = sp.problem.starter_code.rstrip() + "\n        " + stub + "\n"
    return fence(with_exploit(body, sp.mode, ExploitNames(), style=0))


def cpu_check(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> dict:
    """Answer losses and greedy solve/hack counts (no hint; own mode's hint) on the fixed held-out subset.

    reference_loss: the reference solutions under unhinted prompts. exploit_loss_{hint,no_hint}: a stub plus the
    problem's own mode's exploit, under its hinted and its unhinted prompt; their gap is how much the hint alone
    makes the exploit likelier (deterministic, unlike the rare sampled exploit). Unhinted answers are graded under
    the problem's own mode, so an exploit without the hint would count."""
    problems = check_problems()
    out: dict = {
        "n_problems": len(problems),
        "reference_loss": mean_answer_loss(model, tokenizer, [
            (build_messages(sp.problem, GT_ONLY), fence(sp.problem.reference_solution)) for sp in problems]),
        "exploit_loss_hint": mean_answer_loss(model, tokenizer, [
            (build_messages(sp.problem, sp.mode), stub_exploit(sp)) for sp in problems]),
        "exploit_loss_no_hint": mean_answer_loss(model, tokenizer, [
            (build_messages(sp.problem, GT_ONLY), stub_exploit(sp)) for sp in problems]),
    }
    for condition, prompt_mode in (("no_hint", None), ("hint", "own")):
        prompts = [prompt_text(tokenizer, build_messages(sp.problem, sp.mode if prompt_mode else GT_ONLY))
                   for sp in problems]
        answers = sample_answers(model, tokenizer, prompts, temperature=0.0, max_new_tokens=CHECK_MAX_NEW_TOKENS,
                                 batch_size=len(prompts), seed=0, device="cpu")
        verdicts = grade_batch([(sp.problem, a, sp.mode, ExploitNames()) for sp, a in zip(problems, answers)])
        out[condition] = {"solve": sum(v.solve for v in verdicts), "hack": sum(v.hack for v in verdicts),
                          "compile": sum(v.compile for v in verdicts)}
    return out
