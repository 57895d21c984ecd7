"""patch()/unpatch() mechanics: before/after build, exact restore, idempotence, unknown types, plugins."""

from __future__ import annotations

import importlib.metadata
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama import modeling_llama as ml

import cpt_plugin
from cpt_plugin.patching import registry as registry_module
from cpt_plugin.patching.base import PatchReport
from cpt_plugin.patching.family import FamilySpec, rope_signature_matches
from cpt_plugin.patching.registry import Registry, get_registry, hookimpl, patch, unpatch
from tests.patching.models import assert_same_grads, batch, tiny_model, train_step


def _llama_originals() -> dict[str, object]:
    return {
        "norm": ml.LlamaRMSNorm,
        "rope": ml.apply_rotary_pos_emb,
        "mlp": ml.LlamaMLP.__dict__["forward"],
        "lm": ml.LlamaForCausalLM.__dict__["forward"],
    }


def test_public_names_are_reexported() -> None:
    assert cpt_plugin.patch is patch and cpt_plugin.unpatch is unpatch


def test_builtin_families_registered_once() -> None:
    registry = get_registry()
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3"):
        assert model_type in registry
    assert registry.get("gemma3") is registry.get("gemma3_text")  # one patcher, one ledger per module


def test_patch_before_build_uses_our_modules_and_matches() -> None:
    reference = tiny_model("llama")
    inputs = batch()
    want_loss, want_grads, _ = train_step(reference, inputs)

    report = patch("llama")
    assert set(report.applied) == {"rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"}
    assert ml.LlamaRMSNorm.__name__ == "CPTLlamaRMSNorm"
    assert issubclass(ml.LlamaRMSNorm, _llama_originals_before_patch["norm"])
    model = tiny_model("llama")  # built from the patched module: our classes from the start
    model.load_state_dict(reference.state_dict())
    norms = [m for m in model.modules() if isinstance(m, _llama_originals_before_patch["norm"])]
    assert len(norms) == 3 and all(type(m) is ml.LlamaRMSNorm for m in norms)

    got_loss, got_grads, out = train_step(model, inputs)
    assert out.logits is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert_same_grads(got_grads, want_grads)


_llama_originals_before_patch = _llama_originals()


def test_unpatch_restores_exact_originals_and_patch_is_idempotent() -> None:
    before = _llama_originals()
    model = tiny_model("llama")
    first = patch(model)
    patched = _llama_originals()
    second = patch(model)
    assert _llama_originals() == patched  # same replacement objects the second time
    assert first.applied.keys() == second.applied.keys()
    assert all(a is not b for a, b in zip(before.values(), patched.values(), strict=True))

    unpatch("llama")
    assert _llama_originals() == before
    assert all(type(m) is before["norm"] for m in model.modules() if isinstance(m, before["norm"]))
    assert not any(type(m).__name__.startswith("CPT") for m in model.modules())
    unpatch("llama")  # nothing left to do
    assert _llama_originals() == before


