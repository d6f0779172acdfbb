"""One-backward capture of per-rollout and per-token knob gradients equals per-sample autograd, exactly (float64),
on tiny Qwen2 and Qwen3, for verl-like padded batches and packed (cu_seqlens) batches, with and without gradient
checkpointing."""

from collections import Counter

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from verl_gq.adapter import EFFECTIVE, QuarantineAdapterConfig, inject_quarantine_adapter, knob_scale
from verl_gq.routing import KnobGradientCapture, Segments

VOCAB = 97
RANK = 6
TOLERANCE = 1e-13
# (prompt length, response length) per rollout; prompts are left-padded, responses right-padded, as in verl.
LENGTHS = [(3, 4), (5, 2), (2, 5), (4, 3)]
ADVANTAGES = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)


# tiny matrices run faster on one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_adapted_model(family: str, checkpointing: bool, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    model = model.to(dtype)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for knob in adapter.knob_parameters():  # away from 0 so every term of the product matters
            knob.copy_(torch.randn(knob.shape, generator=generator, dtype=torch.float64) * 0.3)
    if checkpointing:
        model.gradient_checkpointing_enable()  # verl's setting: use_reentrant=False (the HF default)
        model.train()
    else:
        model.eval()
    return model, adapter


def rollouts():
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randint(1, VOCAB, (p,), generator=generator), torch.randint(1, VOCAB, (r,), generator=generator))
        for p, r in LENGTHS
    ]


def padded_batch():
    """verl layout: [left-padded prompt | right-padded response], explicit position ids."""
    prompt_len, response_len = max(p for p, _ in LENGTHS), max(r for _, r in LENGTHS)
    n, length = len(LENGTHS), prompt_len + response_len
    input_ids = torch.zeros(n, length, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    response_mask = torch.zeros(n, length, dtype=torch.bool)
    for row, (prompt, response) in enumerate(rollouts()):
        start, end = prompt_len - len(prompt), prompt_len + len(response)
        input_ids[row, start:end] = torch.cat([prompt, response])
        attention_mask[row, start:end] = 1
        response_mask[row, prompt_len:end] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    segments = Segments.padded(n, length, position_mask=attention_mask, token_mask=attention_mask.bool())
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids), response_mask, segments


def packed_batch():
    """verl's remove-padding layout: (1, total) tokens, position ids restarting per rollout, plus 3 trailing pad
    positions that belong to no rollout."""
    ids, positions, response, cu = [], [], [], [0]
    for prompt, resp in rollouts():
        ids += [prompt, resp]
        positions.append(torch.arange(len(prompt) + len(resp)))
        response += [torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(resp), dtype=torch.bool)]
        cu.append(cu[-1] + len(prompt) + len(resp))
    ids.append(torch.zeros(3, dtype=torch.long))
    positions.append(torch.arange(3))
    response.append(torch.zeros(3, dtype=torch.bool))
    input_ids, position_ids = torch.cat(ids)[None], torch.cat(positions)[None]
    token_mask = torch.arange(input_ids.shape[1]) < cu[-1]
    segments = Segments.packed(torch.tensor(cu), input_ids.shape[1], token_mask=token_mask)
    return dict(input_ids=input_ids, position_ids=position_ids), torch.cat(response)[None], segments


def rollout_losses(model, inputs, response_mask, example_of_position):
    """L_i = -A_i * sum_{t in response_i} log p(y_t) / n_response_tokens (verl's token-mean policy loss, ratio 1)."""
    logits = model(**inputs, use_cache=False).logits
    log_probs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    mask = response_mask[:, 1:].to(torch.float64)
    per_position = -(log_probs * mask).reshape(-1) / mask.sum()
    owner = example_of_position.reshape(response_mask.shape)[:, 1:].reshape(-1)
    valid = owner < len(LENGTHS)
    losses = torch.zeros(len(LENGTHS), dtype=torch.float64).index_add(0, owner[valid], per_position[valid])
    return ADVANTAGES * losses


