"""The held-out evaluator: new/old-domain loss every N steps through Trainer.log, base at step 0, PNG."""

import copy
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from cpt_plugin import CPTCallback, CPTConfig
from cpt_plugin.config import CPTConfigError
from cpt_plugin.evaluation import HeldoutEvaluator, heldout_loss, take_blocks
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from tests.tiny import RandomBlocks, tiny_llama


@pytest.fixture(autouse=True)
def _restore_trainer():
    yield
    uninstall_trainer_hooks()


class Repeated(RandomBlocks):
    """One fixed block over and over: the 'new domain' the model can learn in a few steps."""

    def __getitem__(self, index):
        return super().__getitem__(0)


def _train(tmp_path, **cpt):
    new, old = Repeated(n=16), RandomBlocks(n=8, seed=1)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    callback = CPTCallback(lora_r=4, eval_every_steps=2, eval_tokens=64, eval_new=new, eval_old=old, **cpt)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=new, callbacks=[callback])
    trainer.train()
    return trainer, callback.evaluator, reference, (new, old)


def test_evaluator_logs_both_domains_and_the_base(tmp_path):
    trainer, evaluator, reference, (new, old) = _train(tmp_path)
    logged = [h for h in trainer.state.log_history if "eval_new_loss" in h]
    assert [h["step"] for h in logged] == [0, 2, 4, 6]
    # an evaluation on a logging step leaves that step's training-loss log in place
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    for entry in logged:
        assert {"eval_old_loss", "eval_new_perplexity", "eval_old_perplexity", "eval_tokens_seen"} <= set(
            entry
        )
        assert entry["eval_new_perplexity"] == pytest.approx(math.exp(entry["eval_new_loss"]), rel=1e-3)
    assert [h["eval_tokens_seen"] for h in logged] == [0, 128, 256, 384]  # 4 blocks of 16 tokens per step
    # the budget: 64 tokens per domain = the first 4 blocks of 16
    assert [len(evaluator.blocks[d]) for d in ("new", "old")] == [4, 4]
    blocks = take_blocks(old, 64)
    assert evaluator.base["old"] == pytest.approx(heldout_loss(reference, blocks), abs=1e-5)
    # the base is the model with the adapter disabled, still the same after training
    assert evaluator.evaluate(trainer.model, base=True)["old"] == pytest.approx(
        evaluator.base["old"], abs=1e-5
    )
    assert logged[-1]["eval_new_loss"] < logged[0]["eval_new_loss"] - 0.2  # it learned the new domain
    assert evaluator.plot_path == tmp_path / "heldout_loss.png" and evaluator.plot_path.stat().st_size > 5000


def test_evaluator_every_zero_measures_start_and_end_only(tmp_path):
    evaluator2 = HeldoutEvaluator(Repeated(n=4), None, every_steps=0, max_tokens=16, plot=False)
    args = TrainingArguments(
        output_dir=str(tmp_path / "b"),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=tiny_llama(), args=args, train_dataset=RandomBlocks(n=8), callbacks=[evaluator2]).train()
    assert [h["step"] for h in evaluator2.history] == [0, 3] and set(evaluator2.base) == {"new"}
    assert not (tmp_path / "b" / "heldout_loss.png").exists()


@pytest.mark.parametrize("key, value", [("eval_every_steps", -1), ("eval_tokens", 0), ("eval_tokens", 1.5)])
def test_eval_keys_are_checked_by_name(key, value):
    with pytest.raises(CPTConfigError, match=f"'{key}'"):
        CPTConfig(**{key: value})


def test_no_eval_data_no_evaluator():
    assert CPTCallback(lora_r=4).evaluator is None


def test_the_evaluators_cost_is_predicted_and_a_costly_one_is_named(caplog):
    """Cost model: held-out tokens / (3 x every_steps x tokens per step); above 5% a warning at the start
    names the keys to change. The default (2 x 32768 tokens every 100 steps) stays under 5% from 8,192
    tokens per step (4 x 2048: 2.7%)."""
    import logging
    from types import SimpleNamespace

    from cpt_plugin.evaluation import HeldoutEvaluator

    block = {"input_ids": list(range(2048)), "labels": list(range(2048)), "position_ids": list(range(2048))}
    evaluator = HeldoutEvaluator(every_steps=100)
    evaluator.blocks = {"new": [block] * 16, "old": [block] * 16}  # 2 x 32768 tokens
    assert evaluator.predicted_overhead(2 * 2048) == pytest.approx(65536 / (3 * 100 * 4096))
    assert evaluator.predicted_overhead(4 * 2048) < 0.05 < evaluator.predicted_overhead(2 * 2048)
    assert HeldoutEvaluator(every_steps=0).predicted_overhead(4096) is None
    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.evaluation"):
        evaluator._warn_if_costly(args)  # 1 x 2048 tokens per step: ~10.7%
    assert "will add about 11% to the training time" in caplog.text and "eval_every_steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.evaluation"):
        evaluator._warn_if_costly(
            SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1)
        )
    assert caplog.text == ""


class _FakeParam:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)


class _FakeModel:
    def __init__(self, *devices: str) -> None:
        self.devices = devices

    def parameters(self):
        return (_FakeParam(d) for d in self.devices)


def test_inputs_go_to_the_accelerator_even_when_the_first_parameters_are_in_host_memory():
    """offload_embeddings keeps the frozen embedding originals (the first parameters) on the CPU: the
    evaluator and the generation samples sent their ids there, and the GPU layers then failed."""
    from cpt_plugin.model_parts import input_device

    assert input_device(_FakeModel("cpu", "cuda:0", "cuda:0")) == torch.device("cuda:0")
    assert input_device(_FakeModel("meta", "cpu")) == torch.device("cpu")
    assert input_device(_FakeModel()) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_heldout_loss_on_the_gpu_with_offloaded_embeddings():
    from cpt_plugin import setup_model
    from cpt_plugin.offload.embeddings import offload_frozen_embeddings

    torch.manual_seed(0)
    model = setup_model(tiny_llama().cuda(), {"lora_r": 4}, checkpointing="offload")
    offload_frozen_embeddings(model)
    # the originals are in host memory, yet model.device (the first parameter's) is the GPU: generate()
    # and scripts that send inputs to model.device find the layers (offload/embeddings.py)
    assert any(p.device.type == "cpu" for n, p in model.named_parameters() if "original_module" in n)
    assert next(model.parameters()).device.type == "cuda" and model.device.type == "cuda"
    blocks = take_blocks(RandomBlocks(n=4, seed=2), 64)
    loss = heldout_loss(model, blocks)
    with model.disable_adapter():
        base = heldout_loss(model, blocks)
    assert math.isfinite(loss) and math.isfinite(base)