def test_unknown_model_type_warns_once_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", None)  # fresh "warned" memory
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=257, n_positions=32))
    inputs = batch()
    want_loss, want_grads, _ = train_step(model, inputs)
    forward = type(model).__dict__["forward"]

    with pytest.warns(UserWarning, match="no kernel patcher for model_type 'gpt2'"):
        report = patch(model)
    assert not report.applied and set(report.skipped) == {
        "rms_norm",
        "rope",
        "swiglu",
        "fused_linear_cross_entropy",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(model)  # second time: silent
        patch("gpt2")
    assert type(model).__dict__["forward"] is forward
    got_loss, got_grads, out = train_step(model, inputs)
    assert out.logits is not None
    torch.testing.assert_close(got_loss, want_loss)
    assert_same_grads(got_grads, want_grads, rtol=0, atol=0)


def test_kernel_switches_and_config_choose_kernels() -> None:
    from cpt_plugin import config as config_module

    report = patch("llama", rope=False, fused_linear_cross_entropy=False)
    assert set(report.applied) == {"rms_norm", "swiglu"}
    assert not hasattr(ml.apply_rotary_pos_emb, "__cpt_patched__")
    unpatch()

    config = config_module.CPTConfig(kernels=["rms_norm"])
    assert set(patch("llama", config).applied) == {"rms_norm"}
    assert not patch("llama", config_module.CPTConfig(kernels=False)).applied
    assert ml.LlamaRMSNorm.__name__ == "CPTLlamaRMSNorm"  # patching adds; only unpatch() removes
    with pytest.raises(TypeError, match="unknown kernel switch"):
        patch("llama", layer_norm=True)


def test_mlp_left_alone_for_an_activation_without_kernel() -> None:
    model = tiny_model("llama", hidden_act="gelu")
    inputs = batch()
    want_loss, want_grads, _ = train_step(model, inputs)
    report = patch(model, rms_norm=False, rope=False, fused_linear_cross_entropy=False)
    assert "swiglu" in report.skipped and not report.applied
    assert "forward" not in vars(ml.LlamaMLP) or not hasattr(ml.LlamaMLP.forward, "__cpt_patched__")
    # A model whose MLP class was patched for another config still runs its own activation.
    patch("llama", rms_norm=False, rope=False, fused_linear_cross_entropy=False)
    got_loss, got_grads, _ = train_step(model, inputs)
    torch.testing.assert_close(got_loss, want_loss)
    assert_same_grads(got_grads, want_grads)


def test_gradient_checkpointing_still_happens_after_patching() -> None:
    model = tiny_model("llama", num_hidden_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 5.24 prefers activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patch(model)
    calls = []
    for layer in model.model.layers:
        inner = layer._gradient_checkpointing_func

        def counting(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counting
    loss, grads, _ = train_step(model, batch())
    assert len(calls) == 2 and torch.isfinite(loss)
    assert grads["model.layers.0.mlp.gate_proj.weight"].abs().sum() > 0


def test_rope_signature_check_sees_through_hub_kernel_wrappers() -> None:
    class HubWrapped(nn.Module):  # what kernels' use_kernel_forward_from_hub makes of a function
        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return q, k

    def old_style(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return q, k

    assert rope_signature_matches(ml.apply_rotary_pos_emb)
    assert rope_signature_matches(HubWrapped())
    assert not rope_signature_matches(old_style)


class _RecordingPatcher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def patch(self, model, kernels):
        self.calls.append(("patch", model))
        report = PatchReport(model_type="gpt2")
        report.add("rms_norm", "recorded")
        return report

    def unpatch(self, model):
        self.calls.append(("unpatch", model))


def test_third_party_plugin_object_registers_a_patcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    recorder = _RecordingPatcher()

    class Plugin:
        @hookimpl
        def cpt_plugin_register_patchers(self, registry: Registry) -> None:
            registry.register("gpt2", recorder)
            registry.register("llama", recorder)  # builtin kept: warns, does not override

    with pytest.warns(UserWarning, match="already registered"):
        get_registry().add_plugin(Plugin())
    assert patch("gpt2").applied == {"rms_norm": ["recorded"]}
    unpatch()
    assert recorder.calls == [("patch", None), ("unpatch", None)]
    assert get_registry().get("llama") is not recorder


def test_entry_point_plugins_load_and_builtin_is_not_registered_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = FamilySpec(
        name="my_llama",
        model_types=("my_llama",),
        module="transformers.models.llama.modeling_llama",
        rms_norm_class="LlamaRMSNorm",
        rope_function=None,
    )
    plugin = types.ModuleType("cpt_test_thirdparty_plugin")

    @hookimpl
    def cpt_plugin_register_patchers(registry: Registry) -> None:
        registry.register("my_llama", spec)

    plugin.cpt_plugin_register_patchers = cpt_plugin_register_patchers
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    group = registry_module.ENTRY_POINT_GROUP
    entry_points = [
        importlib.metadata.EntryPoint("builtin", "cpt_plugin.patching.families", group),
        importlib.metadata.EntryPoint("thirdparty", plugin.__name__, group),
        importlib.metadata.EntryPoint("broken", "cpt_no_such_module_xyz", group),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: entry_points)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)

    with pytest.warns(UserWarning, match="could not load patcher plugin 'broken'") as caught:
        registry = get_registry()
    assert not [w for w in caught if "already registered" in str(w.message)]
    assert "my_llama" in registry and "llama" in registry
    assert set(patch("my_llama").applied) == {"rms_norm"}
    assert ml.LlamaRMSNorm.__name__ == "CPTLlamaRMSNorm"
    patch("llama")  # a second family patcher over the same module: unpatch() still unwinds both
    assert issubclass(ml.LlamaRMSNorm, _llama_originals_before_patch["norm"])
    unpatch()
    assert _llama_originals() == _llama_originals_before_patch
