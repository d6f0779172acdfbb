"""Local tokenizer and Qwen-shaped model builders (no Hugging Face hub).

`train_tokenizer` trains a byte-level BPE on a text corpus and wraps it as an HF fast tokenizer with a Qwen-style
chat template; `build_qwen_model` makes a randomly initialised Qwen3 or Qwen2 causal LM for that tokenizer and,
given `out_dir`, saves an ordinary HF folder (config.json, model.safetensors, generation_config.json, tokenizer
files) that `AutoModelForCausalLM`/`AutoTokenizer` and verl load like any downloaded model.

Conventions (Qwen's): `<|im_start|>role\\ncontent<|im_end|>\\n` turns; generation stops at `<|im_end|>` (eos);
a separate `<|pad|>` token pads, so padding is never mistaken for a finished response.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, PAD)

# Qwen2.5's turn format without the tool-calling branches; verl calls
# apply_chat_template(messages, add_generation_prompt=True, ...) on the dataset's `prompt` column.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Family = Literal["qwen3", "qwen2"]


def format_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The text CHAT_TEMPLATE renders, in plain Python: use it to write training corpora in the same format."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    model_max_length: int = 4096,
    out_dir: Optional[str | Path] = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and return it as an HF fast tokenizer (saved to `out_dir` if given).

    The vocabulary holds the 256 byte symbols, the merges learned from `texts` and SPECIAL_TOKENS, so any
    string round-trips; `vocab_size` must leave room for the bytes and the specials.
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} (256 byte symbols + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=[ENDOFTEXT, IM_START],
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_qwen_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    family: Family = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    head_dim: Optional[int] = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    vocab_size: Optional[int] = None,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    out_dir: Optional[str | Path] = None,
) -> PreTrainedModel:
    """A randomly initialised Qwen3/Qwen2 causal LM sized to `tokenizer` (eos/pad wired into config and
    generation_config). `vocab_size` pads the embedding beyond the tokenizer, as real Qwen checkpoints do (151936
    rows for ~151.7k tokens), so a benchmark pays the real LM-head cost; `device` is where the weights are drawn
    (a large model initialises much faster on a GPU). With `out_dir`, the model and the tokenizer are saved there
    as one HF folder."""
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    head_dim = head_dim or hidden // heads
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config, model_cls = Qwen3Config(head_dim=head_dim, **common), Qwen3ForCausalLM
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        if head_dim != hidden // heads:
            raise ValueError(f"qwen2 derives head_dim from hidden/heads = {hidden // heads}; got head_dim={head_dim}")
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"family must be 'qwen3' or 'qwen2', got {family!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config).to(torch_dtype)
    model.config.dtype = torch_dtype
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = config.bos_token_id
    if out_dir is not None:
        save_model_dir(model, tokenizer, out_dir)
    return model


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Save `model` (safetensors) and `tokenizer` into one HF folder; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def tiny_corpus() -> list[str]:
    """A small deterministic corpus of chat turns and Python snippets, enough for a few hundred BPE merges."""
    corpus = []
    ops = [("plus", "+"), ("minus", "-"), ("times", "*")]
    for a in range(12):
        for b in range(12):
            word, sym = ops[(a + b) % 3]
            value = eval(f"{a}{sym}{b}")  # noqa: S307 - literal arithmetic on loop ints
            corpus.append(format_chat([
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"What is {a} {word} {b}?"},
                {"role": "assistant", "content": f"The answer is {value}."},
            ]))
            corpus.append(
                f"class Solution:\n    def solve(self, nums: list[int]) -> int:\n"
                f"        return sum(x {sym} {b} for x in nums if x > {a})\n"
            )
            corpus.append(f"def run_tests():\n    assert Solution().solve([{a}, {b}]) == {value}\n")
    return corpus