def padded_rows_batch():
    """The padded layout with each batch row one rollout whole, padding included (no masks): the broadcast stash."""
    inputs, response_mask, _ = padded_batch()
    return inputs, response_mask, Segments.padded(*response_mask.shape)


BATCHES = {"padded": padded_batch, "padded_rows": padded_rows_batch, "packed": packed_batch}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("layout", list(BATCHES))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "grad_ckpt"])
@pytest.mark.parametrize("knob_totals", [False, True], ids=["knobs_detached", "knob_totals"])
def test_captured_rollout_and_token_gradients_equal_per_sample_autograd(family, layout, checkpointing, knob_totals):
    model, adapter = tiny_adapted_model(family, checkpointing)
    adapter.knob_gradient_totals = knob_totals
    inputs, response_mask, segments = BATCHES[layout]()

    forward_calls = []
    hook = adapter.layers["model.layers.0.mlp.down_proj"].register_forward_pre_hook(lambda *_: forward_calls.append(1))
    capture = KnobGradientCapture(adapter, mode="stash")
    with capture:
        capture.set_segments(segments)
        rollout_losses(model, inputs, response_mask, segments.example_of_position).sum().backward()
    hook.remove()
    assert len(forward_calls) == (2 if checkpointing else 1), "checkpointing should re-run the forward in backward"
    assert segments.batch_rows == (layout == "padded_rows"), "only whole padded rows take the broadcast stash"
    per_example = capture.per_example_gradients()
    for name, layer in adapter.layers.items():  # FSDP1's post-backward hooks need a knob gradient; FSDP2's do not
        if not knob_totals:
            assert layer.knobs.grad is None, (
                "stash mode should keep the knobs out of the backward (the caller writes their gradients)"
            )
            continue
        assert torch.allclose(layer.knobs.grad[:, EFFECTIVE], per_example[name].sum(0), rtol=0, atol=1e-13), (
            "with knob_gradient_totals, stash mode should leave autograd's own dL/ds (the stash rows' sum) on "
            "the effective column"
        )
        assert torch.all(layer.knobs.grad[:, 1:] == 0), "and nothing on the quarantines (as trained, they act nowhere)"

    # Per rollout: autograd of each rollout's own loss, ordinary forward (no capture installed).
    losses = rollout_losses(model, inputs, response_mask, segments.example_of_position)
    knobs = adapter.knob_parameters()
    worst_rollout = 0.0
    for i in range(len(LENGTHS)):
        reference = torch.autograd.grad(losses[i], knobs, retain_graph=True)
        for name, grad in zip(adapter.layers, reference):
            worst_rollout = max(worst_rollout, (per_example[name][i] - grad[:, EFFECTIVE]).abs().max().item())
    assert worst_rollout < TOLERANCE, f"captured per-rollout gradients should equal per-sample autograd ({worst_rollout:.2e})"

    if segments.token_positions is None:
        return
    per_token = capture.per_token_gradients()

    # Per token: autograd gradient of a per-position copy of the knob scale.
    copies = {}

    def per_position_copy(name):
        def apply(a, knobs, view):
            if name not in copies:
                scale = knob_scale(knobs, view).detach()
                copies[name] = scale.expand(a.numel() // RANK, RANK).clone().requires_grad_(True)
            return a * copies[name].reshape(a.shape)

        return apply

    for name, layer in adapter.layers.items():
        layer.knob_application = per_position_copy(name)
    try:
        total = rollout_losses(model, inputs, response_mask, segments.example_of_position).sum()
        reference = dict(zip(copies, torch.autograd.grad(total, list(copies.values()))))
    finally:
        for layer in adapter.layers.values():
            layer.knob_application = None
    worst_token = max(
        (per_token[name] - reference[name][segments.token_positions]).abs().max().item() for name in adapter.layers
    )
    assert worst_token < TOLERANCE, f"per-token gradients should equal the per-position knob copy's ({worst_token:.2e})"

    # The stashed tokens here are all of each rollout's positions: they must sum to the rollout's gradient.
    worst_sum = max(
        (torch.zeros_like(per_example[name]).index_add_(0, segments.example_of_token, per_token[name]) - per_example[name])
        .abs().max().item()
        for name in adapter.layers
    )
    assert worst_sum < TOLERANCE, f"a rollout's token gradients should sum to its gradient ({worst_sum:.2e})"
    print(f"{family}/{layout}/ckpt={checkpointing}: rollout {worst_rollout:.1e} token {worst_token:.1e} sum {worst_sum:.1e}")


def test_plain_mode_sends_the_whole_gradient_to_the_effective_knob_and_the_stash_sums_to_it():
    """In a deployed view the quarantine acts (-q_j), so ordinary autograd gives it -dL/ds; plain capture (the vanilla
    path) gives the effective knob the whole gradient and the quarantines none, in any view; the stash rows sum to
    dL/ds."""
    model, adapter = tiny_adapted_model("qwen2", checkpointing=False)
    adapter.set_view("quarantine")
    inputs, response_mask, segments = padded_batch()

    def loss():
        return rollout_losses(model, inputs, response_mask, segments.example_of_position).sum()

    knobs = adapter.knob_parameters()
    autograd = dict(zip([id(k) for k in knobs], torch.autograd.grad(loss(), knobs)))
    with KnobGradientCapture(adapter, mode="plain"):
        loss().backward()
    plain = {id(k): k.grad for k in knobs}
    for knob in knobs:
        knob.grad = None
    capture = KnobGradientCapture(adapter, mode="stash")
    with capture:
        capture.set_segments(segments)
        loss().backward()
    stash = capture.per_example_gradients()
    for name, layer in adapter.layers.items():
        effective, quarantine = autograd[id(layer.knobs)].unbind(1)
        assert torch.equal(quarantine, -effective), "deployed without quarantine q: dL/dq = -dL/ds"
        plain_effective, plain_quarantine = plain[id(layer.knobs)].unbind(1)
        assert torch.allclose(plain_effective, effective, rtol=0, atol=1e-15), "plain: s gets the whole gradient"
        assert torch.all(plain_quarantine == 0), "plain (vanilla) mode should give the quarantine knob nothing"
        assert torch.allclose(stash[name].sum(0), effective, rtol=0, atol=1e-14), "stash rows should sum to dL/ds"


def test_capture_rejects_bad_use_clearly():
    model, adapter = tiny_adapted_model("qwen2", checkpointing=False)
    inputs, response_mask, segments = padded_batch()
    with pytest.raises(ValueError, match="capture mode"):
        KnobGradientCapture(adapter, mode="both")
    capture = KnobGradientCapture(adapter, mode="stash")
    with capture, pytest.raises(RuntimeError, match="set_segments"):
        model(**inputs, use_cache=False)
    with capture, pytest.raises(ValueError, match="positions .* but the segments describe"):
        capture.set_segments(Segments.padded(2, 3))
        model(**inputs, use_cache=False)
    n, length = response_mask.shape
    with capture, pytest.raises(ValueError, match=f"describe {length} batch rows of {n * length}"):
        capture.set_segments(Segments.padded(length, n))  # as many positions, other rows: no broadcast fits
        model(**inputs, use_cache=False)
    with capture:
        capture.set_segments(segments)
        with pytest.raises(RuntimeError, match="lacks"):
            capture.per_example_gradients()
        with pytest.raises(RuntimeError, match="one capture at a time"):
            KnobGradientCapture(adapter).__enter__()
    with pytest.raises(ValueError, match="position_mask has shape"):
        Segments.padded(4, 9, position_mask=torch.ones(4, 8))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        Segments.packed(torch.tensor([0, 5, 3]), 10)
    with pytest.raises(ValueError, match="end <= n_positions"):
        Segments.packed(torch.tensor([0, 5, 12]), 10)
    with pytest.raises(ValueError, match="belong to no example"):
        Segments.packed(torch.tensor([0, 5]), 8, token_mask=torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["padded", "padded_rows"])
def test_stash_saves_at_most_one_gathered_scale_per_module_in_the_activations_dtype(layout):
    """The stash's memory beyond vanilla's: per module, autograd keeps the gathered per-position scale (positions x r,
    in the activations' dtype: bf16 here) instead of plain mode's (r,) scale, plus one shared row index. At r = 64
    that is 64 x 2 bytes per position and module; a float32 copy, or anything saved per token beyond it, fails.
    Whole batch rows save only their (batch, 1, r) scale rows instead of plain mode's (r,) scale."""
    model, adapter = tiny_adapted_model("qwen3", checkpointing=False, dtype=torch.bfloat16)
    inputs, _, segments = BATCHES[layout]()
    parameters = {p.data_ptr() for p in model.parameters()}

    def saved_for_backward(mode):
        saved = {}

        def pack(tensor):
            if tensor.data_ptr() not in parameters:
                saved[tensor.untyped_storage().data_ptr()] = (tuple(tensor.shape), tensor.dtype)
            return tensor

        capture = KnobGradientCapture(adapter, mode=mode)
        with capture, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            capture.set_segments(segments)
            loss = model(**inputs).logits.float().sum()  # kept alive: no storage is freed and reused meanwhile
        del loss
        return list(saved.values())

    plain, stash = saved_for_backward("plain"), saved_for_backward("stash")
    only_stash = list((Counter(stash) - Counter(plain)).elements())
    if segments.batch_rows:
        rows = ((segments.n_examples, 1, RANK), torch.bfloat16)
        assert only_stash and all(entry == rows for entry in only_stash), f"batch rows should save {rows}: {only_stash}"
        assert len(only_stash) <= len(adapter.layers), f"at most one scale-row leaf per module ({len(only_stash)})"
        return
    gathered = [entry for entry in only_stash if entry != ((segments.n_positions,), torch.int64)]
    assert len(only_stash) - len(gathered) <= 1, f"stash mode should save one row index, saved {only_stash}"
    assert gathered and all(entry == ((*inputs["input_ids"].shape, RANK), torch.bfloat16) for entry in gathered), (
        f"stash mode should save only (batch, seq, r) bf16 gathered scales beyond plain mode's tensors: {gathered}"
    )
    assert len(gathered) <= len(adapter.layers), f"at most one gathered scale per module ({len(gathered)})"


def test_response_segments_score_each_response_token_at_the_position_before_it():
    """Two sequences, prompt 2 + response 3 and prompt 3 + response 1 (lengths 5 and 4). Token j of a response is
    scored by the logits of the position before it: positions 1, 2, 3 (sequence 0) and 7 (sequence 1) when packed,
    packed to 10 positions (9 real + 1 of padding, which belongs to no rollout); rows 0 and 1 at positions 1, 2, 3
    and 2 when padded to width 5."""
    seq_lens, prompt_lens = torch.tensor([5, 4]), torch.tensor([2, 3])
    packed = Segments.of_packed_responses(torch.tensor([0, 5, 9]), prompt_lens, 10, per_token=True)
    assert packed.token_positions.tolist() == [1, 2, 3, 7]
    assert packed.example_of_position.tolist() == [0] * 5 + [1] * 4 + [2]
    assert Segments.of_packed_responses(torch.tensor([0, 5, 9]), prompt_lens, 10, per_token=False).token_positions is None

    padded = Segments.of_padded_responses(seq_lens, prompt_lens, per_token=True)
    assert padded.token_positions.tolist() == [1, 2, 3, 5 + 2]
    assert padded.example_of_position.tolist() == [0] * 5 + [1] * 4 + [2], "row 1's padding belongs to no rollout"
    rows = Segments.of_padded_responses(seq_lens, prompt_lens, per_token=False)
    assert rows.batch_rows and rows.token_positions is None and rows.example_of_position.tolist() == [0] * 5 + [1] * 5
