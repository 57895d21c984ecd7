"""Tiled MLP: forward and gradients equal the untiled MLP, LoRA included."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_models import tiny_llama
from transformers.models.llama.modeling_llama import LlamaMLP

from cpt_plugin.offload.checkpointing import enable_checkpointing, in_recompute
from cpt_plugin.offload.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, tiled_mlp
from cpt_plugin.patching.registry import mlp_feeds_residual_only
from tests.patching.models import FAMILIES, tiny_model


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("shape", [(2, 13), (1, 40), (3, 7), (37,)])
@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_tiled_mlp_matches_module(shape, chunk) -> None:
    mlp = tiny_llama(layers=1).model.layers[0].mlp
    x = torch.randn(*shape, 64, requires_grad=True)
    grad = torch.randn(*shape, 64)
    ref = mlp(x)
    ref_grads = torch.autograd.grad(ref, [x, *mlp.parameters()], grad)
    out = tiled_mlp(mlp, x, chunk)
    grads = torch.autograd.grad(out, [x, *mlp.parameters()], grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_params_get_grads_when_input_needs_none() -> None:
    mlp = tiny_llama(layers=1).model.layers[0].mlp
    x = torch.randn(2, 21, 64)
    ref_grads = torch.autograd.grad(mlp(x).square().sum(), list(mlp.parameters()))
    grads = torch.autograd.grad(tiled_mlp(mlp, x, 8).square().sum(), list(mlp.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq", [9, 30])
@pytest.mark.parametrize("checkpointing", ["off", "offload"])
def test_model_with_lora_tiled_equals_untiled(seq: int, checkpointing: str) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False
    )
    reference = get_peft_model(tiny_llama(layers=2), config)
    model = copy.deepcopy(reference)
    assert enable_tiled_mlp(model, chunk_tokens=16) == 2
    if checkpointing != "off":
        enable_checkpointing(model, checkpointing, _simulate_offload=True)
    calls = [0]
    for layer in model.get_base_model().model.layers:
        layer.mlp.up_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ids = torch.randint(0, 257, (2, seq))
    ref = _grads(reference, ids)
    grads = _grads(model, ids)
    assert any("lora_B" in n and "mlp" in n for n in grads)
    _assert_same(grads, ref)
    tokens = 2 * seq
    if tokens > 16:
        # the forward's chunks and the tiled backward's; the checkpoint's recompute of a Llama layer
        # skips them (its MLP output only feeds the thrown-away layer output)
        assert calls[0] == 2 * (2 * -(-tokens // 16))
    else:  # short: untiled, plus the checkpoint's recompute
        assert calls[0] == 2 * (1 + (checkpointing != "off"))


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_skips_the_chunks_only_where_the_output_is_unused(family: str) -> None:
    """Llama/Mistral/Qwen add the MLP output to the residual and save nothing of it: the recompute skips
    the chunks. Gemma 2/3 normalize it first (that norm saves it): their recompute must compute them."""
    reference = tiny_model(family, num_hidden_layers=2)
    model = copy.deepcopy(reference)
    assert enable_tiled_mlp(model, chunk_tokens=8) == 2
    enable_checkpointing(model, "offload", _simulate_offload=True)
    calls = [0]
    recomputed_outputs: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.up_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        layer.mlp.register_forward_hook(
            lambda _m, _i, out: recomputed_outputs.append(out) if in_recompute() else None
        )
    ids = torch.randint(0, 257, (2, 11))
    _assert_same(_grads(model, ids), _grads(reference, ids), rtol=1e-4, atol=1e-5)
    skips = mlp_feeds_residual_only(model.model.layers[0])
    assert skips == (not family.startswith("gemma"))
    passes = 2 if skips else 3  # forward and tiled backward, plus the recompute where it is needed
    assert calls[0] == 2 * passes * 3  # 2 layers, 22 tokens in 3 chunks
    if skips:  # the skipped output: zeros from one element, no tokens x hidden buffer
        assert len(recomputed_outputs) == 2
        assert all(
            not out.any() and out.untyped_storage().nbytes() == out.element_size()
            for out in recomputed_outputs
        )


def test_lora_dropout_masks_reproduced_in_backward() -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_dropout=0.5, target_modules=["gate_proj", "down_proj"], init_lora_weights=False
    )
    model = get_peft_model(tiny_llama(layers=1), config)
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(3, 11, 64, requires_grad=True)
    params = [p for p in mlp.parameters() if p.requires_grad]
    torch.manual_seed(5)
    flat = x.reshape(-1, 64)
    ref = torch.cat([mlp(flat[s : s + 8]) for s in range(0, 33, 8)]).view(3, 11, 64)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    torch.manual_seed(5)
    out = tiled_mlp(mlp, x, 8)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_class_level_forward_patch_is_used_and_disable_restores(monkeypatch) -> None:
    model = tiny_llama(layers=2)
    enable_tiled_mlp(model, chunk_tokens=4)
    seen = []
    original = LlamaMLP.forward

    def patched(self, x):
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(LlamaMLP, "forward", patched)  # as a kernel patch would, after enabling
    ids = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        model(input_ids=ids)
    # without grad too (an eval, or the checkpoint's graph-free forward): one chunk's intermediates at a time
    assert seen == [4, 4, 2, 4, 4, 2]
    seen.clear()
    model(input_ids=ids, labels=ids).loss.backward()
    assert seen and max(seen) == 4  # flattened rows in chunks of 4
    assert disable_tiled_mlp(model) == 2
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def test_keeps_an_existing_instance_forward() -> None:
    model = tiny_llama(layers=1)
    mlp = model.model.layers[0].mlp
    calls = []

    def instance_forward(x):
        calls.append(x.shape)
        return LlamaMLP.forward(mlp, x)

    mlp.forward = instance_forward
    enable_tiled_mlp(model, chunk_tokens=4)
    x = torch.randn(1, 9, 64, requires_grad=True)
    mlp(x).sum().backward()
    assert len(calls) == 6  # 3 chunks forward + 3 chunks backward
    disable_tiled_mlp(model)
    assert mlp.forward is instance_forward
