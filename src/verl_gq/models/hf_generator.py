"""Batched token-in/token-out generation with an HF causal LM, reproducible per sample (torch and transformers only).

`HFGenerator.generate` decodes a batch of prompts together, left-padded in a static KV cache, each row stopping at
EOS/stop tokens or its own max_tokens. Every row samples with its own 64-bit key (verl_gq.models.keyed_sampling),
so a row's tokens do not depend on the batch it was decoded in.

What keeps it cheap:
- each distinct prompt is prefilled once (verl sends a prompt's n samples as n requests), in chunks of similar
  length that pad little;
- a static KV cache (transformers `StaticCache`, written in place) instead of a cache re-concatenated every token;
- attention masks built once per batch and updated in place, so transformers' mask construction (and its host
  read of the padding mask) stays out of the loop;
- one-token attention of grouped-query models without copying the KV cache per head (`grouped_query_sdpa`);
- no host synchronisation per token: rows stop on the device, and the host checks whether all have stopped every
  `check_every` tokens;
- on the CPU, rows that have stopped leave the batch (`compact_finished_rows`), which saves their compute;
- on CUDA, the decode step (forward, sampling, stop bookkeeping) is captured once as a CUDA graph per batch shape and
  replayed (`cuda_graphs`); the batch is padded to a bucket of rows and the cache to a bucket of positions so that
  a few graphs serve every batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from verl_gq.models.keyed_sampling import key_tensor, sample_key, sample_tokens, token_digest

logger = logging.getLogger(__name__)

# The attention implementation the generator installs: transformers' sdpa, except for one-token queries of
# grouped-query models (see grouped_query_sdpa).
ATTENTION_NAME = "gq_grouped_sdpa"
CACHE_LENGTH_STEP = 64  # the static cache's length is rounded up to a multiple of this (fewer distinct graphs)


@dataclass(frozen=True)
class SamplingSpec:
    """One request's sampling: temperature 0 = greedy; top_k <= 0 and top_p = 1 mean off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys are decoded in one batch (max_tokens may differ per row)."""
        return (self.temperature, self.top_p, self.top_k, self.stop_token_ids, self.ignore_eos)


@dataclass
class Generation:
    """One sampled response: token ids (EOS included when it stopped there) and their log-probs under the
    sampling distribution after temperature/top-k/top-p (verl's `processed_logprobs`); raw log-probs when greedy."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) or "length"


def default_sample_keys(seed: int, prompts: Sequence[Sequence[int]], n: int) -> list[int]:
    """Keys for `n` samples of each prompt: (seed, prompt, index among the samples of that prompt in this call).

    Equal prompts share one numbering, so the keys do not depend on where a prompt sits in the list."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        digest = token_digest(prompt)
        for _ in range(n):
            keys.append(sample_key("generate", seed, digest, seen.get(digest, 0)))
            seen[digest] = seen.get(digest, 0) + 1
    return keys


