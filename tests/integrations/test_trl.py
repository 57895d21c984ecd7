"""TRL's SFTTrainer on raw text, with and without packing, plus the one flag: same behaviour as Trainer."""

import math
import string

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cpt_plugin import CPTCallback  # noqa: E402
from cpt_plugin.integrations.hf import uninstall_trainer_hooks  # noqa: E402
from cpt_plugin.schedules import plan_of  # noqa: E402
from tests.tiny import tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "</s>", "<unk>", *string.printable])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.parametrize("packing, kernels", [(False, False), (True, False), (True, True)])
def test_sft_trainer_gets_groups_schedule_and_peft(tmp_path, packing, kernels):
    tokenizer = _char_tokenizer()
    texts = [f"document {i} about topic {i % 7}. " * (3 + i % 5) for i in range(40)]
    trainer = trl.SFTTrainer(
        model=tiny_llama(vocab_size=len(tokenizer)),
        args=trl.SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1 if kernels else 3,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            packing=packing,
            max_length=32,
            logging_steps=1,
        ),
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[CPTCallback(lora_r=4, schedule="wsd", kernels=kernels)],
    )
    assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    trainer.train()
    groups = {g["cpt_group"]: g for g in trainer.optimizer.param_groups}
    assert groups["embeddings"]["initial_lr"] == pytest.approx(groups["lora"]["initial_lr"] / 10)
    assert plan_of(trainer.lr_scheduler).name == "wsd"
    assert all("embedding_learning_rate" in h for h in trainer.state.log_history if "loss" in h)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(loss) for loss in losses)  # TRL's own fused LM head included
    if kernels:
        assert any(getattr(type(m), "__cpt_patched__", False) for m in trainer.model.modules())
