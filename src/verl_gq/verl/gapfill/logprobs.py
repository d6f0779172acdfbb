"""Token log-probabilities for the gq engine where verl would loop over tokens.

Without flash-attn's cross-entropy kernel (and off NPU), verl 0.9.1 computes log-probs with
`logprobs_from_logits_v2` (verl/utils/torch_functional.py:180-210). It loops over the first dimension of the logits
to bound peak memory, and the FSDP engine hands it (tokens, vocab) logits (verl/workers/engine/fsdp/
transformer_impl.py:1428 and :1522). So every token is its own logsumexp (fp32) or log_softmax (bf16) launch. On an
H100 without flash-attn a 7.6M-parameter model spent 5-8 s on a forward-only pass over 256 x 528 tokens that way, the
GPU idle and one CPU core busy: 34k kernel launches per micro-batch.

`chunked_logprobs_from_logits` computes the same values row block by row block, each block under a fixed element
budget, so peak memory stays bounded as in verl and the launches are a few per micro-batch. The gq engine swaps it in
for verl's name only while its own `prepare_model_outputs` runs, and only where verl would take the v2 path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from verl_gq.verl.internals import fsdp_logprob_module

# elements of one block of logits: 256 MiB in fp32, the extra memory of a logsumexp/log_softmax over one block
BLOCK_ELEMENTS = 1 << 26


def chunked_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True,
                                 block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """log softmax(logits)[labels] over the last dimension, for logits of any leading shape; the same arithmetic as
    verl's `logprobs_from_logits_v2` (fp32/fp64: label logit minus logsumexp; lower precisions: log_softmax in the
    logits' dtype, then gather). `inplace_backward` is accepted for verl's signature and has no effect here."""
    del inplace_backward
    vocab = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} should be the logits' shape {tuple(logits.shape)} without the "
                         "vocabulary dimension")
    flat_logits, flat_labels = logits.reshape(-1, vocab), labels.reshape(-1, 1)
    rows = max(1, block_elements // max(vocab, 1))
    blocks = []
    for block, block_labels in zip(flat_logits.split(rows), flat_labels.split(rows)):
        if block.dtype in (torch.float32, torch.float64):
            blocks.append(block.gather(-1, block_labels).squeeze(-1) - torch.logsumexp(block, dim=-1))
        else:
            blocks.append(F.log_softmax(block, dim=-1).gather(-1, block_labels).squeeze(-1))
    if not blocks:
        return flat_logits.new_empty(labels.shape)
    return torch.cat(blocks).reshape(labels.shape)


def verl_loops_over_tokens() -> bool:
    """True where verl 0.9.1's `logprobs_from_logits` would take its per-row v2 path (its own test, verbatim)."""
    from verl.utils import torch_functional as verl_F

    flash = verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return not flash and not verl_F.NPU_CROSS_ENTROPY_LOSS_AVAILABLE


@contextmanager
def chunked_logprobs_in_fsdp_engine() -> Iterator[None]:
    """Within the block, verl's FSDP engine module computes log-probs with `chunked_logprobs_from_logits` (where it
    would otherwise loop over tokens); restored on exit."""
    if not verl_loops_over_tokens():
        yield
        return
    transformer_impl = fsdp_logprob_module()
    saved = transformer_impl.logprobs_from_logits
    transformer_impl.logprobs_from_logits = chunked_logprobs_from_logits
    try:
        yield
    finally:
        transformer_impl.logprobs_from_logits = saved
