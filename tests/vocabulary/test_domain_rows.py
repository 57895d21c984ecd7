"""Domain-shifted rows: tokens far more frequent in the training data than in the replay data learn at the
fresh-row LR (``domain_shift_ratio``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import Trainer

from cpt_plugin import CPTCallback, CPTConfig, CPTConfigError
from cpt_plugin.data import CPTDataset
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.vocabulary.domain_rows import domain_shifted_ids
from cpt_plugin.vocabulary.fresh_rows import fresh_rows
from tests.export.helpers import byte_bpe_tokenizer
from tests.tiny import tiny_llama, training_args

NEW = ["def read(path):\n    return open(path).read()\n" * 4] * 12  # the new domain: code
OLD = ["The quick brown fox jumps over the lazy dog. " * 6] * 12  # the old one: prose


@pytest.fixture(autouse=True)
def _hooks():
    yield
    uninstall_trainer_hooks()


def test_shifted_ids_by_frequency_share():
    new = Counter({1: 50, 2: 50, 3: 4, 4: 100})  # 3 is too rare to judge
    old = Counter({1: 500, 2: 10, 4: 0, 5: 490})
    # shares new: 1 .24, 2 .24, 4 .49; old (+0.5 smoothing): 1 .50, 2 .021, 4 .0005
    assert domain_shifted_ids(new, old, ratio=4.0).tolist() == [2, 4]
    assert domain_shifted_ids(new, old, ratio=100.0).tolist() == [4]


def _trainer(tmp_path, dataset, **cpt):
    tokenizer = dataset.tokenizer
    model = tiny_llama(tied=False, vocab_size=len(tokenizer))
    callback = CPTCallback(lora_r=4, domain_shift_ratio=4.0, memory_report=False, **cpt)
    return Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=dataset,
                   callbacks=[callback])  # fmt: skip


def test_the_callback_marks_rows_the_new_domain_uses_far_more_and_the_optimizer_scales_them(tmp_path):
    tokenizer = byte_bpe_tokenizer()
    dataset = CPTDataset(NEW, tokenizer, 32, replay_source=OLD, replay_ratio=0.25, seed=0)
    trainer = _trainer(tmp_path, dataset)
    rows = fresh_rows(trainer.model)
    code = set(
        tokenizer("def read(path):\n    return open(path).read()\n", add_special_tokens=False)["input_ids"]
    )
    prose = set(
        tokenizer("The quick brown fox jumps over the lazy dog. ", add_special_tokens=False)["input_ids"]
    )
    assert rows is not None and set(rows.tolist()) <= code - prose and len(rows) >= len(code - prose) // 2
    trainer.create_optimizer()
    group = next(g for g in trainer.optimizer.param_groups if "cpt_row_scale" in g)
    scale = group["cpt_row_scale"]
    # known rows at the embedding LR (0.1x LoRA's), marked rows at the fresh-row LR (2x LoRA's with shifted rows)
    assert torch.all(scale[rows] == 1.0) and scale[min(prose)] == pytest.approx(0.05)


def test_without_replay_data_the_key_is_an_error_naming_the_fix(tmp_path):
    dataset = CPTDataset(NEW, byte_bpe_tokenizer(), 32, seed=0)
    with pytest.raises(CPTConfigError, match="'domain_shift_ratio' is 4.0.*replay_source"):
        _trainer(tmp_path, dataset)


@pytest.mark.parametrize("value", [0.5, 1.0, -2])
def test_a_ratio_that_selects_nothing_sensible_is_refused(value):
    with pytest.raises(CPTConfigError, match="domain_shift_ratio"):
        CPTConfig(domain_shift_ratio=value)


def test_the_cli_job_with_domain_shift_runs_both_cpt_phases(tmp_path):
    """The no-replay comparison run keeps the replay corpus known (never mixed in), so the same rows are
    marked there too, instead of the key failing half-way through the job."""
    from cpt_plugin.cli import main
    from tests.test_cli import SMALL

    assert main(["train", "--output-dir", str(tmp_path), "--set", *SMALL, "cpt.domain_shift_ratio=4"]) == 0


@pytest.mark.parametrize("off", ["train_embeddings", "row_aware_embedding_lr"])
def test_the_key_without_trained_rows_to_scale_is_refused(off):
    with pytest.raises(CPTConfigError, match="domain_shift_ratio.*Set both to true"):
        CPTConfig(domain_shift_ratio=4.0, **{off: False})
