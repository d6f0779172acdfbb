"""The hf rollout backend's generator and server, on the tiny model, without Ray.

Greedy decoding is compared token for token and log-prob for log-prob against unbatched runs and against a
teacher-forced forward pass: that is what makes rollout log-probs usable as verl's old log-probs. Sampled decoding
is compared across batchings: a request's tokens must depend on its key, never on the requests decoded with it.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from verl_gq.models.hf_generator import HFGenerator, SamplingSpec
from verl_gq.models.keyed_sampling import key_tensor, sample_key, sample_tokens
from verl_gq.verl.gapfill.hf_rollout import HFRolloutServer, HFServerOptions

PROMPTS = [[1, 40, 41, 42], [1, 50], [1, 60, 61, 62, 63, 64, 65], [1, 70, 71]]


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> HFGenerator:
    return HFGenerator.from_pretrained(str(tiny_model_dir), dtype="float32", device="cpu", seed=0)


def teacher_forced_log_probs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> list[float]:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0].tolist()


def test_batched_greedy_equals_one_prompt_at_a_time(generator):
    spec = SamplingSpec(max_tokens=12, temperature=0)
    batched = generator.generate(PROMPTS, spec)
    for prompt, [together] in zip(PROMPTS, batched):
        [[alone]] = generator.generate([prompt], spec)
        assert together.token_ids == alone.token_ids, "left-padded batching must not change greedy tokens"
        assert together.log_probs == pytest.approx(alone.log_probs, abs=1e-5)


def test_greedy_log_probs_equal_teacher_forced_forward(generator):
    [[generation]] = generator.generate([PROMPTS[2]], SamplingSpec(max_tokens=10, temperature=0))
    expected = teacher_forced_log_probs(generator.model, PROMPTS[2], generation.token_ids)
    assert generation.log_probs == pytest.approx(expected, abs=1e-5), "KV-cache decode must match a full forward"


def test_sampled_log_probs_are_temperature_scaled_like_the_trainer(generator):
    [[generation]] = generator.generate([PROMPTS[0]], SamplingSpec(max_tokens=10, temperature=0.7))
    expected = teacher_forced_log_probs(generator.model, PROMPTS[0], generation.token_ids, temperature=0.7)
    assert generation.log_probs == pytest.approx(expected, abs=1e-5)


def test_generation_stops_at_eos_and_reports_stop(tiny_model_dir, generator):
    [[free_run]] = generator.generate([PROMPTS[1]], SamplingSpec(max_tokens=8, temperature=0))
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 8
    eos = free_run.token_ids[3]  # pretend the 4th greedy token is EOS: generation must stop right after it
    first = free_run.token_ids.index(eos)
    stopping = HFGenerator(generator.model, eos_token_ids=[eos], pad_token_id=generator.pad_token_id)
    [[stopped]] = stopping.generate([PROMPTS[1]], SamplingSpec(max_tokens=8, temperature=0))
    assert stopped.token_ids == free_run.token_ids[: first + 1], "the response must end with its first EOS"
    assert stopped.finish_reason == "stop"
    [[ignored]] = stopping.generate([PROMPTS[1]], SamplingSpec(max_tokens=8, temperature=0, ignore_eos=True))
    assert ignored.token_ids == free_run.token_ids, "ignore_eos must decode through EOS"


def test_n_samples_per_prompt_and_per_row_max_tokens(generator):
    results = generator.generate(PROMPTS[:2], SamplingSpec(max_tokens=6, temperature=1.0, n=3), max_tokens=[6, 2])
    assert [len(r) for r in results] == [3, 3], "each prompt gets n samples"
    assert all(len(g.token_ids) == 6 for g in results[0]) and all(len(g.token_ids) == 2 for g in results[1])
    assert len({tuple(g.token_ids) for g in results[0]}) > 1, "n samples at T=1 must not all be identical"


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).repeat(200, 1)
    keys, positions = key_tensor([sample_key("nucleus", i) for i in range(200)], "cpu"), torch.zeros(200)
    tokens, log_probs = sample_tokens(logits, keys, positions, temperature=1.0, top_k=1)
    assert tokens.eq(0).all() and torch.allclose(log_probs, torch.zeros(200))
    probs = logits[0].softmax(-1)  # [0.61, 0.22, 0.14, 0.03]: top_p=0.7 keeps tokens 0 and 1
    tokens, log_probs = sample_tokens(logits, keys, positions, temperature=1.0, top_p=0.7)
    assert set(tokens.tolist()) == {0, 1}
    renormalised = torch.log(probs[:2] / probs[:2].sum())
    assert torch.allclose(log_probs, renormalised[tokens], atol=1e-6), "log-probs are under the truncated distribution"


def test_in_place_weight_update_changes_outputs_and_keeps_tensors(tiny_model_dir):
    generator = HFGenerator.from_pretrained(str(tiny_model_dir), dtype="float32", device="cpu")
    spec = SamplingSpec(max_tokens=8, temperature=0)
    [[before]] = generator.generate([PROMPTS[0]], spec)
    params_before = {n: p for n, p in generator.model.named_parameters()}
    torch.manual_seed(1)
    new_weights = [(n, torch.randn_like(p)) for n, p in generator.model.state_dict().items()]
    copied = generator.load_weights(new_weights)
    assert generator.parameter_names_not_covered(copied) == []
    for name, param in generator.model.named_parameters():
        assert param is params_before[name], "weights must be copied into the existing parameters"
    assert torch.equal(generator.model.lm_head.weight, generator.model.model.embed_tokens.weight), "tied stays tied"
    [[after]] = generator.generate([PROMPTS[0]], spec)
    assert after.token_ids != before.token_ids, "new weights must change greedy outputs"


def test_weight_update_rejects_unknown_names_and_reports_uncovered_parameters(generator):
    with pytest.raises(KeyError, match="does not have"):
        generator.load_weights([("model.not_a_layer.weight", torch.zeros(1))])
    assert "model.norm.weight" in generator.parameter_names_not_covered({"model.embed_tokens.weight"})


def test_server_batches_concurrent_requests_and_matches_sequential(tiny_model_dir, generator):
    options = HFServerOptions(model_path=str(tiny_model_dir), dtype="float32", prompt_length=16, response_length=8,
                              batch_window_ms=20)
    server = HFRolloutServer(options)

    async def run():
        params = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
        return await asyncio.gather(*[server.generate(p, dict(params), request_id=str(i)) for i, p in enumerate(PROMPTS)])

    outputs = asyncio.run(run())
    assert max(server.batch_sizes) > 1, f"concurrent requests must share a decode batch, got {server.batch_sizes}"
    for prompt, output in zip(PROMPTS, outputs):
        [[alone]] = generator.generate([prompt], SamplingSpec(max_tokens=8, temperature=0))
        assert output.token_ids == alone.token_ids and output.log_probs == pytest.approx(alone.log_probs, abs=1e-5)
        assert output.extra_fields["global_steps"] is None and output.stop_reason == "completed"


def test_server_rejects_unsupported_sampling_params(tiny_model_dir):
    server = HFRolloutServer(HFServerOptions(model_path=str(tiny_model_dir), dtype="float32"))
    with pytest.raises(ValueError, match="repetition_penalty"):
        asyncio.run(server.generate([1, 2], {"repetition_penalty": 1.2}, request_id="r"))
    with pytest.raises(ValueError, match="min_p"):
        asyncio.run(server.generate([1, 2], {"min_p": 0.1}, request_id="r"))


# --- sampling keys: a request's tokens depend on its key, not on its batch -----------------------------------------

VARIED = [[1, 40, 41, 42], [1, 50], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [1, 70, 71], [1, 80, 81, 82, 83]]
SAMPLED = SamplingSpec(max_tokens=10, temperature=0.8)


def test_sampled_tokens_are_the_same_alone_in_any_batch_and_order(generator):
    """Each prompt sampled alone, in sub-batches (other padding widths) and in reverse order gets the same tokens,
    and log-probs equal to 1e-5: the model's float32 logits differ in the last bits with a row's place, the batch's
    size and its padded width (CPU matmul blocking); the sampler itself adds no dependence (test_keyed_sampling)."""
    keys = [sample_key("varied", i) for i in range(len(VARIED))]
    together = [g for [g] in generator.generate(VARIED, SAMPLED, keys=keys)]
    reversed_order = [g for [g] in generator.generate(VARIED[::-1], SAMPLED, keys=keys[::-1])][::-1]
    for got, want in zip(reversed_order, together):
        assert got.token_ids == want.token_ids and got.log_probs == pytest.approx(want.log_probs, abs=1e-5)
    for i, prompt in enumerate(VARIED):
        [[alone]] = generator.generate([prompt], SAMPLED, keys=[keys[i]])
        assert alone.token_ids == together[i].token_ids, f"prompt {i} sampled alone drew other tokens"
        assert alone.log_probs == pytest.approx(together[i].log_probs, abs=1e-5)
    pairs = generator.generate([VARIED[2], VARIED[1]], SAMPLED, keys=[keys[2], keys[1]])
    assert [pairs[0][0].token_ids, pairs[1][0].token_ids] == [together[2].token_ids, together[1].token_ids]


def test_samples_repeat_with_their_keys_and_change_with_the_seed(tiny_model_dir, generator):
    first = generator.generate(PROMPTS, SamplingSpec(max_tokens=8, temperature=1.0, n=2))
    again = generator.generate(PROMPTS, SamplingSpec(max_tokens=8, temperature=1.0, n=2))
    assert [[g.token_ids for g in p] for p in first] == [[g.token_ids for g in p] for p in again]
    other_seed = HFGenerator(generator.model, generator.eos_token_ids, generator.pad_token_id, seed=1)
    other = other_seed.generate(PROMPTS, SamplingSpec(max_tokens=8, temperature=1.0, n=2))
    assert [[g.token_ids for g in p] for p in other] != [[g.token_ids for g in p] for p in first]


def test_static_shapes_and_dropping_stopped_rows_give_the_same_samples(generator, monkeypatch):
    """The CUDA-graph path's bookkeeping (rows padded to a bucket, buffers reused across calls) and the CPU path's
    (stopped rows leave the batch) decode the same tokens as the plain loop. The tokens the rows sample most often
    are made EOS, so that rows stop at different steps and leave the batch in several rounds."""
    from collections import Counter

    from verl_gq.models import hf_generator

    spec = SamplingSpec(max_tokens=12, temperature=1.0, n=3)
    probe = generator.generate(PROMPTS, spec)  # the same default keys as below: these tokens will be drawn
    eos = [token for token, _ in Counter(t for p in probe for g in p for t in g.token_ids).most_common(6)]
    variants = {name: HFGenerator(generator.model, eos, generator.pad_token_id, **options) for name, options in {
        "plain": dict(compact_finished_rows=False),
        "dropping stopped rows": dict(compact_finished_rows=True),
        "static shapes": dict(static_shapes=True, cache_length=64),
    }.items()}
    static = variants["static shapes"]
    static.generate(VARIED, SamplingSpec(max_tokens=5, temperature=0, n=3))  # 15 rows: the bucket of 16 holds them
    drops = []
    keep_rows = hf_generator._DecodeState.keep_rows
    monkeypatch.setattr(hf_generator._DecodeState, "keep_rows",
                        lambda state, keep: drops.append(len(keep)) or keep_rows(state, keep))
    results = {name: v.generate(PROMPTS, spec) for name, v in variants.items()}
    assert len(drops) >= 2, f"the check needs rows leaving the batch in several rounds, got {drops}"
    assert any(g.finish_reason == "stop" for p in results["plain"] for g in p)
    for name, result in results.items():
        for got, want in zip(result, results["plain"]):
            assert [g.token_ids for g in got] == [g.token_ids for g in want], f"{name} decoded other tokens"
            assert [g.finish_reason for g in got] == [g.finish_reason for g in want]
            for g, w in zip(got, want):
                assert g.log_probs == pytest.approx(w.log_probs, abs=1e-5)
    assert list(static._graph_states) == [(16, 64)], "batches of 15 and 12 rows share one bucket (16 rows)"


class _StorageReads(TorchDispatchMode):
    """Records the storages every op reads that no op of the same region wrote (tensors that live outside it)."""

    def __init__(self):
        super().__init__()
        self.outside, self.written = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in self.written:
                self.outside.add(value.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        self.written |= {v.untyped_storage().data_ptr() for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)}
        return out


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def test_a_decode_step_reads_only_tensors_that_outlive_the_call(generator, monkeypatch):
    """A CUDA graph captured in one call is replayed by later calls and reads the memory its tensors had at capture:
    a decode step that reads a tensor made per call (the stop tokens were) reads freed memory on replay, and rows
    stop at random or never. Every tensor a step reads must belong to the decode state (kept per batch shape), the
    model, or the step itself; checked on the CPU op by op, where graphs cannot run."""
    from verl_gq.models import hf_generator, keyed_sampling

    static = HFGenerator(generator.model, generator.eos_token_ids, generator.pad_token_id, static_shapes=True)
    seen = []
    decode_step = hf_generator.HFGenerator._decode_step

    def recorded(self, state, *args):
        reads = _StorageReads()
        with reads:
            decode_step(self, state, *args)
        seen.append((state, reads.outside))

    monkeypatch.setattr(hf_generator.HFGenerator, "_decode_step", recorded)
    static.generate(PROMPTS, SamplingSpec(max_tokens=3, temperature=1.0, n=2))
    state, outside = seen[0]
    cache = [t for layer in state.cache.layers for t in vars(layer).values()]
    # the model's tensors: parameters, buffers and plain tensor attributes (the rotary embedding keeps one); the
    # sampler's per-vocabulary codes, kept for the process
    model = [t for m in generator.model.modules() for t in vars(m).values()]
    owned = _storages(vars(state).values()) | _storages(cache) | _storages(generator.model.parameters()) | \
        _storages(generator.model.buffers()) | _storages(model) | _storages(keyed_sampling._vocab_codes.values()) | {0}
    assert outside - owned == set(), "the decode step reads a tensor made for this call only"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_stop_rows_as_eager_decoding_call_after_call(tiny_model_dir):
    """Graphs are captured in the first call of a batch shape and replayed by every later one; each call must stop
    its rows where eager decoding does (a replay that read the first call's freed stop tokens ran every row to its
    limit from the third call on)."""
    from collections import Counter

    model = HFGenerator.from_pretrained(str(tiny_model_dir), dtype="float32", device="cuda").model
    spec = SamplingSpec(max_tokens=24, temperature=1.0, n=4)
    probe = HFGenerator(model, [-1], 0, cuda_graphs=False).generate(PROMPTS, spec)
    eos = [t for t, _ in Counter(t for p in probe for g in p for t in g.token_ids).most_common(4)]
    graphs, eager = (HFGenerator(model, eos, 0, cuda_graphs=on, static_shapes=True) for on in (True, False))
    for call in range(5):
        keys = [call * 1000 + i for i in range(len(PROMPTS) * spec.n)]
        got, want = graphs.generate(PROMPTS, spec, keys=keys), eager.generate(PROMPTS, spec, keys=keys)
        assert [[g.token_ids for g in p] for p in got] == [[g.token_ids for g in p] for p in want], f"call {call}"
        assert any(g.finish_reason == "stop" for p in got for g in p), f"call {call}: some rows should stop at EOS"


def make_server(tiny_model_dir, **options) -> HFRolloutServer:
    defaults = dict(model_path=str(tiny_model_dir), dtype="float32", prompt_length=16, response_length=8, seed=41)
    return HFRolloutServer(HFServerOptions(**{**defaults, **options}))


SAMPLING_PARAMS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


async def send(server: HFRolloutServer, prompts: list[list[int]], gap_s: float = 0.0, params=SAMPLING_PARAMS):
    tasks = []
    for i, prompt in enumerate(prompts):
        tasks.append(asyncio.create_task(server.generate(prompt, dict(params), request_id=str(i))))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


def responses_by_prompt(prompts, outputs) -> dict[tuple, list]:
    """Each prompt's responses, sorted by tokens: [(token ids, log-probs)]."""
    grouped: dict[tuple, list] = {}
    for prompt, output in zip(prompts, outputs):
        grouped.setdefault(tuple(prompt), []).append((output.token_ids, output.log_probs))
    return {prompt: sorted(samples) for prompt, samples in grouped.items()}


