"""sample_answers (offline deploy evaluation, organism scripts): each answer is reproducible on its own."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_gq.models.sampling import sample_answers

PROMPTS = ["What is 2 plus 3?", "You are a helpful assistant. What is 7 plus 1?", "What is 2 plus 3?", "user"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def answers_by_prompt(prompts: list[str], answers: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for prompt, answer in zip(prompts, answers):
        grouped.setdefault(prompt, []).append(answer)
    return {prompt: sorted(group) for prompt, group in grouped.items()}


def test_answers_do_not_depend_on_batch_size_or_order(model_and_tokenizer):
    """Alone or batched, the same answers; in another order, each prompt the same set of answers (a repeated
    prompt's samples are numbered in list order, so reversing the list swaps which copy gets which)."""
    model, tokenizer = model_and_tokenizer
    one_batch = sample_answers(model, tokenizer, PROMPTS, 1.0, 12, batch_size=4, seed=3, device="cpu")
    singles = sample_answers(model, tokenizer, PROMPTS, 1.0, 12, batch_size=1, seed=3, device="cpu")
    reversed_answers = sample_answers(model, tokenizer, PROMPTS[::-1], 1.0, 12, batch_size=3, seed=3, device="cpu")
    assert singles == one_batch, "an answer must not depend on its batch"
    assert answers_by_prompt(PROMPTS[::-1], reversed_answers) == answers_by_prompt(PROMPTS, one_batch)
    assert one_batch[0] != one_batch[2], "two samples of one prompt are two draws"
    assert sample_answers(model, tokenizer, PROMPTS, 1.0, 12, batch_size=4, seed=4, device="cpu") != one_batch


def test_sampling_leaves_the_models_attention_as_it_was(tiny_model_dir, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    before = model.config._attn_implementation
    greedy = sample_answers(model, tokenizer, PROMPTS[:2], 0.0, 8, batch_size=2, seed=0, device="cpu")
    assert model.config._attn_implementation == before
    assert greedy == sample_answers(model, tokenizer, PROMPTS[:2], 0.0, 8, batch_size=1, seed=1, device="cpu"), \
        "greedy answers need no key"
