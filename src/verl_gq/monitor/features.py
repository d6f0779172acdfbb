"""The probe's features: per (prompt, completion), the mean over completion positions of one decoder layer's output."""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from verl_gq.routing.direction import micro_batches, right_padded

LAYER_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)")  # a decoder layer (or its FSDP1 wrapper), by index


def decoder_layer(model: nn.Module, layer: Optional[int]) -> tuple[int, nn.Module]:
    """The decoder layer `layer` of a Hugging Face causal LM (None: the middle one, n_layers // 2)."""
    layers = {}
    for name, module in model.named_modules():
        match = LAYER_NAME.fullmatch(name)
        if match:
            layers.setdefault(int(match.group(1)), module)  # the outermost module of that name (FSDP1's wrapper)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no module named like '*.layers.<i>' (a decoder layer)")
    index = len(layers) // 2 if layer is None else layer
    if index not in layers:
        raise ValueError(f"gq.monitor.layer={layer}: the model has decoder layers 0..{len(layers) - 1}")
    return index, layers[index]


@torch.no_grad()
def mean_completion_activations(run_model: Callable, layer_module: nn.Module,
                                sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, device: torch.device,
                                micro_batch_size: int = 64, max_tokens: Optional[int] = 16384) -> torch.Tensor:
    """(n, hidden) float32 on the CPU: row i is the mean over sequence i's completion positions of `layer_module`'s
    output, the model called HF-style on right-padded micro-batches (`run_model(input_ids=, attention_mask=,
    use_cache=False, logits_to_keep=1)`)."""
    rows = [(torch.as_tensor(list(p), dtype=torch.long), torch.as_tensor(list(c), dtype=torch.long))
            for p, c in sequences]
    if any(len(c) == 0 for _, c in rows):
        raise ValueError("a sequence has an empty completion: nothing to average")
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    out: list[Optional[torch.Tensor]] = [None] * len(rows)
    handle = layer_module.register_forward_hook(keep)
    try:
        for batch_index in micro_batches(rows, micro_batch_size, max_tokens):
            input_ids, attention_mask, scored = right_padded([rows[i] for i in batch_index])
            captured.clear()
            run_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                      logits_to_keep=1)
            hidden = captured[-1].float()
            weights = scored.to(hidden.device, torch.float32)
            means = (weights.unsqueeze(-1) * hidden).sum(1) / weights.sum(1, keepdim=True)
            for row, i in enumerate(batch_index):
                out[i] = means[row].cpu()
    finally:
        handle.remove()
    return torch.stack(out)
