"""Batch-independent sampling: each row draws its tokens from its own 64-bit key, never from a shared generator.

A generator shared by a batch hands out random numbers in the order rows happen to sit in the batch, so the same
request decoded alone, with other requests, or in another order gets different tokens. Here the randomness of
row b at response position t for vocabulary entry v is a pure function u(key_b, t, v) (a counter-based integer hash,
computed on the device for the whole [rows, vocab] block at once), and the token is the Gumbel-max draw

    token = argmax_v (log p_v - log(-log u(key, t, v)))

over the processed log-probabilities (temperature, top-k, top-p). That is an exact draw from the categorical
distribution p, and every operation on a row is element-wise or a reduction over that row alone, so a row's tokens
depend only on its key and its logits: not on which rows share its batch, their number, or its place among them.
Temperature 0 is the plain argmax.

`sample_key(*parts)` turns any tuple of identifiers (a run's seed, a training step, a prompt, a sample's index)
into such a key.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
# Multipliers of the 32-bit mixer below (an xorshift-multiply finalizer from Chris Wellons' hash prospector). Both
# are below 2**31, so a 32-bit value times one stays below 2**63: the products are exact in int64 on every device,
# with no reliance on how signed overflow wraps.
_MIX_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)
# Odd constants that separate the hash's inputs (vocabulary index, position, the key's two halves).
_VOCAB_SALT, _POSITION_SALT_LOW, _POSITION_SALT_HIGH = 0x3C6EF372, 0x1B873593, 0x68E31DA4
_UNIFORM_BITS = 23  # (k + 1/2) / 2**23 is exact in float32 and strictly inside (0, 1), so -log(-log u) is finite


def sample_key(*parts: object) -> int:
    """A 64-bit key from identifiers (ints, strings, bytes, tuples of them); equal parts give equal keys."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def token_digest(token_ids: Sequence[int]) -> str:
    """A short stable name for a token sequence (a prompt), for use inside `sample_key`."""
    return hashlib.blake2b(",".join(map(str, token_ids)).encode(), digest_size=16).hexdigest()


def key_tensor(keys: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """64-bit keys as an int64 tensor [rows, 2] of their low and high 32-bit halves (each in [0, 2**32))."""
    for key in keys:
        if not 0 <= key < 1 << 64:
            raise ValueError(f"sample keys must be in [0, 2**64), got {key}")
    return torch.tensor([[k & _MASK32, k >> 32] for k in keys], dtype=torch.long, device=device).reshape(-1, 2)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_MULTIPLIERS[0]) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX_MULTIPLIERS[1]) & _MASK32
    return x ^ (x >> 15)


_vocab_codes: dict[tuple[int, str], torch.Tensor] = {}


def _vocab_code(vocab_size: int, device: torch.device) -> torch.Tensor:
    cache_key = (vocab_size, str(device))
    if cache_key not in _vocab_codes:
        _vocab_codes[cache_key] = _mix32(torch.arange(vocab_size, dtype=torch.long, device=device) ^ _VOCAB_SALT)
    return _vocab_codes[cache_key]


def keyed_uniform(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), float32 [rows, vocab_size]: entry (b, v) is a function of (keys[b], positions[b], v) only.

    `keys` is [rows, 2] from `key_tensor`; `positions` [rows] is each row's response position (tokens drawn so far).
    The row's two 32-bit states each mix one half of the key with the position, and each entry passes through two
    mixing rounds, one per state, so two rows collide only if both states do (a 64-bit event)."""
    positions = positions.to(torch.long)
    state_low = _mix32(keys[:, 0] ^ _mix32((positions ^ _POSITION_SALT_LOW) & _MASK32))[:, None]
    state_high = _mix32(keys[:, 1] ^ _mix32((positions ^ _POSITION_SALT_HIGH) & _MASK32))[:, None]
    bits = _mix32(_mix32(_vocab_code(vocab_size, keys.device) ^ state_low) ^ state_high)
    return ((bits >> (32 - _UNIFORM_BITS)).to(torch.float32) + 0.5) * (2.0 ** -_UNIFORM_BITS)


def processed_log_probs(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities [rows, vocab] of the distribution a token is drawn from: logits / temperature, then top-k, then
    top-p (a token is dropped when the tokens ranked above it already hold top_p of the mass; the top one stays).
    These are the log-probs vLLM reports as `processed_logprobs`, the ones verl's trainer recomputes."""
    if temperature <= 0:
        raise ValueError(f"processed_log_probs needs temperature > 0, got {temperature} (0 is greedy)")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return F.log_softmax(logits, dim=-1)


def sample_tokens(logits: torch.Tensor, keys: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                  temperature: float, top_k: int = -1, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `logits` [rows, vocab] and its log-prob under the processed distribution.

    Temperature 0 is greedy (the argmax, with the unprocessed log-softmax as its log-prob, and no keys needed);
    otherwise the Gumbel-max draw with the rows' `keys` [rows, 2] at `positions` [rows]."""
    if temperature == 0:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]
    if keys is None or positions is None:
        raise ValueError("sampling at temperature > 0 needs each row's key and position")
    log_probs = processed_log_probs(logits, temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(keyed_uniform(keys, positions, logits.shape[-1])))
    tokens = (log_probs + gumbel).argmax(dim=-1)
    return tokens, log_probs.gather(-1, tokens[:, None])[:, 0]
