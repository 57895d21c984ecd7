"""RoPE scaling set on the config before the model is built; eager attention warned about."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from cpt_plugin.long_context import apply_rope_scaling, check_attention_implementation


def _config(**overrides) -> LlamaConfig:
    values = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=128,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def test_no_change_within_trained_context() -> None:
    config = _config()
    before = dict(config.rope_parameters)
    assert apply_rope_scaling(config, 128) is None
    assert config.rope_parameters == before and config.max_position_embeddings == 128


def test_default_is_yarn_with_the_extension_ratio() -> None:
    config = _config(rope_theta=50_000.0)
    with pytest.warns(UserWarning, match="yarn with factor 4"):
        message = apply_rope_scaling(config, 512)
    assert "yarn" in message
    params = config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 4.0
    assert params["rope_theta"] == 50_000.0  # kept
    assert params["original_max_position_embeddings"] == 128
    assert config.max_position_embeddings == 512
    model = LlamaForCausalLM(config)  # the model builds and runs with it
    assert model.model.rotary_emb.rope_type == "yarn"
    model(input_ids=torch.randint(0, 257, (1, 300)))


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn"])
def test_given_rope_scaling(rope_type: str) -> None:
    config = _config()
    with pytest.warns(UserWarning, match=rope_type):
        apply_rope_scaling(config, 300, {"rope_type": rope_type, "factor": 3.0})
    assert config.rope_parameters["rope_type"] == rope_type
    assert config.rope_parameters["factor"] == 3.0
    assert config.rope_parameters["rope_theta"] == 10_000.0
    assert config.max_position_embeddings == (128 if rope_type == "dynamic" else 300)
    LlamaForCausalLM(config)(input_ids=torch.randint(0, 257, (1, 20)))


def test_factor_defaults_to_ratio_and_bad_type_fails() -> None:
    config = _config()
    with pytest.warns(UserWarning):
        apply_rope_scaling(config, 256, {"rope_type": "linear"})
    assert config.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match="rope_type"):
        apply_rope_scaling(_config(), 256, {"rope_type": "ntk-magic", "factor": 2})


def test_existing_llama3_scaling_keeps_its_type() -> None:
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500_000.0,
    }
    config = _config(rope_parameters=rope)
    with pytest.warns(UserWarning, match="llama3 with factor 16"):
        apply_rope_scaling(config, 256)
    assert (
        config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500_000.0
    )
    LlamaForCausalLM(config)(input_ids=torch.randint(0, 257, (1, 20)))


def test_nested_rope_parameters_scale_full_attention_only() -> None:
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=257,
        max_position_embeddings=128,
    )
    sliding_before = dict(config.rope_parameters["sliding_attention"])
    with pytest.warns(UserWarning):
        apply_rope_scaling(config, 512)
    assert config.rope_parameters["sliding_attention"] == sliding_before
    full = config.rope_parameters["full_attention"]
    assert full["factor"] > 1 and "rope_theta" in full


def test_eager_attention_warns() -> None:
    config = _config()
    config._attn_implementation = "eager"
    with pytest.warns(UserWarning, match="eager"):
        assert check_attention_implementation(config, 4096)
    config._attn_implementation = "sdpa"
    assert check_attention_implementation(config) is None


# --- rope_scaling on a model that is already loaded (CPTCallback(rope_scaling=...)) -------------------
def _same_weights(build, config):
    torch.manual_seed(0)
    return build(config)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_rope_scaling_on_a_loaded_model_equals_scaling_before_loading(family: str) -> None:
    from transformers import Gemma3ForCausalLM

    from cpt_plugin.long_context import apply_rope_scaling_to_model

    def config():
        if family == "llama":
            return _config()
        return Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=257,
            max_position_embeddings=128,
        )

    build = LlamaForCausalLM if family == "llama" else Gemma3ForCausalLM
    rope = {"rope_type": "yarn", "factor": 4.0}
    pre_config = config()
    with pytest.warns(UserWarning):
        apply_rope_scaling(pre_config, 512, rope)
    pre_loaded = _same_weights(build, pre_config)
    loaded = _same_weights(build, config())
    with pytest.warns(UserWarning, match="yarn with factor 4"):
        assert apply_rope_scaling_to_model(loaded, 512, rope)
    assert loaded.config.to_dict() == pre_config.to_dict()
    ids = torch.randint(0, 257, (1, 300))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pre_loaded(input_ids=ids).logits)
    assert apply_rope_scaling_to_model(loaded, 512, rope) is None  # already in effect: nothing twice


def test_callback_rope_scaling_takes_effect_on_a_loaded_model(caplog) -> None:
    from cpt_plugin.config import CPTConfig
    from cpt_plugin.core import setup_model
    from tests.tiny import tiny_llama

    with caplog.at_level("WARNING"), pytest.warns(UserWarning, match="yarn with factor 2"):
        model = setup_model(
            tiny_llama(), CPTConfig(lora_r=2, max_seq_length=512, rope_scaling={"rope_type": "yarn"})
        )
    rotary = model.get_base_model().model.rotary_emb
    assert rotary.rope_type == "yarn" and rotary.attention_scaling > 1.0  # rebuilt from the scaled config
    assert model.config.max_position_embeddings == 512
    assert "beyond the model's trained context" not in caplog.text
    model(input_ids=torch.randint(0, 257, (1, 300)))


def test_scaling_set_before_loading_is_not_applied_twice() -> None:
    """The CLI scales the config before loading and passes the same rope_scaling to CPTCallback."""
    from cpt_plugin.config import CPTConfig
    from cpt_plugin.core import setup_model

    config = _config()
    with pytest.warns(UserWarning):
        apply_rope_scaling(config, 512, {"rope_type": "yarn"})
    before = dict(config.rope_parameters)
    model = setup_model(
        LlamaForCausalLM(config), CPTConfig(lora_r=2, max_seq_length=512, rope_scaling={"rope_type": "yarn"})
    )
    assert model.config.rope_parameters == before and before["factor"] == 4.0


def test_rope_scaling_on_a_model_without_rope_points_to_the_pre_load_call() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from cpt_plugin.config import CPTConfig, CPTConfigError
    from cpt_plugin.core import setup_model

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=257, n_positions=64))
    with pytest.raises(CPTConfigError, match="no rotary position embedding") as raised:
        setup_model(model, CPTConfig(lora_r=2, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert "cpt_plugin.long_context.apply_rope_scaling(config, max_seq_length, rope_scaling)" in str(
        raised.value
    )


def test_context_warning_points_to_the_setting_that_works(caplog) -> None:
    from cpt_plugin.config import CPTConfig
    from cpt_plugin.core import warn_if_context_too_long
    from tests.tiny import tiny_llama

    with caplog.at_level("WARNING"):
        warn_if_context_too_long(tiny_llama(), CPTConfig(max_seq_length=1024))
    assert "CPTCallback(rope_scaling={'rope_type': 'yarn', 'factor': 4.0})" in caplog.text
    assert "when the model is loaded" not in caplog.text


@pytest.mark.gpu
def test_rope_rebuilt_on_the_models_device() -> None:
    from cpt_plugin.long_context import apply_rope_scaling_to_model

    model = LlamaForCausalLM(_config()).to("cuda", torch.bfloat16)
    with pytest.warns(UserWarning):
        apply_rope_scaling_to_model(model, 512, {"rope_type": "yarn"})
    assert model.model.rotary_emb.inv_freq.device.type == "cuda"
    model(input_ids=torch.randint(0, 257, (1, 300), device="cuda"))


def test_context_warning_for_learned_positions_does_not_point_to_rope(caplog) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from cpt_plugin.config import CPTConfig
    from cpt_plugin.core import warn_if_context_too_long

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=257, n_positions=64))
    with caplog.at_level("WARNING"):
        warn_if_context_too_long(model, CPTConfig(max_seq_length=128))
    assert "64 learned positions" in caplog.text and "Set max_seq_length <= 64" in caplog.text
    assert "rope_scaling" not in caplog.text