def assert_same_responses(got: dict, want: dict, message: str) -> None:
    """The same prompts with the same token ids; log-probs to 1e-5 (float32 logits differ in their last bits
    between batch shapes)."""
    assert {p: [tokens for tokens, _ in samples] for p, samples in got.items()} == \
        {p: [tokens for tokens, _ in samples] for p, samples in want.items()}, message
    for prompt, samples in got.items():
        for (_, log_probs), (_, expected) in zip(samples, want[prompt]):
            assert log_probs == pytest.approx(expected, abs=1e-5), message


async def sync_weights(server: HFRolloutServer, global_steps: int) -> None:
    await server.update_weights(list(server.generator.model.state_dict().items()))
    await server.finish_weight_update(global_steps)


def test_server_samples_are_reproducible_whatever_the_arrival_order_and_batching(tiny_model_dir):
    """Two servers of one seed, the same 3 prompts x 4 samples arriving in other orders and batched differently
    (one batch vs batches of 3) give every prompt the same set of responses; a new step draws new ones; a repeated
    step the same ones again; another seed other ones."""
    requests = [p for p in PROMPTS[:3] for _ in range(4)]
    shuffled = [requests[i] for i in torch.randperm(len(requests), generator=torch.Generator().manual_seed(0))]

    async def run():
        one_batch, small_batches, other_seed = (make_server(tiny_model_dir), make_server(
            tiny_model_dir, max_batch_size=3, batch_window_ms=0), make_server(tiny_model_dir, seed=42))
        for server in (one_batch, small_batches, other_seed):
            await sync_weights(server, 5)
        at_5 = await send(one_batch, requests)
        at_5_shuffled = await send(small_batches, shuffled)
        at_5_other_seed = await send(other_seed, requests)
        await sync_weights(one_batch, 6)
        at_6 = await send(one_batch, requests)
        await sync_weights(one_batch, 5)
        at_5_again = await send(one_batch, requests)
        return one_batch.batch_sizes, small_batches.batch_sizes, at_5, at_5_shuffled, at_5_other_seed, at_6, at_5_again

    sizes_one, sizes_small, at_5, at_5_shuffled, at_5_other_seed, at_6, at_5_again = asyncio.run(run())
    assert max(sizes_small) <= 3 < max(sizes_one), (sizes_one, sizes_small)
    assert_same_responses(responses_by_prompt(shuffled, at_5_shuffled), responses_by_prompt(requests, at_5),
                          "the same seed and step must give each prompt the same responses, whatever the arrival "
                          "order and batching")
    assert [o.token_ids for o in at_5_again] == [o.token_ids for o in at_5], "a step's samples must repeat"
    assert [o.token_ids for o in at_6] != [o.token_ids for o in at_5], "a new step must draw new samples"
    assert [o.token_ids for o in at_5_other_seed] != [o.token_ids for o in at_5], "another seed, other samples"
    group = responses_by_prompt(requests, at_5)[tuple(PROMPTS[0])]
    assert len({tuple(tokens) for tokens, _ in group}) > 1, "a prompt's samples must differ from each other"


