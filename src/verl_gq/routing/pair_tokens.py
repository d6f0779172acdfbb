"""Pair texts to token ids, as the training run will see a completion: the prompt through the chat template with
the generation prompt, then the completion and EOS."""

from __future__ import annotations

from typing import Any, Sequence

from verl_gq.routing.direction import Pair


def tokenize_pairs(pairs: Sequence[Any], tokenizer: Any, max_tokens: int) -> list[Pair]:
    """Token-id `Pair`s of pair records (with .pair_id, .mode, .prompt (chat messages), .clean, .hack: reward.pairs).

    A pair longer than `max_tokens` (prompt + the longer completion) is an error naming it, never cut silently."""
    eos = tokenizer.eos_token_id
    out = []
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(list(pair.prompt), add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        clean = tokenizer(pair.clean, add_special_tokens=False)["input_ids"] + [eos]
        hack = tokenizer(pair.hack, add_special_tokens=False)["input_ids"] + [eos]
        longest = len(prompt_ids) + max(len(clean), len(hack))
        if longest > max_tokens:
            raise ValueError(f"pair {pair.pair_id}: {longest} tokens exceed max_pair_tokens={max_tokens}; raise the "
                             "limit or drop the pair (pairs are never cut silently)")
        out.append(Pair(prompt_ids=prompt_ids, clean_ids=clean, hack_ids=hack, mode=pair.mode))
    return out
