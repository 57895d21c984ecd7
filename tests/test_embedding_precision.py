"""Trained embedding copies in fp32 on bf16 models: updates at the small embedding LR are not lost."""

from __future__ import annotations

import pytest
import torch

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.optim import create_optimizer
from cpt_plugin.recipe import prepare_model
from tests.tiny import tiny_llama


def _bf16_model(tied: bool, dtype: str = "float32"):
    base = tiny_llama(tied=tied).to(torch.bfloat16)
    return prepare_model(base, CPTConfig(lora_r=4, trained_embeddings_dtype=dtype))


def _copies(model):
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    return embed.modules_to_save["default"], head.modules_to_save["default"]


def _fraction_changed_after_training(model, steps: int = 5, embedding_lr: float = 2e-5) -> float:
    config = CPTConfig(lora_r=4, embedding_learning_rate=embedding_lr)
    optimizer = create_optimizer(model, config, learning_rate=2e-4)
    _, head = _copies(model)
    before = head.weight.detach().float().clone()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 257, (2, 24), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (head.weight.detach().float() != before).float().mean().item()


@pytest.mark.parametrize("tied", [True, False])
def test_copies_fp32_rest_of_model_bf16(tied: bool) -> None:
    model = _bf16_model(tied)
    embed, head = _copies(model)
    assert embed.weight.dtype == head.weight.dtype == torch.float32
    assert (embed.weight is head.weight) == tied
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    ids = torch.randint(0, 257, (2, 9))
    loss = model(input_ids=ids, labels=ids).loss  # no autocast: lm_head casts its input up
    loss.backward()
    assert seen == [torch.bfloat16]  # the residual stream stays 16-bit
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    with model.disable_adapter():  # the frozen bf16 originals still run
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_updates_at_the_embedding_lr_survive() -> None:
    fp32 = _fraction_changed_after_training(_bf16_model(tied=True))
    kept_bf16 = _fraction_changed_after_training(_bf16_model(tied=True, dtype="model"))
    assert fp32 > 0.99
    assert kept_bf16 < 0.6  # what plain PEFT does on a bf16 model: most updates round away


def test_fp32_model_untouched_and_bad_value_named() -> None:
    model = prepare_model(tiny_llama(tied=False), CPTConfig(lora_r=4))
    embed, _ = _copies(model)
    assert embed.weight.dtype == torch.float32 and not embed._forward_hooks
    with pytest.raises(CPTConfigError, match="trained_embeddings_dtype"):
        CPTConfig(trained_embeddings_dtype="fp8")


def test_adapter_checkpoint_round_trip_is_exact(tmp_path) -> None:
    model = _bf16_model(tied=False)
    _fraction_changed_after_training(model, steps=2)
    model.save_pretrained(tmp_path)
    resumed = _bf16_model(tied=False)  # as a resumed run rebuilds it, then the Trainer loads the adapter
    resumed.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)
    for a, b in zip(_copies(model), _copies(resumed), strict=True):
        assert b.weight.dtype == torch.float32
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)
