"""The keyed sampler: a row's draw depends only on its key, position and logits; the draws follow the softmax.

Everything here is deterministic (fixed keys), so the statistical checks cannot flake: they either hold for these
keys or the sampler is wrong.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2

from verl_gq.models.keyed_sampling import key_tensor, keyed_uniform, processed_log_probs, sample_key, sample_tokens

CHI2_P_MIN = 1e-3  # fixed keys make each test's p-value a constant; it only has to clear a loose bar


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    statistic = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return float(chi2.sf(statistic, int(keep.sum()) - 1))


def draw_counts(logits: torch.Tensor, rows: int, temperature: float, top_k: int = -1, top_p: float = 1.0,
                salt: str = "counts") -> torch.Tensor:
    keys = key_tensor([sample_key(salt, i) for i in range(rows)], "cpu")
    tokens, _ = sample_tokens(logits.expand(rows, -1), keys, torch.zeros(rows, dtype=torch.long), temperature,
                              top_k, top_p)
    return torch.bincount(tokens, minlength=logits.shape[-1]).double()


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.5, -3.0]])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (1.3, 3, 1.0), (1.0, -1, 0.8)])
def test_keyed_draws_follow_the_processed_softmax(temperature, top_k, top_p):
    counts = draw_counts(LOGITS, 40_000, temperature, top_k, top_p)
    probs = processed_log_probs(LOGITS, temperature, top_k, top_p).exp()[0].double()
    p_value = chi_square_p(counts, probs)
    assert p_value > CHI2_P_MIN, f"draws do not follow the processed softmax: p = {p_value:.2e}, counts {counts}"


def test_draws_at_successive_positions_of_one_key_are_independent():
    """One key over 20k positions: each position's token follows p, and consecutive tokens are independent (the
    pair counts follow p x p)."""
    positions = 20_000
    keys = key_tensor([sample_key("one row")] * positions, "cpu")
    tokens, _ = sample_tokens(LOGITS.expand(positions, -1), keys, torch.arange(positions), 1.0)
    probs = LOGITS.softmax(-1)[0].double()
    vocab = probs.numel()
    assert chi_square_p(torch.bincount(tokens, minlength=vocab).double(), probs) > CHI2_P_MIN
    pairs = torch.bincount(tokens[:-1] * vocab + tokens[1:], minlength=vocab * vocab).double()
    top = probs.argsort(descending=True)[:3]  # cells with enough expected counts for the chi-square
    pair_probs = torch.outer(probs, probs)
    cells = (top[:, None] * vocab + top[None, :]).flatten()
    rest = 1 - pair_probs.flatten()[cells].sum()
    observed = torch.cat([pairs[cells], (pairs.sum() - pairs[cells].sum())[None]])
    expected = torch.cat([pair_probs.flatten()[cells], rest[None]])
    assert chi_square_p(observed, expected) > CHI2_P_MIN, "consecutive positions of one key are correlated"


def test_uniforms_lie_strictly_inside_zero_one_and_are_uniform():
    keys = key_tensor([sample_key("uniform", i) for i in range(64)], "cpu")
    u = keyed_uniform(keys, torch.arange(64), 4096).flatten().double()
    assert u.min() > 0 and u.max() < 1, "-log(-log u) must stay finite"
    counts = torch.histc(u, bins=32, min=0, max=1)
    assert chi_square_p(counts, torch.full((32,), 1 / 32, dtype=torch.double)) > CHI2_P_MIN


def test_a_row_draws_the_same_tokens_alone_in_any_batch_or_order():
    torch.manual_seed(0)
    rows, vocab = 24, 300
    logits = torch.randn(rows, vocab) * 3
    keys = key_tensor([sample_key("row", i) for i in range(rows)], "cpu")
    positions = torch.randint(0, 128, (rows,))
    for temperature, top_k, top_p in [(0.7, -1, 1.0), (1.0, 20, 0.9), (0, -1, 1.0)]:
        together = sample_tokens(logits, keys, positions, temperature, top_k, top_p)
        order = torch.randperm(rows)
        shuffled = sample_tokens(logits[order], keys[order], positions[order], temperature, top_k, top_p)
        for i in range(rows):
            alone = sample_tokens(logits[i:i + 1], keys[i:i + 1], positions[i:i + 1], temperature, top_k, top_p)
            assert torch.equal(alone[0], together[0][i:i + 1]) and torch.equal(alone[1], together[1][i:i + 1])
        assert torch.equal(shuffled[0], together[0][order]) and torch.equal(shuffled[1], together[1][order]), \
            "a row's token and log-prob must not depend on its place in the batch"


def test_different_keys_or_positions_give_different_draws():
    """Over a flat distribution on 1000 tokens, two keys (or two positions of one key) pick the same token with
    probability 1/1000: 2000 pairs may agree a few times, not often."""
    flat = torch.zeros(1, 1000)
    base = [sample_key("pair", i) for i in range(2000)]
    neighbours = [k ^ 1 for k in base]  # keys one bit apart
    def draws(keys, positions):
        return sample_tokens(flat.expand(len(keys), -1), key_tensor(keys, "cpu"), positions, 1.0)[0]
    zero = torch.zeros(2000, dtype=torch.long)
    same_key_twice = draws(base, zero)
    assert torch.equal(same_key_twice, draws(base, zero)), "the same key and position must draw the same token"
    for other, what in [(draws(neighbours, zero), "keys one bit apart"), (draws(base, zero + 1), "next position")]:
        agreements = int((other == same_key_twice).sum())
        assert agreements <= 10, f"{what} agree on {agreements} of 2000 draws (about 2 expected)"


def test_greedy_is_the_argmax_and_needs_no_keys():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    tokens, log_probs = sample_tokens(logits, None, None, 0)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(log_probs, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0])
    with pytest.raises(ValueError, match="key"):
        sample_tokens(logits, None, None, 0.7)


def test_sample_key_is_stable_and_keys_must_fit_64_bits():
    assert sample_key("hf rollout", 41, 3, 0, "abc", 2) == sample_key("hf rollout", 41, 3, 0, "abc", 2)
    assert sample_key("hf rollout", 41, 3, 0, "abc", 2) != sample_key("hf rollout", 42, 3, 0, "abc", 2)
    # a fixed value: keys must not change between processes (no hash randomisation) or releases of this code
    assert sample_key("fixed", 1) == 0x3E62EB8157581966
    with pytest.raises(ValueError, match="2\\*\\*64"):
        key_tensor([1 << 64], "cpu")
