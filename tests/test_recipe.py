import logging

import pytest
import torch

from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.recipe import embeddings_tied, prepare_model, resolve_target_modules
from tests.tiny import tiny_llama

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_targets_every_projection_including_gate():
    targets, moved = resolve_target_modules(tiny_llama(), None)
    assert targets == PROJECTIONS and moved == []


def test_rslora_scale_read_from_modules():
    model = prepare_model(tiny_llama(), CPTConfig(lora_r=16, lora_alpha=32))
    layer = model.base_model.model.model.layers[0]
    for name in ("q_proj", "gate_proj", "down_proj"):
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert module.scaling["default"] == pytest.approx(32 / 16**0.5)  # alpha / sqrt(r), not alpha / r


def test_untied_embeddings_fully_trained_through_accessors():
    model = prepare_model(tiny_llama(tied=False), CPTConfig(lora_r=4))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embed).__name__ == type(head).__name__ == "ModulesToSaveWrapper"
    assert embed.modules_to_save["default"].weight.requires_grad
    assert head.modules_to_save["default"].weight.requires_grad
    assert not embed.original_module.weight.requires_grad


def test_tied_embeddings_stay_tied_and_merge_matches_adapter():
    base = tiny_llama(tied=True)
    assert embeddings_tied(base)
    model = prepare_model(base, CPTConfig(lora_r=4))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.modules_to_save["default"].weight is head.modules_to_save["default"].weight
    # train a little so that the adapter differs from the base
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 257, (2, 12))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # LoRA B starts at zero: make it non-zero so merging has something to merge
    model.eval()
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    assert embeddings_tied(merged)
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)


def test_embedding_targets_become_full_training(caplog):
    model = tiny_llama(tied=False)
    targets, moved = resolve_target_modules(model, ["q_proj", "v_proj", "embed_tokens", "lm_head"])
    assert targets == ["q_proj", "v_proj"] and moved == ["embed_tokens", "lm_head"]
    with caplog.at_level("WARNING"):
        peft_model = prepare_model(
            model,
            CPTConfig(lora_r=4, target_modules=["q_proj", "embed_tokens", "lm_head"], train_embeddings=False),
        )
    assert "trained fully" in caplog.text
    head = peft_model.get_output_embeddings()
    assert type(head).__name__ == "ModulesToSaveWrapper"  # not a LoRA layer
    assert not any("lora" in n for n, _ in head.named_parameters())


def test_no_embeddings_when_disabled():
    model = prepare_model(tiny_llama(tied=False), CPTConfig(lora_r=4, train_embeddings=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_peft_model_gets_clear_message():
    model = prepare_model(tiny_llama(), CPTConfig(lora_r=4))
    with pytest.raises(CPTConfigError, match="already a PEFT model"):
        prepare_model(model, CPTConfig(lora_r=4))


def test_logs_one_summary_line(caplog):
    with caplog.at_level(logging.INFO, logger="cpt_plugin"):
        prepare_model(tiny_llama(tied=True), CPTConfig(lora_r=4))
    line = [o for o in caplog.messages if o.startswith("cpt-plugin: trainable")]
    assert len(line) == 1 and "LoRA" in line[0] and "embeddings" in line[0] and "tied" in line[0]
