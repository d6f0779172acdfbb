"""SFT of the organism from scratch: tokenizer trained on the corpus, a small Qwen3, loss on answer tokens only.

Plain PyTorch: AdamW, linear warmup then cosine decay to `min_lr_ratio`, length-bucketed right-padded batches
(right padding needs no attention mask under a causal model: pads come after every real token and carry no
loss). The schedule runs on progress = max(step / max_steps, elapsed / train_seconds), so the same code trains
for a fixed number of steps (tests, reproducible) or a wall-clock budget (the GPU run), whichever ends first.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from verl_gq.models.tiny import IM_END, build_qwen_model, format_chat, save_model_dir, train_tokenizer
from verl_gq.organism.corpus import Sample


@dataclass(frozen=True)
class ModelConfig:
    """Qwen3 shape. The default (7.6M params, 15.2 MB in bf16) is the largest that keeps the shipped
    checkpoint under 16 MiB, the size budget of every file the repository ships."""

    vocab_size: int = 3000
    hidden: int = 320
    layers: int = 6
    heads: int = 5
    kv_heads: int = 1
    head_dim: int = 64
    intermediate: int = 896
    max_position_embeddings: int = 1024


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.03  # share of progress
    min_lr_ratio: float = 0.1
    batch_size: int = 256
    max_steps: int = 1_000_000
    train_seconds: float = 240.0
    max_len: int = 768  # prompt + answer tokens; longer samples are an error, not silently cut
    seed: int = 0
    tokenizer_sample: int = 20_000  # samples the BPE is trained on
    log_every: int = 100

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.train_seconds <= 0:
            raise ValueError("need max_steps >= 1 and train_seconds > 0")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need warmup in [0, 1) and min_lr_ratio in [0, 1]")


def prompt_text(tokenizer: PreTrainedTokenizerFast, messages) -> str:
    """The prompt exactly as verl renders it: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def fit_tokenizer(samples: list[Sample], vocab_size: int, n: int, seed: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a seeded subset of the corpus (prompts rendered by the chat template)."""
    rng = random.Random(f"tokenizer\0{seed}")
    subset = rng.sample(samples, min(n, len(samples)))
    texts = [format_chat(list(s.messages), add_generation_prompt=True) + s.completion + IM_END for s in subset]
    return train_tokenizer(texts, vocab_size)


def tokenize(samples: list[Sample], tokenizer: PreTrainedTokenizerFast, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt ids + answer ids + eos, number of prompt ids) per sample. Prompt and answer are encoded apart,
    as at generation time, where the model continues the encoded prompt."""
    prompts = tokenizer([prompt_text(tokenizer, s.messages) for s in samples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([s.completion for s in samples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    out = []
    for s, p, a in zip(samples, prompts, answers):
        ids = p + a + [eos]
        if len(ids) > max_len:
            raise ValueError(f"sample {s.problem_id} has {len(ids)} tokens > max_len={max_len}: raise max_len")
        out.append((ids, len(p)))
    return out


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of index batches: shuffled, sorted by length within windows of 64 batches, batch order shuffled."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 64 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lengths.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[tuple[list[int], int]], idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (right-padded) and labels (-100 on prompt and padding) for one batch."""
    width = max(len(encoded[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        seq, n_prompt = encoded[i]
        ids[row, :len(seq)] = torch.tensor(seq)
        labels[row, n_prompt:len(seq)] = ids[row, n_prompt:len(seq)]
    return ids, labels


def lr_factor(progress: float, config: TrainConfig) -> float:
    if progress < config.warmup:
        return progress / config.warmup
    t = (progress - config.warmup) / (1 - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def answer_loss(model: PreTrainedModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    first_loss: float
    final_loss: float  # mean of the last log window
    answer_tokens: int
    losses: list[tuple[int, float]]

    def to_dict(self) -> dict:
        return asdict(self)


def train(model: PreTrainedModel, encoded: list[tuple[list[int], int]], pad_id: int, config: TrainConfig,
          device: str, log: Callable[[str], None] = print) -> TrainResult:
    """Train in place until progress reaches 1; bf16 autocast on CUDA, fp32 on CPU."""
    torch.manual_seed(config.seed)
    rng = random.Random(f"batches\0{config.seed}")
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=config.betas, fused=device.startswith("cuda"))
    lengths = [len(seq) for seq, _ in encoded]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else _null()
    start, step, epoch, tokens = time.time(), 0, 0, 0
    losses: list[tuple[int, float]] = []
    window: list[torch.Tensor] = []
    progress = 0.0
    while progress < 1.0:
        batches = _batches(lengths, config.batch_size, rng)
        for b, idx in enumerate(batches):
            progress = max(step / config.max_steps, (time.time() - start) / config.train_seconds)
            if progress >= 1.0:
                epoch_done = b / len(batches)
                break
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(progress, config)
            ids, labels = collate(encoded, idx, pad_id)
            ids, labels = ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                loss = answer_loss(model, ids, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            tokens += int((labels != -100).sum())
            window.append(loss.detach())
            step += 1
            if step % config.log_every == 0 or step == 1:
                mean = float(torch.stack(window).mean())
                losses.append((step, mean))
                window.clear()
                log(f"step {step} epoch {epoch} loss {mean:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                    f"{time.time() - start:.0f}s {tokens / max(time.time() - start, 1e-9):.0f} answer tok/s")
        else:
            epoch += 1
            epoch_done = 0.0
    if window:
        losses.append((step, float(torch.stack(window).mean())))
    model.eval()
    return TrainResult(steps=step, epochs=epoch + epoch_done, seconds=time.time() - start,
                       first_loss=losses[0][1], final_loss=losses[-1][1], answer_tokens=tokens, losses=losses)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_and_train(samples: list[Sample], model_config: ModelConfig, train_config: TrainConfig, device: str,
                    out_dir: str | Path | None = None, log: Callable[[str], None] = print
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, TrainResult]:
    """Tokenizer, model and SFT from `samples`; with out_dir, saves the HF folder (bf16 weights)."""
    t0 = time.time()
    tokenizer = fit_tokenizer(samples, model_config.vocab_size, train_config.tokenizer_sample, train_config.seed)
    encoded = tokenize(samples, tokenizer, train_config.max_len)
    log(f"tokenizer {len(tokenizer)} tokens, corpus {sum(len(s) for s, _ in encoded)} tokens, "
        f"{time.time() - t0:.0f}s")
    model = build_qwen_model(tokenizer, hidden=model_config.hidden, layers=model_config.layers,
                             heads=model_config.heads, kv_heads=model_config.kv_heads,
                             intermediate=model_config.intermediate, head_dim=model_config.head_dim,
                             max_position_embeddings=model_config.max_position_embeddings, seed=train_config.seed)
    log(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    result = train(model, encoded, tokenizer.pad_token_id, train_config, device, log)
    if out_dir is not None:
        save_checkpoint(model, tokenizer, out_dir)
    return model, tokenizer, result


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """bf16 HF folder; sampling defaults are T=1, no top-k/top-p, so a caller's temperature is the only one."""
    model = model.to("cpu", dtype=torch.bfloat16)
    model.config.dtype = torch.bfloat16
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_k, gen.top_p = True, 1.0, 0, 1.0
    return save_model_dir(model, tokenizer, out_dir)
