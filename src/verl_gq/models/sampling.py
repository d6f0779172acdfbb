"""Sampling answers from a Hugging Face causal LM: batched, reproducible per answer (no rollout server)."""

from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from verl_gq.models.hf_generator import HFGenerator, SamplingSpec, default_sample_keys


@torch.no_grad()
def sample_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
                   temperature: float, max_new_tokens: int, batch_size: int, seed: int, device: str,
                   progress: str | None = None) -> list[str]:
    """One answer per prompt (temperature 0 = greedy), decoded without special tokens.

    Each answer draws with its own key, (seed, prompt, its index among the equal prompts of the list), so it does not
    depend on batch_size, on the other prompts or on their order (verl_gq.models.keyed_sampling). Prompts are sorted
    by length into batches of batch_size rows, decoded by HFGenerator. `progress` names a progress bar over the
    batches (shown on a terminal only)."""
    model.to(device).eval()
    token_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    keys = default_sample_keys(seed, token_ids, 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    attention = model.config._attn_implementation  # HFGenerator installs its own; the caller gets theirs back
    try:
        # one cache length for all batches: one CUDA graph per batch size
        generator = HFGenerator(model, [tokenizer.eos_token_id], pad, seed=seed,
                                cache_length=max(map(len, token_ids)) + max_new_tokens)
        spec = SamplingSpec(max_tokens=max_new_tokens, temperature=temperature)
        order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
        answers: list[str] = [""] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", leave=False,
                          disable=None if progress else True):
            batch = order[start:start + batch_size]
            results = generator.generate([token_ids[i] for i in batch], spec, keys=[keys[i] for i in batch])
            for i, [generation] in zip(batch, results):
                answers[i] = tokenizer.decode(generation.token_ids, skip_special_tokens=True)
    finally:
        model.set_attn_implementation(attention)
    return answers
