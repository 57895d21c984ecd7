import pytest

from cpt_plugin.config import CPTConfig, CPTConfigError


def test_defaults():
    config = CPTConfig()
    assert config.lora_r == 128 and config.lora_alpha == 32 and config.use_rslora
    assert config.train_embeddings and config.embedding_lr_ratio == 0.1
    assert config.resolved_embedding_lr(2e-4) == pytest.approx(2e-5)
    assert CPTConfig(embedding_learning_rate=1e-6).resolved_embedding_lr(2e-4) == 1e-6


def test_unknown_key_names_closest():
    with pytest.raises(CPTConfigError, match="Unknown cpt-plugin config key 'lora_rank'.*'lora_r'"):
        CPTConfig.from_dict({"lora_rank": 8})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_r", 0, "lora_r"),
        ("lora_r", -4, "lora_r"),
        ("learning_rate", -1e-4, "learning_rate"),
        ("embedding_learning_rate", -1.0, "embedding_learning_rate"),
        ("replay_ratio", 1.0, r"replay_ratio.*\[0, 1\)"),
        ("replay_ratio", -0.1, "replay_ratio"),
        ("max_seq_length", 0, "max_seq_length"),
        ("optimizer", "adamw_8bitt", "Did you mean 'adamw_8bit'"),
        ("schedule", "cosin", "Did you mean 'cosine'"),
        ("kernels", ["rmsnorm"], "Did you mean 'rms_norm'"),
        ("gradient_checkpointing", "yes", "gradient_checkpointing"),
        ("rope_scaling", {"factor": 2.0}, "rope_scaling"),
        ("tiled_mlp", "yes", r"tiled_mlp': expected true or false, got 'yes'"),
        ("packing", 1, "packing"),
        ("offload_embeddings", "auto", r"offload_embeddings': expected true, false or null"),
    ],
)
def test_bad_values_raise_with_key_and_fix(key, value, message):
    with pytest.raises(CPTConfigError, match=message):
        CPTConfig(**{key: value})


def test_yaml_and_dict_and_kwargs(tmp_path):
    path = tmp_path / "cpt.yaml"
    path.write_text("lora_r: 16\nschedule: wsd\nreplay_ratio: 0.25\n")
    config = CPTConfig.coerce(path, lora_alpha=8)
    assert (config.lora_r, config.schedule, config.replay_ratio, config.lora_alpha) == (16, "wsd", 0.25, 8)
    assert CPTConfig.coerce({"lora_r": 4}).lora_r == 4
    with pytest.raises(CPTConfigError, match="Unknown"):
        CPTConfig.coerce(path, lora_alfa=3)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    """The one YAML reader: a bad key, bad YAML, a non-mapping and a missing file each name file and fix."""
    from cpt_plugin.config import load_yaml_mapping

    typo = tmp_path / "typo.yaml"
    typo.write_text("lora_r: 4\nlora_alhpa: 8\n")
    with pytest.raises(CPTConfigError, match=r"typo\.yaml, line 2: Unknown .*'lora_alhpa'\. Did you mean"):
        CPTConfig.from_yaml(typo)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora_r: 4\nschedule: [cosine\n")
    with pytest.raises(CPTConfigError, match=r"broken\.yaml, line \d: not valid YAML .*Fix the file"):
        load_yaml_mapping(broken, expected="keys")
    with pytest.raises(CPTConfigError, match="expected a mapping of keys, got a list"):
        load_yaml_mapping(None, expected="keys", where="text", text="- a\n- b\n")
    with pytest.raises(CPTConfigError, match="missing.yaml: no such file .*Check the path"):
        load_yaml_mapping(tmp_path / "missing.yaml", expected="keys")
    assert load_yaml_mapping(None, expected="keys", where="empty", text="").data == {}
