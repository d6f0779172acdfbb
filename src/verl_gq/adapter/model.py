"""Inject quarantine knobs into a model, switch its view (as trained, or deployed without a quarantine), merge the
knobs into plain weights, save and load them."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from verl_gq.adapter.config import AdapterConfigError, QuarantineAdapterConfig, pattern_matches
from verl_gq.adapter.layer import AS_TRAINED, EFFECTIVE, SVDQuarantineLinear, full_tensor

# The file names each knob on its own: adapter.<module>.effective_knob and adapter.<module>.quarantine_knob.<name>.
FILE_FORMAT = "verl_gq.quarantine_adapter/2"
# Format /1 held a kept and one quarantine knob per module (effective = kept + quarantine); it still loads.
FILE_FORMAT_V1 = "verl_gq.quarantine_adapter/1"
EFFECTIVE_KEY = "effective_knob"
QUARANTINE_KEY = "quarantine_knob"
# Parameters that belong to the adapter, not to the Hugging Face model (excluded from merged weights).
ADAPTER_PARAMETER_NAMES = ("basis_u", "basis_v", "knobs")
FINGERPRINT_PROBES = 4
FINGERPRINT_MIN_COSINE = 0.999


class AdapterLoadError(ValueError):
    """An adapter file that does not fit this model; the message says which module and why."""


@dataclass
class AdapterFile:
    """What `QuarantineAdapter.load` returns besides the knobs it loaded into the model."""

    extra_tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def inject_quarantine_adapter(
    model: nn.Module, config: QuarantineAdapterConfig, svd_device: Optional[Union[str, torch.device]] = None
) -> "QuarantineAdapter":
    """Replace every targeted `nn.Linear` of `model` by an `SVDQuarantineLinear` in place; return the handle.

    Each pattern of `config.target_modules` must match at least one `nn.Linear` (a typo is an error, not a no-op).
    With `config.freeze_base`, every parameter except the knobs stops requiring grad. `svd_device` lets a model
    built on CPU take its SVDs on an accelerator. On the meta device no SVD is done (see SVDQuarantineLinear).
    """
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    already = [name for name, module in linears if isinstance(module, SVDQuarantineLinear)]
    if already:
        raise AdapterConfigError(f"model already carries quarantine knobs at {already[:3]}...; inject once")
    unmatched = [p for p in config.target_modules if not any(pattern_matches(p, name) for name, _ in linears)]
    if unmatched:
        sample = [name for name, _ in linears[:8]]
        raise AdapterConfigError(
            f"target_modules patterns {unmatched} match no nn.Linear of {type(model).__name__}; "
            f"every pattern should match at least one (linear names look like {sample})"
        )
    device = torch.device(svd_device) if svd_device is not None else None
    layers: dict[str, SVDQuarantineLinear] = {}
    for name, linear in linears:
        if not config.matches(name):
            continue
        rank = config.rank_for(name, linear.out_features, linear.in_features)
        layer = SVDQuarantineLinear(linear, rank, n_quarantines=len(config.quarantines), svd_device=device)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
        layers[name] = layer
    if config.freeze_base:
        knobs = {id(layer.knobs) for layer in layers.values()}
        for parameter in model.parameters():
            if id(parameter) not in knobs:
                parameter.requires_grad_(False)
    return QuarantineAdapter(model, config, layers)


class QuarantineAdapter:
    """Handle on the injected layers of one model (ordered as in `model.named_modules()`).

    It holds no parameters of its own: every tensor lives on the model's modules, so FSDP, optimizers and
    checkpoints see them as ordinary model parameters.
    """

    def __init__(self, model: nn.Module, config: QuarantineAdapterConfig, layers: dict[str, SVDQuarantineLinear]):
        self.model = model
        self.config = config
        self.layers = layers
        # Set by a wrapper whose backward hooks need every knob to receive autograd's gradient (FSDP1 restores its
        # parameters only in post-backward hooks of flat parameters that get one): stash-mode captures then keep
        # the knobs in the graph (verl_gq/routing/capture.py).
        self.knob_gradient_totals = False

    @property
    def module_names(self) -> list[str]:
        return list(self.layers)

    @property
    def quarantine_names(self) -> list[str]:
        """The quarantines, in column order (column j + 1 of every layer's knobs is quarantine j)."""
        return list(self.config.quarantines)

    def knob_parameters(self) -> list[nn.Parameter]:
        """The (r, 1 + Q) knobs (effective, quarantines) of every layer: what the optimizer trains."""
        return [layer.knobs for layer in self.layers.values()]

    # --- views ----------------------------------------------------------------------------------------------

    def view_column(self, view: Optional[str]) -> int:
        """The knob column a view subtracts: 0 for the model as trained (None), j + 1 for quarantine j deleted."""
        if view is None:
            return AS_TRAINED
        if view not in self.config.quarantines:
            raise KeyError(f"no quarantine named {view!r}; this adapter has {self.quarantine_names} (None: as trained)")
        return 1 + self.config.quarantines.index(view)

    def set_view(self, view: Optional[str]) -> None:
        """None: the model as trained (the effective knob); a quarantine's name: the model deployed without it."""
        column = self.view_column(view)
        for layer in self.layers.values():
            layer.view = column

    @property
    def view(self) -> Optional[str]:
        columns = {layer.view for layer in self.layers.values()}
        if len(columns) != 1:
            raise RuntimeError(f"layers disagree on the view: columns {sorted(columns)}")
        column = columns.pop()
        return None if column == AS_TRAINED else self.config.quarantines[column - 1]

    @contextlib.contextmanager
    def viewing(self, view: Optional[str]) -> Iterator[None]:
        """Temporarily set the view (e.g. `with adapter.viewing("route2b"): evaluate()` for route2b's deployed model)."""
        previous = self.view
        self.set_view(view)
        try:
            yield
        finally:
            self.set_view(previous)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The exact base model (the reference policy) without a second copy of the weights."""
        previous = {name: layer.adapter_enabled for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.adapter_enabled = previous[name]

    # --- merged weights for a rollout engine or an export ---------------------------------------------------

    def merged_weights(self, view: Optional[str] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (hf_name, tensor) of the model's state with each adapted weight merged for `view` (None: as
        trained; a quarantine's name: deployed without it).

        Adapted weights become W + U_r diag(knob_scale) V_r^T; every other entry of `model.state_dict()` is passed
        through untouched (the same tensor, gathered if a DTensor); the adapter's own parameters are left out. One
        merged tensor exists at a time: consume the stream, do not `dict()` it, when memory matters. Under FSDP2
        every rank must iterate in step (gathers are collectives).
        """
        column = self.view_column(view)
        weight_names = {f"{name}.weight": layer for name, layer in self.layers.items()}
        adapter_names = {f"{name}.{p}" for name in self.layers for p in ADAPTER_PARAMETER_NAMES}
        for name, tensor in self.model.state_dict().items():
            if name in adapter_names:
                continue
            layer = weight_names.get(name)
            yield name, (layer.merged_weight(column) if layer is not None else full_tensor(tensor))

    # --- save / load ----------------------------------------------------------------------------------------

    def basis_fingerprints(self) -> dict[str, torch.Tensor]:
        """Per module, a (rank, probes) float64 sketch of the bases that identifies them up to float noise.

        Entry [k, j] = (u_k . p_j)(v_k . q_j) for fixed seeded Gaussian probes p_j, q_j. It is invariant under the
        joint sign flip of (u_k, v_k), which leaves U diag(d) V^T and hence every knob's meaning unchanged, and it
        is continuous, so bases recomputed on other hardware match while bases of another weight do not.
        """
        return {name: _fingerprint(full_tensor(layer.basis_u), full_tensor(layer.basis_v)) for name, layer in self.layers.items()}

    def save(
        self,
        path: Union[str, Path],
        extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Write knobs, basis fingerprints, `extra_tensors` (directions, bands, ...) and string `metadata` to ONE
        safetensors file. The resolved adapter config is stored under metadata key `verl_gq.adapter_config`."""
        tensors: dict[str, torch.Tensor] = {}
        fingerprints = self.basis_fingerprints()
        for name, layer in self.layers.items():
            knobs = full_tensor(layer.knobs)
            tensors[f"adapter.{name}.{EFFECTIVE_KEY}"] = knobs[:, EFFECTIVE]
            for column, quarantine in enumerate(self.config.quarantines, start=1):
                tensors[f"adapter.{name}.{QUARANTINE_KEY}.{quarantine}"] = knobs[:, column]
            tensors[f"adapter.{name}.basis_fingerprint"] = fingerprints[name]
        for key, value in (extra_tensors or {}).items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"extra_tensors[{key!r}] must be a tensor, got {type(value).__name__}")
            tensors[f"extra.{key}"] = full_tensor(value)
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        reserved = [k for k in meta if k.startswith("verl_gq.")]
        if reserved:
            raise ValueError(f"metadata keys {reserved} use the reserved prefix 'verl_gq.'")
        meta.update(
            {
                "verl_gq.format": FILE_FORMAT,
                "verl_gq.adapter_config": json.dumps(self.config.to_dict(), sort_keys=True),
                "verl_gq.module_names": json.dumps(self.module_names),
            }
        )
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @torch.no_grad()
    def load(self, path: Union[str, Path]) -> AdapterFile:
        """Load knobs saved by `save` into this model after checking that the file belongs to it.

        Fails with `AdapterLoadError` when the file is not an adapter file, its modules, ranks or quarantines differ,
        a knob is not finite, or a module's basis fingerprint does not match (the file was made on another base
        model). Returns the extra tensors and the user metadata. A file of format /1 (a kept and one quarantine knob
        per module) loads as effective = kept + quarantine into an adapter with one quarantine.
        """
        contents = read_adapter_file(path)
        if contents.module_names != self.module_names:
            missing = sorted(set(self.module_names) - set(contents.module_names))
            unexpected = sorted(set(contents.module_names) - set(self.module_names))
            raise AdapterLoadError(
                f"{path}: adapted modules differ from this model's (missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, or a different order); the file should come from the same target_modules"
            )
        if contents.quarantines != self.quarantine_names:
            raise AdapterLoadError(f"{path}: the file's quarantines are {contents.quarantines}, this adapter's "
                                   f"{self.quarantine_names}; build the adapter from adapter_config_of(path)")
        fingerprints = self.basis_fingerprints()
        for name, layer in self.layers.items():
            saved = contents.fingerprints[name]
            if saved.shape != fingerprints[name].shape:
                raise AdapterLoadError(
                    f"{path}: {name} was saved at rank {saved.shape[0]}, this model has rank {layer.rank}"
                )
            cosine = torch.nn.functional.cosine_similarity(saved.flatten(), fingerprints[name].flatten(), dim=0)
            if not cosine >= FINGERPRINT_MIN_COSINE:
                raise AdapterLoadError(
                    f"{path}: basis fingerprint of {name} does not match this model (cosine {cosine.item():.4f} < "
                    f"{FINGERPRINT_MIN_COSINE}): the knobs were trained on another base model and mean nothing here"
                )
        for name, layer in self.layers.items():
            knobs = contents.knobs[name]
            if knobs.shape != tuple(layer.knobs.shape):
                raise AdapterLoadError(f"{path}: {name}'s knobs have shape {tuple(knobs.shape)}, this model's "
                                       f"{tuple(layer.knobs.shape)}")
            _copy_into(layer.knobs, knobs)
        return AdapterFile(extra_tensors=contents.extra_tensors, metadata=contents.metadata)


@dataclass(frozen=True)
class AdapterFileContents:
    """An adapter file read and checked on its own (no model): knobs as (r, 1 + Q) per module, in file order."""

    config: QuarantineAdapterConfig
    module_names: list[str]
    knobs: dict[str, torch.Tensor]
    fingerprints: dict[str, torch.Tensor]
    extra_tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def quarantines(self) -> list[str]:
        return list(self.config.quarantines)


def read_adapter_file(path: Union[str, Path]) -> AdapterFileContents:
    """Read an adapter file (format /2, or /1 of one kept and one quarantine knob per module) and check it on its own:
    every module has its knobs and fingerprint, shapes agree, and every knob is finite. Errors name the file and the
    module."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            file_format = meta.get("verl_gq.format")
            if file_format not in (FILE_FORMAT, FILE_FORMAT_V1):
                raise AdapterLoadError(f"{path}: not a {FILE_FORMAT} file (format={file_format!r})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except AdapterLoadError:
        raise
    except Exception as error:  # safetensors raises its own types for a truncated or garbled file
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    try:
        module_names = json.loads(meta["verl_gq.module_names"])
        config_dict = json.loads(meta["verl_gq.adapter_config"])
    except (KeyError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{path}: metadata lacks a readable verl_gq.module_names / adapter_config ({error})") \
            from None
    user_meta = {k: v for k, v in meta.items() if not k.startswith("verl_gq.")}
    if file_format == FILE_FORMAT_V1:
        # one kept and one quarantine knob per module: effective = kept + quarantine, the quarantine named by the run
        config_dict["quarantines"] = [user_meta.get("arm") or "quarantine"]
    try:
        config = QuarantineAdapterConfig(**config_dict)
    except (TypeError, AdapterConfigError) as error:
        raise AdapterLoadError(f"{path}: metadata verl_gq.adapter_config is not a valid adapter config ({error})") \
            from None
    knobs, fingerprints = {}, {}
    for name in module_names:
        try:
            fingerprints[name] = tensors[f"adapter.{name}.basis_fingerprint"]
            if file_format == FILE_FORMAT_V1:
                kept, quarantine = tensors[f"adapter.{name}.keep_knob"], tensors[f"adapter.{name}.quarantine_knob"]
                columns = [kept + quarantine, quarantine]
            else:
                columns = [tensors[f"adapter.{name}.{EFFECTIVE_KEY}"]] + [
                    tensors[f"adapter.{name}.{QUARANTINE_KEY}.{q}"] for q in config.quarantines]
        except KeyError as error:
            raise AdapterLoadError(f"{path}: module {name} lacks tensor {error}") from None
        if len({tuple(c.shape) for c in columns}) != 1 or columns[0].dim() != 1:
            raise AdapterLoadError(f"{path}: {name}'s knobs have shapes {[tuple(c.shape) for c in columns]}, "
                                   f"should be equal vectors of the module's rank")
        stacked = torch.stack(columns, dim=1)
        if not bool(torch.isfinite(stacked).all()):
            raise AdapterLoadError(f"{path}: {name}'s knobs hold NaN or inf values: the run diverged or the file "
                                   f"is damaged")
        knobs[name] = stacked
    extra = {key[len("extra.") :]: value for key, value in tensors.items() if key.startswith("extra.")}
    return AdapterFileContents(config, module_names, knobs, fingerprints, extra, user_meta)


def adapter_config_of(path: Union[str, Path]) -> QuarantineAdapterConfig:
    """The adapter config a file was saved with (quarantines included), to build the adapter it loads into."""
    return read_adapter_file(path).config


def _fingerprint(basis_u: torch.Tensor, basis_v: torch.Tensor) -> torch.Tensor:
    u, v = basis_u.detach().to("cpu", torch.float64), basis_v.detach().to("cpu", torch.float64)
    probe_out = torch.randn(u.shape[0], FINGERPRINT_PROBES, generator=_generator(u.shape[0]), dtype=torch.float64)
    probe_in = torch.randn(v.shape[0], FINGERPRINT_PROBES, generator=_generator(-v.shape[0]), dtype=torch.float64)
    return (u.T @ probe_out) * (v.T @ probe_in)


def _generator(tag: int) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"verl_gq.fingerprint.{tag}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def _copy_into(parameter: nn.Parameter, value: torch.Tensor) -> None:
    if parameter.shape != value.shape:
        raise AdapterLoadError(f"knob shape {tuple(value.shape)} does not fit parameter {tuple(parameter.shape)}")
    if hasattr(parameter, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements)
        parameter.copy_(value)
    else:
        parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
