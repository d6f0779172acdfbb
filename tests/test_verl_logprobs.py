"""The gq engine's log-probs (verl_gq/verl/gapfill/logprobs.py) against verl 0.9.1's own per-row fallback."""

from __future__ import annotations

import pytest
import torch
from verl.utils.torch_functional import logprobs_from_logits_v2
from verl.workers.engine.fsdp import transformer_impl

from verl_gq.verl.gapfill.logprobs import chunked_logprobs_from_logits, chunked_logprobs_in_fsdp_engine, verl_loops_over_tokens


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, labels


@pytest.mark.parametrize("shape", [(37, 50), (3, 11, 50)])
@pytest.mark.parametrize("block_elements", [1 << 26, 4 * 50, 50])  # one block; blocks of 4 rows; one row each
def test_values_and_gradients_equal_verl_fp32(shape, block_elements):
    logits, labels = _logits(shape, torch.float32)
    ours = chunked_logprobs_from_logits(logits, labels, block_elements=block_elements)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    verl = logprobs_from_logits_v2(logits, labels)
    (grad_verl,) = torch.autograd.grad((verl * weights).sum(), logits)
    assert ours.shape == verl.shape == labels.shape
    torch.testing.assert_close(ours, verl, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_verl, rtol=0, atol=1e-6)
    assert (ours <= 0).all(), "log-probabilities are never positive"


def test_bf16_takes_verl_bf16_arithmetic():
    logits, labels = _logits((64, 300), torch.bfloat16)
    ours = chunked_logprobs_from_logits(logits, labels, block_elements=7 * 300)
    verl = logprobs_from_logits_v2(logits, labels)
    assert ours.dtype == verl.dtype == torch.bfloat16
    # the same log_softmax in bf16 row by row or over a block: equal to bf16 resolution
    torch.testing.assert_close(ours.float(), verl.float(), rtol=1e-2, atol=1e-2)


def test_labels_of_the_wrong_shape_are_refused():
    logits, labels = _logits((5, 10), torch.float32)
    with pytest.raises(ValueError, match="labels"):
        chunked_logprobs_from_logits(logits, labels[:4])


def test_engine_swaps_verls_name_only_inside_the_block():
    original = transformer_impl.logprobs_from_logits
    assert verl_loops_over_tokens(), "this CPU box has no flash-attn: verl would loop over tokens"
    with chunked_logprobs_in_fsdp_engine():
        assert transformer_impl.logprobs_from_logits is chunked_logprobs_from_logits
    assert transformer_impl.logprobs_from_logits is original
    with pytest.raises(RuntimeError, match="inside"):
        with chunked_logprobs_in_fsdp_engine():
            raise RuntimeError("inside")
    assert transformer_impl.logprobs_from_logits is original, "restored after an error too"
