"""Any causal-LM architecture trains: unpatched with one warning when it has no kernels, GPT-2's Conv1D
projections as LoRA targets, and tied embeddings kept tied whatever the family and the targets."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Trainer,
    TrainingArguments,
)

import cpt_plugin.patching.registry as registry_module
from cpt_plugin.config import CPTConfig
from cpt_plugin.core import setup_model
from cpt_plugin.integrations.hf import CPTCallback
from cpt_plugin.recipe import (
    _tie_trained_copies,
    build_lora_config,
    embeddings_tied,
    prepare_model,
    resolve_target_modules,
)
from tests.tiny import RandomBlocks, tiny_llama

VOCAB = 257


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config)


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _trained_weight(module: torch.nn.Module) -> torch.Tensor:
    return module.modules_to_save["default"].weight


def test_gpt2_default_targets_are_its_conv1d_projections():
    model = tiny_gpt2()
    targets, moved = resolve_target_modules(model, None)
    assert targets == ["c_attn", "c_fc", "c_proj"] and moved == []
    assert build_lora_config(model, CPTConfig(lora_r=4)).fan_in_fan_out  # Conv1D stores (in, out)
    assert not build_lora_config(tiny_llama(), CPTConfig(lora_r=4)).fan_in_fan_out


@pytest.mark.parametrize(
    "build, targets",
    [
        (tiny_gpt2, None),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte", "lm_head"]),
        (tiny_llama, None),
        (tiny_llama, ["q_proj", "v_proj"]),
    ],
    ids=["gpt2-default", "gpt2-explicit", "gpt2-explicit-with-embeddings", "llama-default", "llama-explicit"],
)
def test_tied_embeddings_stay_tied_after_training(build, targets):
    base = build()
    assert embeddings_tied(base)
    before = base.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no PEFT warning about untied or fan_in_fan_out
        warnings.filterwarnings("ignore", message=".*no kernels for this architecture.*")
        model = prepare_model(base, CPTConfig(lora_r=4, target_modules=targets))
    _train(model)
    embed = _trained_weight(model.get_input_embeddings())
    head = _trained_weight(model.get_output_embeddings())
    assert embed is head
    assert not torch.equal(embed.detach(), before)  # it did train
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    merged = model.merge_and_unload()
    assert embeddings_tied(merged)
    torch.testing.assert_close(merged.get_input_embeddings().weight, embed)


def test_trained_copies_tied_when_peft_does_not_know_the_names():
    """PEFT ties only names it knows (embed_tokens/lm_head); any other pair is tied by cpt-plugin."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["wte", "lm_head"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gpt2(), lora)  # as PEFT leaves a pair it does not recognise
    assert _trained_weight(model.get_input_embeddings()) is not _trained_weight(model.get_output_embeddings())
    _tie_trained_copies(model)
    _train(model)
    assert _trained_weight(model.get_input_embeddings()) is _trained_weight(model.get_output_embeddings())


def test_unknown_architecture_warns_once_whatever_the_device(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)  # fresh "warned" memory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_model(tiny_gpt2(), CPTConfig(lora_r=2))  # kernels=None: none on CPU, all on a GPU
        setup_model(tiny_gpt2(seed=1), CPTConfig(lora_r=2, kernels=False))
    messages = [str(w.message) for w in caught if "no kernels for this architecture" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'gpt2'" in messages[0] and "llama" in messages[0]


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_neox], ids=["gpt2", "gpt_neox"])
def test_unknown_architecture_trains_with_the_trainer(tmp_path, build):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        save_strategy="no",
        learning_rate=1e-2,
    )
    trainer = Trainer(
        model=build(), args=args, train_dataset=RandomBlocks(n=6), callbacks=[CPTCallback(lora_r=4)]
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    if embeddings_tied(trainer.model.get_base_model()):
        embed, head = trainer.model.get_input_embeddings(), trainer.model.get_output_embeddings()
        assert _trained_weight(embed) is _trained_weight(head)
