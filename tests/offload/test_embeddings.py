"""Frozen PEFT embedding originals moved off the device and back, bit-exactly and on demand."""

from __future__ import annotations

import copy

import pytest
import torch
from offload_models import tiny_llama
from peft import LoraConfig, get_peft_model

from cpt_plugin.offload.embeddings import (
    offload_frozen_embeddings,
    offloaded_bytes,
    restore_frozen_embeddings,
)


def _peft(tied: bool, device: str = "cpu"):
    base = tiny_llama(layers=2, tie_word_embeddings=tied).to(device)
    reference = copy.deepcopy(base).eval()
    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # make the trained copies differ from the originals
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)
    return model.eval(), reference


def _originals(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "original_module" in n}


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_and_disable_adapter(tied: bool) -> None:
    model, reference = _peft(tied)
    ids = torch.randint(0, 257, (2, 11))
    before = _originals(model)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters() if "original_module" in n}

    moved = offload_frozen_embeddings(model)
    vocab_bytes = 257 * 64 * 4
    assert moved == (1 if tied else 2) * vocab_bytes
    assert offloaded_bytes(model) == moved
    for name, param in model.named_parameters():
        if "original_module" in name:
            assert param.data_ptr() != ptrs[name]  # a separate host copy
            assert torch.equal(param, before[name])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)  # adapters active: originals unused
    assert offloaded_bytes(model) == moved

    with model.disable_adapter(), torch.no_grad():
        base_out = model(input_ids=ids).logits
        assert offloaded_bytes(model) == 0  # brought back on use
    with torch.no_grad():
        torch.testing.assert_close(base_out, reference(input_ids=ids).logits, rtol=0, atol=0)
        model(input_ids=ids)
    assert offloaded_bytes(model) == moved  # off again once the adapters are in use

    assert restore_frozen_embeddings(model) == moved
    assert offloaded_bytes(model) == 0
    for name, value in _originals(model).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("fused_loss", [False, True])
def test_training_step_and_a_later_move_back(fused_loss) -> None:
    """Also with cpt's fused loss, which reads lm_head's weight without calling the lm_head wrapper."""
    from cpt_plugin.patching.registry import patch, unpatch

    model, _ = _peft(tied=False)
    if fused_loss:
        patch(model, rms_norm=False, rope=False, swiglu=False)
    model.train()
    offload_frozen_embeddings(model)
    ids = torch.randint(0, 257, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any("modules_to_save" in n for n in trained)
    assert not any("original_module" in n for n in trained)
    # what model.to(device) after offloading does: new storage for every parameter
    for name, param in model.named_parameters():
        if "original_module" in name:
            param.data = param.data.clone()
    assert offloaded_bytes(model) == 0
    try:
        model(input_ids=ids, labels=ids)
    finally:
        unpatch()
    assert offloaded_bytes(model) == 2 * 257 * 64 * 4


def test_merge_and_unload_and_save(tmp_path) -> None:
    model, _ = _peft(tied=False)
    ids = torch.randint(0, 257, (1, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    offload_frozen_embeddings(model)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_the_model_device_is_where_the_trained_copies_are(tied: bool) -> None:
    """transformers' ``generate()`` moves inputs to ``model.device``, the first parameter's device: on a GPU
    that must not be an original in host memory. Training still sees the trained parameters in the same
    order (optimizer states and checkpoints line up)."""
    model, _ = _peft(tied)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "original_module" in next(iter(model.named_parameters()))[0]  # PEFT registers it first
    offload_frozen_embeddings(model)
    first_name, first = next(iter(model.named_parameters()))
    assert "original_module" not in first_name and first.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trained
    assert offloaded_bytes(model) > 0


def test_no_wrappers_is_a_no_op() -> None:
    model = get_peft_model(tiny_llama(layers=1), LoraConfig(r=2, target_modules=["q_proj"]))
    assert offload_frozen_embeddings(model) == 0
    assert restore_frozen_embeddings(model) == 0


@pytest.mark.gpu
def test_gpu_memory_freed_and_restored() -> None:
    model, reference = _peft(tied=False, device="cuda")
    reference = reference.cuda()
    ids = torch.randint(0, 257, (2, 11), device="cuda")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    moved = offload_frozen_embeddings(model)
    assert torch.cuda.memory_allocated() <= allocated - moved
    originals = [p for n, p in model.named_parameters() if "original_module" in n]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in originals)
    with model.disable_adapter(), torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, reference(input_ids=ids).logits, rtol=0, atol=0)
    restore_frozen_embeddings(model)
    assert all(p.is_cuda for p in originals)


def test_offload_embeddings_default_is_on_for_checkpointed_single_gpu_runs(monkeypatch) -> None:
    """``offload_embeddings: null``: on when checkpointing in one process on a GPU (the originals are a
    large part of a small peak), off without checkpointing, across processes, on CPU, and as configured
    when set."""
    from cpt_plugin.config import CPTConfig
    from cpt_plugin.core import offload_embeddings_wanted

    default = CPTConfig()
    assert default.offload_embeddings is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for mode in ("recompute", "offload", "auto"):
        assert offload_embeddings_wanted(default, mode)
    assert not offload_embeddings_wanted(default, "off")
    assert not offload_embeddings_wanted(CPTConfig(offload_embeddings=False), "offload")
    assert offload_embeddings_wanted(CPTConfig(offload_embeddings=True), "off")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not offload_embeddings_wanted(default, "offload")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not offload_embeddings_wanted(default, "offload")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not offload_embeddings_wanted(default, "offload")
