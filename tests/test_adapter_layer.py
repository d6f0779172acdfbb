"""The quarantine adapter on tiny Qwen2 and Qwen3 models (float64, CPU): injection, exactness of the base /
disabled / as-trained / deployed views, merged weights, meta-device construction, save/load (and files written
before routers), and bad inputs."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from verl_gq.adapter import (
    AdapterConfigError,
    AdapterLoadError,
    QuarantineAdapterConfig,
    SVDQuarantineLinear,
    inject_quarantine_adapter,
)
from verl_gq.adapter.layer import EFFECTIVE

VOCAB = 97
RANK = 6


def tiny_model(family: str, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    if family == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = Qwen3Config(head_dim=8, **common), Qwen3ForCausalLM
    with torch.device(device):
        model = cls(config)
    return model.to(torch.float64).eval()


def logits(model, input_ids):
    return model(input_ids=input_ids, use_cache=False).logits


def randomise_knobs(adapter, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.knob_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)


# tiny matrices run faster on one thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["qwen2", "qwen3"])
def family(request):
    return request.param


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))


def test_injection_reuses_base_parameters_keeps_hf_names_and_trains_only_knobs(family):
    model = tiny_model(family)
    originals = {name: p for name, p in model.named_parameters()}
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK))
    assert len(adapter.layers) == 2 * 7, "every attention and MLP projection of both layers should be adapted"
    for name, parameter in model.named_parameters():
        if name in originals:
            assert parameter is originals[name], f"{name} should be the base model's own Parameter object"
    new_names = set(dict(model.named_parameters())) - set(originals)
    expected = {f"{m}.{p}" for m in adapter.layers for p in ("basis_u", "basis_v", "knobs")}
    assert new_names == expected, "the adapter should add exactly bases and knobs under the adapted module paths"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.knobs" for m in adapter.layers}
    for layer in adapter.layers.values():
        assert isinstance(layer, torch.nn.Linear) and isinstance(layer, SVDQuarantineLinear)


def test_bases_are_the_top_singular_vectors_of_the_base_weight(family):
    model = tiny_model(family)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK))
    for name, layer in adapter.layers.items():
        singular = torch.linalg.svdvals(layer.weight.detach())
        eye = torch.eye(RANK, dtype=torch.float64)
        assert torch.allclose(layer.basis_u.T @ layer.basis_u, eye, atol=1e-12), f"{name}: U_r should be orthonormal"
        assert torch.allclose(layer.basis_v.T @ layer.basis_v, eye, atol=1e-12), f"{name}: V_r should be orthonormal"
        core = layer.basis_u.T @ layer.weight.detach() @ layer.basis_v
        assert torch.allclose(core, torch.diag(singular[:RANK]), atol=1e-12), f"{name}: U_r^T W V_r = top-r singular values"


def test_zero_knobs_reproduce_base_logits_exactly(family, input_ids):
    model = tiny_model(family)
    base = logits(model, input_ids)
    inject_quarantine_adapter(model, QuarantineAdapterConfig(rank="full"))
    diff = (logits(model, input_ids) - base).abs().max().item()
    assert diff == 0.0, f"with both knobs at 0 the adapted model should equal the base bit for bit (max diff {diff})"


def test_disabled_adapter_equals_base_exactly(family, input_ids):
    model = tiny_model(family)
    base = logits(model, input_ids)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK))
    randomise_knobs(adapter)
    assert (logits(model, input_ids) - base).abs().max() > 1e-3, "random knobs should change the model"
    with adapter.disabled():
        diff = (logits(model, input_ids) - base).abs().max().item()
    assert diff == 0.0, f"the disabled adapter (reference policy) should be exactly the base (max diff {diff})"
    assert (logits(model, input_ids) - base).abs().max() > 1e-3, "leaving disabled() should restore the knobs"


def test_deployed_view_removes_exactly_its_own_quarantine(family, input_ids):
    """Two quarantines: the deployed view of each equals the model whose effective knob has that quarantine
    subtracted by hand, and the as-trained view is the effective knob alone."""
    model = tiny_model(family)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK, quarantines=["route2b", "random_v"]))
    randomise_knobs(adapter)
    as_trained = logits(model, input_ids)
    for column, name in enumerate(adapter.quarantine_names, start=1):
        with adapter.viewing(name):
            assert adapter.view == name
            deployed = logits(model, input_ids)
        by_hand = copy.deepcopy(model)  # the same model with the effective knob minus this quarantine, no quarantines
        with torch.no_grad():
            for module in by_hand.modules():
                if isinstance(module, SVDQuarantineLinear):
                    module.knobs[:, EFFECTIVE] -= module.knobs[:, column]
                    module.knobs[:, 1:] = float("nan")  # the as-trained view must not read them at all
        assert (as_trained - deployed).abs().max() > 1e-3, f"{name}: its quarantine should contribute as trained"
        assert (deployed - logits(by_hand, input_ids)).abs().max().item() == 0.0, \
            f"{name}: the deployed view should be effective - quarantine exactly"
    assert adapter.view is None and (logits(model, input_ids) - as_trained).abs().max().item() == 0.0
    with pytest.raises(KeyError, match="no quarantine named 'route2c'"):
        adapter.set_view("route2c")


def test_merged_weights_give_the_adapted_model_logits(family, input_ids):
    model = tiny_model(family)
    fresh = copy.deepcopy(model)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK, quarantines=["a", "b"]))
    randomise_knobs(adapter)
    for view in (None, "a", "b"):
        merged = dict(adapter.merged_weights(view))
        assert set(merged) == set(fresh.state_dict()), "merged weights should carry exactly the base model's HF names"
        fresh.load_state_dict(merged)
        with adapter.viewing(view):
            expected = logits(model, input_ids)
        diff = (logits(fresh, input_ids) - expected).abs().max().item()
        assert diff < 1e-12, f"merged weights of view {view} should reproduce that view (diff {diff})"
    untouched = dict(adapter.merged_weights())["model.embed_tokens.weight"]
    assert untouched.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "non-adapted weights should stream uncopied"


def test_meta_device_build_takes_broadcast_state(family, input_ids):
    rank0 = tiny_model(family)
    adapter0 = inject_quarantine_adapter(rank0, QuarantineAdapterConfig(rank=RANK))
    randomise_knobs(adapter0)
    other = tiny_model(family, device="meta")
    adapter_meta = inject_quarantine_adapter(other, QuarantineAdapterConfig(rank=RANK))
    for name, layer in adapter_meta.layers.items():
        assert layer.basis_u.is_meta and layer.basis_u.shape == adapter0.layers[name].basis_u.shape
        assert layer.knobs.shape == (RANK, 2) and layer.knobs.dtype == torch.float64
    other.to_empty(device="cpu")
    other.load_state_dict(rank0.state_dict())  # what verl's rank-0 broadcast amounts to
    other.model.rotary_emb.inv_freq.copy_(rank0.model.rotary_emb.inv_freq)  # a non-persistent buffer
    diff = (logits(other, input_ids) - logits(rank0, input_ids)).abs().max().item()
    assert diff == 0.0, f"a meta-built model given rank 0's state should equal rank 0 (diff {diff})"


def test_save_load_round_trip_restores_knobs_extra_state_and_metadata(family, input_ids, tmp_path):
    base = tiny_model(family)
    model = copy.deepcopy(base)
    adapter = inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=RANK))
    randomise_knobs(adapter)
    extra = {"direction.model.layers.0.mlp.up_proj": torch.randn(1, RANK, dtype=torch.float64), "band": torch.tensor([0.1, 0.3])}
    path = tmp_path / "train.safetensors"
    adapter.save(path, extra_tensors=extra, metadata={"run": "unit", "step": 7})
    restored_model = copy.deepcopy(base)
    restored = inject_quarantine_adapter(restored_model, QuarantineAdapterConfig(rank=RANK))
    loaded = restored.load(path)
    for name in adapter.layers:
        assert torch.equal(adapter.layers[name].knobs, restored.layers[name].knobs)
    assert set(loaded.extra_tensors) == set(extra) and all(torch.equal(loaded.extra_tensors[k], extra[k]) for k in extra)
    assert loaded.metadata == {"run": "unit", "step": "7"}
    assert (logits(restored_model, input_ids) - logits(model, input_ids)).abs().max().item() == 0.0


def test_load_accepts_bases_that_differ_by_joint_sign_flips(tmp_path):
    """Flipping (u_k, v_k) together leaves U diag(d) V^T unchanged; such bases are the same and must load."""
    base = tiny_model("qwen2")
    adapter = inject_quarantine_adapter(copy.deepcopy(base), QuarantineAdapterConfig(rank=RANK))
    adapter.save(tmp_path / "a.safetensors")
    flipped = inject_quarantine_adapter(copy.deepcopy(base), QuarantineAdapterConfig(rank=RANK))
    with torch.no_grad():
        for layer in flipped.layers.values():
            sign = torch.tensor([(-1.0) ** k for k in range(RANK)], dtype=torch.float64)
            layer.basis_u.mul_(sign)
            layer.basis_v.mul_(sign)
    flipped.load(tmp_path / "a.safetensors")


def test_load_onto_a_different_base_fails_clearly(tmp_path):
    adapter = inject_quarantine_adapter(tiny_model("qwen2", seed=0), QuarantineAdapterConfig(rank=RANK))
    adapter.save(tmp_path / "a.safetensors")
    other = inject_quarantine_adapter(tiny_model("qwen2", seed=1), QuarantineAdapterConfig(rank=RANK))
    with pytest.raises(AdapterLoadError, match="fingerprint .* does not match"):
        other.load(tmp_path / "a.safetensors")
    lower_rank = inject_quarantine_adapter(tiny_model("qwen2", seed=0), QuarantineAdapterConfig(rank=RANK - 1))
    with pytest.raises(AdapterLoadError, match="rank"):
        lower_rank.load(tmp_path / "a.safetensors")
    fewer = inject_quarantine_adapter(tiny_model("qwen2", seed=0), QuarantineAdapterConfig(rank=RANK, target_modules=["q_proj"]))
    with pytest.raises(AdapterLoadError, match="adapted modules differ"):
        fewer.load(tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "positive int"),
        (dict(rank="half"), "positive int"),
        (dict(rank=True), "positive int"),
        (dict(target_modules=[]), "non-empty"),
        (dict(target_modules="q_proj"), "non-empty list"),
        (dict(target_modules=["re:("]), "bad regex"),
        (dict(quarantines=["route 2b"]), "letters, digits and _"),
        (dict(quarantines=["a", "a"]), "appears twice"),
        (dict(quarantines="a"), "list of names"),
    ],
)
def test_bad_config_fails_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(AdapterConfigError, match=message):
        QuarantineAdapterConfig(**kwargs)


def test_injection_errors_name_the_problem():
    with pytest.raises(AdapterConfigError, match=r"\['qproj'\] match no nn.Linear"):
        inject_quarantine_adapter(tiny_model("qwen2"), QuarantineAdapterConfig(target_modules=["q_proj", "qproj"]))
    with pytest.raises(AdapterConfigError, match="exceeds min\\(d_out, d_in\\)=16 of model.layers.0.self_attn.k_proj"):
        inject_quarantine_adapter(tiny_model("qwen2"), QuarantineAdapterConfig(rank=20, target_modules=["k_proj"]))
    model = tiny_model("qwen2")
    inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=2))
    with pytest.raises(AdapterConfigError, match="inject once"):
        inject_quarantine_adapter(model, QuarantineAdapterConfig(rank=2))


def test_target_patterns_select_by_suffix_glob_and_regex():
    model = tiny_model("qwen2")
    config = QuarantineAdapterConfig(rank=2, target_modules=["*.0.mlp.*", "re:model\\.layers\\.1\\.self_attn\\.[qk]_proj"])
    adapter = inject_quarantine_adapter(model, config)
    assert adapter.module_names == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
    ]


def test_a_file_written_before_routers_loads_as_effective_and_one_quarantine(tmp_path):
    """A run of the committed H100 study (adapter format /1: a kept and a quarantine knob per module) loads with its
    arm as the one quarantine and effective = kept + quarantine, and saves back in the current format."""
    from pathlib import Path

    from safetensors.torch import load_file

    from verl_gq.adapter import read_adapter_file
    from verl_gq.eval.deploy import load_model_with_knobs
    from verl_gq.organism.shipped import CHECKPOINT_DIR

    stored = (Path(__file__).parents[1] / "docs/results/2026-11-24-h100-organism-study/runs/route2b_s41"
              / "train.safetensors")
    _, _, adapter = load_model_with_knobs(str(CHECKPOINT_DIR), stored, "cpu")
    assert adapter.quarantine_names == ["route2b"], "the arm of a format-/1 file names its one quarantine"
    saved = load_file(str(stored))
    for name, layer in adapter.layers.items():
        kept, quarantine = saved[f"adapter.{name}.keep_knob"], saved[f"adapter.{name}.quarantine_knob"]
        assert torch.equal(layer.knobs[:, 1], quarantine.to(layer.knobs.dtype)), name
        assert torch.equal(layer.knobs[:, 0], (kept + quarantine).to(layer.knobs.dtype)), name
        with adapter.viewing("route2b"):
            assert torch.allclose(layer.merged_weight(layer.view), layer.merged_weight(0) -
                                  (layer.basis_u * quarantine) @ layer.basis_v.T, atol=1e-5)
    assert any(layer.knobs[:, 1].abs().max() > 0 for layer in adapter.layers.values()), "a trained quarantine"
    adapter.save(tmp_path / "again.safetensors")
    again = read_adapter_file(tmp_path / "again.safetensors")
    assert again.quarantines == ["route2b"]
    assert all(torch.equal(again.knobs[name], layer.knobs.detach()) for name, layer in adapter.layers.items())


def test_damaged_or_non_finite_adapter_files_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    adapter = inject_quarantine_adapter(tiny_model("qwen2"), QuarantineAdapterConfig(rank=RANK))
    randomise_knobs(adapter)
    good = tmp_path / "train.safetensors"
    adapter.save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(AdapterLoadError, match="truncated.safetensors: not a readable safetensors file"):
        adapter.load(truncated)
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(good))
    key = next(k for k in tensors if k.endswith("effective_knob"))
    tensors[key][1] = float("nan")
    poisoned = tmp_path / "nan.safetensors"
    save_file(tensors, str(poisoned), metadata=metadata)
    with pytest.raises(AdapterLoadError, match=r"nan.safetensors: .* NaN or inf"):
        adapter.load(poisoned)
    other = inject_quarantine_adapter(tiny_model("qwen2"), QuarantineAdapterConfig(rank=RANK, quarantines=["a", "b"]))
    with pytest.raises(AdapterLoadError, match=r"quarantines are \['quarantine'\], this adapter's \['a', 'b'\]"):
        other.load(good)