def test_server_gathers_a_burst_into_one_batch_and_a_later_wave_into_another(tiny_model_dir):
    """12 requests 20 ms apart (longer in all than the 200 ms window, each gap well inside it) are one batch."""
    async def run():
        server = make_server(tiny_model_dir, batch_window_ms=200)
        await send(server, PROMPTS * 3, gap_s=0.02)
        await send(server, PROMPTS[:2])
        return server.batch_sizes

    assert asyncio.run(run()) == [12, 2], "a burst with gaps shorter than batch_window_ms must be one decode batch"


def test_server_honours_a_per_request_seed(tiny_model_dir):
    async def run():
        server = make_server(tiny_model_dir)
        seeded = await send(server, [PROMPTS[0]] * 2, params={**SAMPLING_PARAMS, "seed": 7})
        unseeded = await send(server, [PROMPTS[0]] * 2)
        return seeded, unseeded

    seeded, unseeded = asyncio.run(run())
    assert seeded[0].token_ids == seeded[1].token_ids, "one request seed, one draw (as vLLM)"
    assert unseeded[0].token_ids != unseeded[1].token_ids


def test_server_options_name_the_bad_engine_kwarg(tiny_model_dir):
    from verl.workers.config import RolloutConfig

    def options(**engine_kwargs):
        config = RolloutConfig(name="hf", tensor_model_parallel_size=1, engine_kwargs={"hf": engine_kwargs})
        return HFServerOptions.from_verl(config, {"path": str(tiny_model_dir)}, device="cpu", replica_rank=1)

    parsed = options(max_batch_size=64, batch_window_ms=5, cuda_graphs=False, cpu_threads=2)
    assert (parsed.max_batch_size, parsed.batch_window_ms, parsed.cuda_graphs, parsed.cpu_threads, parsed.seed,
            parsed.replica_rank) == (64, 5.0, False, 2, 42, 1)
    with pytest.raises(ValueError, match="batch_windows_ms"):
        options(batch_windows_ms=5)
    with pytest.raises(ValueError, match="max_batch_size"):
        options(max_batch_size=0)
    with pytest.raises(ValueError, match="cpu_threads"):
        options(cpu_threads=0)
