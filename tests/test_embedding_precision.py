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


def _train(model, steps: int = 5, embedding_lr: float = 2e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(lm_head copy before, after) ``steps`` AdamW steps at the recipe's embedding LR, as fp32."""
    dtype = model.cpt_config.trained_embeddings_dtype
    config = CPTConfig(lora_r=4, embedding_learning_rate=embedding_lr, trained_embeddings_dtype=dtype)
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
    return before, head.weight.detach().float()


def _fraction_changed_after_training(model, steps: int = 5, embedding_lr: float = 2e-5) -> float:
    before, after = _train(model, steps, embedding_lr)
    return (after != before).float().mean().item()


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


def test_bf16_with_stochastic_rounding_follows_the_fp32_update() -> None:
    """bfloat16_sr keeps bf16 copies; each step moves an entry by whole bf16 ulps at random, so after 5
    steps fewer entries have moved than in fp32, but the mean update is fp32's: its projection on the fp32
    update is ~1. Round-to-nearest bf16 ("model") keeps under a third of it."""
    before, fp32 = _train(_bf16_model(tied=True))
    model = _bf16_model(tied=True, dtype="bfloat16_sr")
    assert all(copy.weight.dtype == torch.bfloat16 for copy in _copies(model))
    _, rounded = _train(model)
    _, nearest = _train(_bf16_model(tied=True, dtype="model"))
    reference = fp32 - before

    def projection(after: torch.Tensor) -> float:
        return ((after - before) * reference).sum().item() / reference.square().sum().item()

    assert projection(rounded) == pytest.approx(1.0, abs=0.05)
    assert projection(nearest) < 0.4
    moved = (rounded != before).float().mean().item()
    assert moved > 1.5 * (nearest != before).float().mean().item()


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


def test_bfloat16_sr_resume_is_bit_identical(tmp_path) -> None:
    """HF Trainer, bf16 model, bf16 copies rounded stochastically: stopping at step 3 and resuming gives
    the same weights, bit for bit, as the uninterrupted run (rounding seeds come from the checkpoint)."""
    from transformers import Trainer, TrainingArguments

    from cpt_plugin import CPTCallback
    from cpt_plugin.integrations.hf import uninstall_trainer_hooks
    from tests.tiny import RandomBlocks

    def run(resume: str | None = None):
        args = TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
            max_steps=6, save_steps=3, save_strategy="steps", logging_steps=1, report_to=[], seed=7,
            data_seed=7, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Trainer(
            model=tiny_llama(tied=True, seed=1).to(torch.bfloat16),
            args=args,
            train_dataset=RandomBlocks(seed=3),
            callbacks=[CPTCallback(lora_r=4, trained_embeddings_dtype="bfloat16_sr")],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    try:
        full = run()
        resumed = run(resume=str(tmp_path / "out" / "checkpoint-3"))
    finally:
        uninstall_trainer_hooks()
    assert type(full.optimizer.optimizer).__name__ == "CPTAdamW"
    final = [p.detach() for p in full.model.parameters() if p.requires_grad]
    again = [p.detach() for p in resumed.model.parameters() if p.requires_grad]
    assert any(p.dtype == torch.bfloat16 for p in final)
    for a, b in zip(final, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_embedding_optimizer_state_bytes_on_cuda() -> None:
    """Llama-1B embedding shapes (128256 x 2048, tied): the embedding group's optimizer-state bytes and the
    optimizer step's time for each dtype / embedding optimizer. Analytic state bytes per parameter:
    8 (fp32 AdamW), 4 (bf16 moments), 2 + 8/256 (8-bit blockwise)."""
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    pytest.importorskip("bitsandbytes")
    shape = LlamaConfig(
        hidden_size=2048, intermediate_size=256, num_hidden_layers=1, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=128256, tie_word_embeddings=True,
    )  # fmt: skip
    expected = {  # bytes of optimizer state per embedding parameter
        ("float32", "adamw"): 8,
        ("bfloat16_sr", "adamw"): 4,
        ("float32", "adamw_8bit"): 2 + 8 / 256,
        ("bfloat16_sr", "adamw_8bit"): 2 + 8 / 256,
    }
    measured = {}
    for (dtype, embedding_optimizer), per_param in expected.items():
        torch.manual_seed(0)
        base = LlamaForCausalLM(shape).to(device="cuda", dtype=torch.bfloat16)
        config = CPTConfig(
            lora_r=16, trained_embeddings_dtype=dtype, embedding_optimizer=embedding_optimizer, kernels=False
        )
        model = prepare_model(base, config)
        optimizer = create_optimizer(model, config, learning_rate=2e-4)
        ids = torch.randint(0, shape.vocab_size, (1, 256), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # states exist after the first step
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            optimizer.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) / 3 * 1e3
        group = next(g for g in optimizer.param_groups if g["cpt_group"] == "embeddings")
        (weight,) = group["params"]
        state_bytes = sum(
            t.numel() * t.element_size()
            for t in optimizer.state[weight].values()
            if isinstance(t, torch.Tensor)
        )
        measured[dtype, embedding_optimizer] = (state_bytes / 2**30, step_ms)
        print(
            f"{dtype:12s} {embedding_optimizer:11s} embedding state {state_bytes / 2**30:.3f} GiB "
            f"({state_bytes / weight.numel():.2f} B/param), weight {weight.dtype}, optimizer step {step_ms:.1f} ms"
        )
        assert state_bytes / weight.numel() == pytest.approx(per_param, rel=0.01)
        del model, base, optimizer, weight, group
        torch.cuda.empty_cache()
    saved = measured["float32", "adamw"][0] - measured["float32", "adamw_8bit"][0]
    assert saved == pytest.approx(262_668_288 * (8 - 2 - 8 / 256) / 2**30, rel=0.01)  # 1.46 GiB