def grouped_query_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, but a one-token query of a grouped-query model attends without repeating K/V.

    transformers repeats each KV head for its query heads whenever a mask is passed (a copy of the whole cache per
    layer and token: 5x the organism's cache). With one query position, the query heads that share a KV head are
    instead laid out as that head's query positions: the same products, no copy (the mask [B, 1, 1, L] broadcasts)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, query_length, head_dim = query.shape
    if query_length != 1 or groups == 1 or kwargs.get("output_attentions", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, groups, head_dim)  # query head h uses KV head h // groups
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, grouped_query_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # a 2D padding mask still works (e.g. a plain forward)


def _full_attention_only(config) -> bool:
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return set(layer_types or ["full_attention"]) == {"full_attention"} and not (layer_types is None and sliding)


def _rows_bucket(rows: int) -> int:
    """Graph batch sizes: powers of two up to 64, then multiples of 64."""
    if rows <= 64:
        return max(8, 1 << (rows - 1).bit_length())
    return -(-rows // 64) * 64


class _DecodeState:
    """Every tensor one decode step reads or writes, allocated once per batch shape and updated in place.

    `active` maps the rows still in the batch to their place in the output (the CPU path drops stopped rows)."""

    def __init__(self, rows: int, cache_length: int, vocab_size: int, device: torch.device):
        long = dict(dtype=torch.long, device=device)
        self.rows, self.cache_length = rows, cache_length
        self.active = torch.arange(rows, **long)
        self.keys = torch.zeros((rows, 2), **long)
        self.limits = torch.zeros(rows, **long)
        self.lengths = torch.zeros(rows, **long)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.positions = torch.zeros((rows, 1), **long)
        self.valid = torch.zeros((rows, cache_length), dtype=torch.bool, device=device)
        self.logits = torch.zeros((rows, vocab_size), dtype=torch.float32, device=device)
        self.step = torch.zeros(1, **long)  # response position of the next token
        self.write_column = torch.zeros(1, **long)  # cache column of the next token
        # a response never outgrows the cache, so cache_length columns hold any max_tokens this state can serve
        self.out_tokens = torch.zeros((rows, cache_length), **long)
        self.out_log_probs = torch.zeros((rows, cache_length), dtype=torch.float32, device=device)
        self.out_lengths = torch.zeros(rows, **long)
        self.out_stopped = torch.zeros(rows, dtype=torch.bool, device=device)
        self.stop_ids = torch.full((1,), -1, **long)  # EOS and stop tokens (set_stop_ids)
        self.cache = None
        self.graph = None  # (CUDA graph, the sampling it was captured for)

    def set_stop_ids(self, ids: Sequence[int]) -> None:
        """The tokens that stop a row, written into `stop_ids` in place (a captured graph reads that tensor); a list
        of another length takes a new tensor, and the graph captured for the old one is dropped."""
        values = torch.tensor(list(ids) or [-1], dtype=torch.long)
        if values.shape != self.stop_ids.shape:
            self.stop_ids = torch.empty_like(values, device=self.stop_ids.device)
            self.graph = None
        self.stop_ids.copy_(values)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the rows not in `keep` (indices into the current rows), after saving their results."""
        self.save_results()
        for name in ("active", "keys", "limits", "lengths", "finished", "stopped", "positions", "valid", "logits"):
            setattr(self, name, getattr(self, name)[keep])
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            layer.max_batch_size = len(keep)
        self.rows = len(keep)

    def save_results(self) -> None:
        self.out_lengths[self.active] = self.lengths
        self.out_stopped[self.active] = self.stopped


class HFGenerator:
    """Batched generation with an HF causal LM and a static KV cache (no Ray, no verl).

    `generate` decodes a list of prompts in one batch; `load_weights` copies named tensors into the model's existing
    parameters and buffers (captured CUDA graphs keep pointing at them).

    Options (None = the device's default): `cuda_graphs` (CUDA: on); `static_shapes` (pad the batch to a bucket of
    rows and keep one reusable set of buffers per bucket: what graphs need; default = cuda_graphs);
    `compact_finished_rows` (drop stopped rows from the batch: default on the CPU without static shapes);
    `check_every` (tokens between host checks whether all rows stopped; CPU 1, CUDA 8); `cache_length` (the static
    cache's minimum length, e.g. the prompt + response budget, so that batches of different prompt lengths share
    one bucket and graph); `prefill_rows` (distinct prompts per prefill forward, chunked by length so that each
    chunk pads less; 0 = all at once: CUDA's default; CPU 8)."""

    def __init__(self, model: torch.nn.Module, eos_token_ids: Iterable[int], pad_token_id: int, seed: int = 0,
                 cuda_graphs: Optional[bool] = None, static_shapes: Optional[bool] = None,
                 compact_finished_rows: Optional[bool] = None, check_every: Optional[int] = None,
                 cache_length: Optional[int] = None, prefill_rows: Optional[int] = None):
        if not _full_attention_only(model.config):
            raise ValueError(f"HFGenerator decodes full-attention models only; {model.config.model_type} has layer "
                             f"types {sorted(set(getattr(model.config, 'layer_types', None) or ['sliding']))}")
        _register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        if not self.eos_token_ids:
            raise ValueError("the model declares no eos_token_id: generation could never stop early")
        self.pad_token_id = pad_token_id
        self.seed = seed
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs needs a CUDA model, this one is on {self.device}")
        self.static_shapes = self.cuda_graphs if static_shapes is None else bool(static_shapes)
        if self.cuda_graphs and not self.static_shapes:
            raise ValueError("cuda_graphs replays fixed shapes: it needs static_shapes")
        self.compact_finished_rows = (not on_cuda and not self.static_shapes) if compact_finished_rows is None \
            else bool(compact_finished_rows)
        if self.compact_finished_rows and self.static_shapes:
            raise ValueError("compact_finished_rows changes the batch shape, which static_shapes keeps fixed")
        self.check_every = (8 if on_cuda else 1) if check_every is None else int(check_every)
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.cache_length = cache_length
        self.prefill_rows = (0 if on_cuda else 8) if prefill_rows is None else int(prefill_rows)
        if self.prefill_rows < 0:
            raise ValueError(f"prefill_rows must be >= 0 (0 = all prompts at once), got {prefill_rows}")
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._graph_states: dict[tuple[int, int], _DecodeState] = {}  # by (rows, cache length)
        self._graphs_failed = False
        # every name a trainer may send, tied aliases included (lm_head.weight and embed_tokens.weight share storage)
        self._tensors_by_name: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                        trust_remote_code: bool = False, **options) -> "HFGenerator":
        from transformers import AutoModelForCausalLM, GenerationConfig

        short_names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        torch_dtype = short_names.get(dtype) or getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        ).to(device)
        try:
            gen_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            gen_config = model.generation_config
        eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else model.config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        pad = gen_config.pad_token_id if gen_config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        return cls(model, eos_ids, pad, seed=seed, **options)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec, max_tokens: Optional[list[int]] = None,
                 keys: Optional[list[int]] = None) -> list[list[Generation]]:
        """Sample `spec.n` responses for each prompt; returns one list of n Generations per prompt.

        `max_tokens` overrides spec.max_tokens per prompt. `keys` gives each sample (prompt-major, n per prompt) its
        64-bit sampling key; by default `default_sample_keys(self.seed, prompts, n)`. All rows are decoded in one
        batch, and a row's tokens depend only on its prompt, key and limits."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        limits = list(max_tokens) if max_tokens is not None else [spec.max_tokens] * len(prompts)
        if len(limits) != len(prompts) or min(limits) < 1:
            raise ValueError(f"max_tokens needs one value >= 1 per prompt, got {limits} for {len(prompts)} prompts")
        rows = [list(p) for p in prompts for _ in range(spec.n)]
        row_limits = [m for m in limits for _ in range(spec.n)]
        row_keys = list(keys) if keys is not None else default_sample_keys(self.seed, prompts, spec.n)
        if len(row_keys) != len(rows):
            raise ValueError(f"keys needs one key per sample ({len(rows)}), got {len(row_keys)}")
        width, max_new = max(len(r) for r in rows), max(row_limits)
        cache_length = max(width + max_new, self.cache_length or 0)
        cache_length = -(-cache_length // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
        if self.static_shapes:
            bucket = (_rows_bucket(len(rows)), cache_length)
            if bucket not in self._graph_states:
                self._graph_states[bucket] = _DecodeState(*bucket, self.vocab_size, self.device)
            state = self._graph_states[bucket]
        else:
            state = _DecodeState(len(rows), cache_length, self.vocab_size, self.device)
        self._prefill(state, rows, row_limits, row_keys, width)
        steps = self._decode(state, spec)
        state.save_results()
        tokens = state.out_tokens[: len(rows), :steps].tolist()
        log_probs = state.out_log_probs[: len(rows), :steps].tolist()
        lengths, stopped = state.out_lengths[: len(rows)].tolist(), state.out_stopped[: len(rows)].tolist()
        results = [Generation(token_ids=tokens[i][: lengths[i]], log_probs=log_probs[i][: lengths[i]],
                              finish_reason="stop" if stopped[i] else "length") for i in range(len(rows))]
        return [results[i * spec.n:(i + 1) * spec.n] for i in range(len(prompts))]

    def _prefill(self, state: _DecodeState, rows: list[list[int]], limits: list[int], keys: list[int],
                 width: int) -> None:
        """Reset `state` in place for these rows (extra rows of a bucket start finished) and run the prompts into
        its static cache, prompts left-padded to end at column `width`.

        Each distinct prompt runs once (verl sends a prompt's n samples as n requests) and its keys, values and last
        logits are copied to every row that holds it. Prompts run in chunks of `prefill_rows` of similar length,
        each padded only to its own longest prompt, with transformers' own masks (causal attention with no mask
        where a chunk has no padding)."""
        from transformers import DynamicCache, StaticCache

        device, count = self.device, len(rows)
        distinct: dict[tuple[int, ...], int] = {}
        row_prompt = [distinct.setdefault(tuple(r), len(distinct)) for r in rows]
        prompts = list(distinct)
        by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        chunk = self.prefill_rows or len(prompts)
        rows_of_prompt: list[list[int]] = [[] for _ in prompts]
        for row, prompt_index in enumerate(row_prompt):
            rows_of_prompt[prompt_index].append(row)

        prompt_mask = torch.zeros((state.rows, width), dtype=torch.bool)
        for i, prompt in enumerate(rows):
            prompt_mask[i, width - len(prompt):] = True
        prompt_mask[count:, -1] = True  # a bucket's spare rows hold one (unwritten, never read) token
        prompt_mask = prompt_mask.to(device)
        state.active.copy_(torch.arange(state.rows, device=device))
        state.keys.zero_()
        state.keys[:count] = key_tensor(keys, device)
        state.limits.fill_(1)
        state.limits[:count] = torch.tensor(limits, device=device)
        state.lengths.zero_()
        state.finished.zero_()
        state.finished[count:] = True
        state.stopped.zero_()
        state.out_lengths.zero_()
        state.out_stopped.zero_()
        state.valid.zero_()
        state.valid[:, :width] = prompt_mask
        state.step.zero_()
        state.write_column.fill_(width)
        state.positions.copy_(prompt_mask.sum(-1, keepdim=True))  # the first response token's position
        state.logits.zero_()
        if state.cache is None:
            state.cache = StaticCache(config=self.model.config, max_cache_len=state.cache_length)

        for start in range(0, len(prompts), chunk):
            members = by_length[start:start + chunk]
            chunk_width = max(len(prompts[i]) for i in members)
            input_ids = torch.full((len(members), chunk_width), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(members), chunk_width), dtype=torch.long)
            for j, i in enumerate(members):
                input_ids[j, chunk_width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[j, chunk_width - len(prompts[i]):] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            prefill_cache = DynamicCache()
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=prefill_cache, use_cache=True, logits_to_keep=1)
            targets = torch.tensor([row for i in members for row in rows_of_prompt[i]], device=device)
            sources = torch.tensor([j for j, i in enumerate(members) for _ in rows_of_prompt[i]], device=device)
            if not state.cache.is_initialized:
                first = prefill_cache.layers[0].keys
                state.cache.early_initialization(state.rows, first.shape[1], first.shape[-1], first.dtype, device)
            for layer, computed in zip(state.cache.layers, prefill_cache.layers):
                layer.keys[targets, :, width - chunk_width:width] = computed.keys[sources]
                layer.values[targets, :, width - chunk_width:width] = computed.values[sources]
            state.logits[targets] = out.logits[sources, -1].float()
        for layer in state.cache.layers:
            layer.cumulative_length.fill_(width)

    def _decode_step(self, state: _DecodeState, spec: SamplingSpec) -> None:
        """Sample every row's next token from `state.logits`, record it, and run it through the model: in place,
        with no host read, reading no tensor but the state's, the model's and its own (so that it can be captured as
        a CUDA graph and replayed by later calls)."""
        tokens, log_probs = sample_tokens(state.logits, state.keys, state.step.expand(state.rows), spec.temperature,
                                          spec.top_k, spec.top_p)
        tokens = tokens.masked_fill(state.finished, self.pad_token_id)
        state.out_tokens[state.active, state.step] = tokens
        state.out_log_probs[state.active, state.step] = log_probs
        state.lengths.add_((~state.finished).long())
        # a broadcast compare: torch.isin sorts and takes unique values (a host read) for long stop lists
        hit_stop = (tokens[:, None] == state.stop_ids[None, :]).any(-1) & ~state.finished
        state.stopped.logical_or_(hit_stop)
        state.finished.logical_or_(hit_stop | (state.lengths >= state.limits))
        state.valid.index_fill_(1, state.write_column, True)
        out = self.model(input_ids=tokens[:, None], attention_mask=state.valid[:, None, None, :],
                         position_ids=state.positions, past_key_values=state.cache, use_cache=True)
        state.logits.copy_(out.logits[:, -1])
        state.positions.add_(1)
        state.write_column.add_(1)
        state.step.add_(1)

    def _decode(self, state: _DecodeState, spec: SamplingSpec) -> int:
        """Decode until every row has stopped or reached max_new tokens; returns the number of steps taken."""
        state.set_stop_ids(sorted(set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(self.eos_token_ids))))
        max_new = int(state.limits.max())
        if self.cuda_graphs and not self._graphs_failed:
            step_once = self._replayer(state, spec)
        else:
            step_once = lambda: self._decode_step(state, spec)  # noqa: E731
        for step in range(max_new):
            step_once()
            if (step + 1) % self.check_every and step + 1 < max_new:
                continue
            if bool(state.finished.all()):
                return step + 1
            if self.compact_finished_rows:
                finished = int(state.finished.sum())
                if finished * 4 >= state.rows:  # copying the cache pays once a quarter of the rows has stopped
                    state.keep_rows((~state.finished).nonzero()[:, 0])
        return max_new

    def _replayer(self, state: _DecodeState, spec: SamplingSpec):
        """A step function replaying the CUDA graph of this state and sampling; captures it on first use (after a
        few eager steps, which are real decode steps, as CUDA's warm-up). A failed capture turns graphs off."""
        if state.graph is not None and state.graph[1] == spec.batch_key:
            return state.graph[0].replay
        state.graph = None
        warmup_left = [3]

        def step() -> None:
            if state.graph is not None:
                state.graph[0].replay()
                return
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode_step(state, spec)
            torch.cuda.current_stream().wait_stream(side)
            warmup_left[0] -= 1
            if warmup_left[0] > 0 or self._graphs_failed:
                return
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._decode_step(state, spec)
            except Exception as error:  # noqa: BLE001 - logged; decoding goes on eagerly
                logger.warning("hf generator: CUDA graph capture failed (%s); decoding eagerly from now on", error)
                self._graphs_failed = True
                return
            state.graph = (graph, spec.batch_key)

        return step

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy each (name, tensor) into the model's existing tensor of that name; returns the names copied.

        A name the model does not have, or a shape mismatch, is an error: a silently skipped tensor would
        leave the rollout on stale weights while the trainer moves on."""
        copied = set()
        for name, tensor in named_tensors:
            target = self._tensors_by_name.get(name)
            if target is None:
                raise KeyError(f"weight sync sent {name!r}, which the rollout model does not have "
                               f"(e.g. {sorted(self._tensors_by_name)[:3]})")
            if target.shape != tensor.shape:
                raise ValueError(f"weight sync shape mismatch for {name!r}: rollout {tuple(target.shape)}, "
                                 f"trainer {tuple(tensor.shape)}")
            target.data.copy_(tensor, non_blocking=True)
            copied.add(name)
        return copied

    def parameter_names_not_covered(self, names: set[str]) -> list[str]:
        """Parameters none of whose aliases is in `names` (a tied weight counts as covered by either name)."""
        covered = {id(self._tensors_by_name[n]) for n in names if n in self._tensors_by_name}
        return sorted(n for n, p in self.model.named_parameters() if id(p) not in covered)
