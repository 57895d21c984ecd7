"""The replay defaults (replay_defaults.py): domain-shifted rows, lm_head updates off the old domain's
directions (output_rows.py) and the final step back (step_back.py), on where a run has replay data."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from cpt_plugin import CPTCallback, CPTConfig, CPTConfigError
from cpt_plugin.data import CPTDataset
from cpt_plugin.integrations.hf import uninstall_trainer_hooks
from cpt_plugin.output_rows import OutputRowProjection, principal_directions, replay_sequences
from cpt_plugin.replay_defaults import resolve_replay_defaults
from cpt_plugin.step_back import step_back
from tests.export.helpers import byte_bpe_tokenizer
from tests.tiny import tiny_llama, training_args

NEW = ["def read(path):\n    return open(path).read()\n" * 4] * 12
OLD = [f"The quick brown fox number {i} jumps over the lazy dog. " * 6 for i in range(12)]


@pytest.fixture(autouse=True)
def _hooks():
    yield
    uninstall_trainer_hooks()


class _WithReplay:
    replay_source = ["old text"]

    def token_pieces(self, replay: bool = False):
        return iter(())


def test_the_defaults_switch_on_with_replay_data_only():
    on = resolve_replay_defaults(CPTConfig(), _WithReplay())
    assert (on.domain_shift_ratio, on.output_row_projection, on.final_step_back) == (4.0, 4, 0.975)
    off = resolve_replay_defaults(CPTConfig(), [{"input_ids": [1, 2]}])
    assert (off.domain_shift_ratio, off.output_row_projection, off.final_step_back) == (0.0, 0, 1.0)
    kept = resolve_replay_defaults(CPTConfig(final_step_back=0.9, output_row_projection=0), _WithReplay())
    assert (kept.domain_shift_ratio, kept.output_row_projection, kept.final_step_back) == (4.0, 0, 0.9)
    plain_rows = resolve_replay_defaults(CPTConfig(row_aware_embedding_lr=False), _WithReplay())
    assert plain_rows.domain_shift_ratio == 0.0 and plain_rows.output_row_projection == 4
    frozen = resolve_replay_defaults(CPTConfig(train_embeddings=False), _WithReplay())
    assert (frozen.domain_shift_ratio, frozen.output_row_projection, frozen.final_step_back) == (0.0, 0, 1.0)
    tied = resolve_replay_defaults(CPTConfig(), _WithReplay(), tied=True)  # measured untied only
    assert (tied.domain_shift_ratio, tied.output_row_projection, tied.final_step_back) == (0.0, 0, 1.0)


def test_fresh_rows_learn_at_twice_the_lora_lr_with_domain_shifted_rows():
    assert CPTConfig(domain_shift_ratio=0.0).resolved_fresh_lr(1e-3) == pytest.approx(1e-3)
    assert CPTConfig(domain_shift_ratio=4.0).resolved_fresh_lr(1e-3) == pytest.approx(2e-3)
    assert CPTConfig(domain_shift_ratio=4.0, fresh_row_learning_rate=5e-4).resolved_fresh_lr(1e-3) == 5e-4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("final_step_back", 1.5),
        ("final_step_back", 0.0),
        ("output_row_projection", -1),
        ("output_row_projection", 2.5),
    ],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(CPTConfigError, match=key):
        CPTConfig(**{key: value})


def test_principal_directions_are_orthonormal_and_start_with_the_mean():
    torch.manual_seed(0)
    hidden = torch.randn(300, 24) + 3.0 * torch.randn(24)
    basis = principal_directions(hidden, 4)
    torch.testing.assert_close(basis @ basis.t(), torch.eye(4), atol=1e-5, rtol=0)
    mean = hidden.mean(0)
    assert abs(float(basis[0] @ mean / mean.norm())) == pytest.approx(1.0, abs=1e-5)


def test_replay_sequences_skip_short_documents_and_cut_long_ones():
    pieces = [([1] * 5, True), ([2] * 300, True), ([3] * 20, True)]
    assert [len(s) for s in replay_sequences(pieces)] == [128, 20]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_projection_takes_the_update_off_the_directions_only(dtype):
    """The probe's math (docs/RECIPE.md): after the step, row update minus its part along the directions."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(37, 16).to(dtype))
    basis = principal_directions(torch.randn(50, 16) + 2.0, 3)
    optimizer = torch.optim.SGD([weight], lr=0.5)
    projection = OutputRowProjection(weight, basis, seed=0, step_of=lambda: 7)
    projection.attach(optimizer)
    before = weight.detach().float().clone()
    weight.grad = torch.randn(37, 16).to(dtype)
    optimizer.step()
    delta = -0.5 * weight.grad.float()
    expected = before + delta - (delta @ basis.t()) @ basis
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(weight.detach().float(), expected, atol=tolerance, rtol=0)
    along = (weight.detach().float() - before) @ basis.t()
    assert float(along.abs().max()) < (1e-5 if dtype == torch.float32 else 0.05)
    projection.detach()
    weight.grad = torch.ones_like(weight)
    optimizer.step()  # detached: a plain step
    assert float(((weight.detach().float() - expected) @ basis.t()).abs().max()) > 0.1


def _peft(tied: bool):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(tied=tied),
        LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens", "lm_head"],
            ensure_weight_tying=tied,  # as the recipe sets it up: one trained copy shared by both
        ),
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))  # "trained"
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_step_back_moves_lora_b_and_the_embedding_copies_toward_the_start(tied):
    model = _peft(tied)
    trained = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    summary = step_back(model, 0.9)
    after = dict(model.named_parameters(remove_duplicate=False))
    for name, value in trained.items():
        if ".lora_B." in name:
            torch.testing.assert_close(after[name].detach(), 0.9 * value)
        elif "lora_A" in name or "original_module" in name:
            assert torch.equal(after[name].detach(), value)
        elif "modules_to_save" in name:
            start = trained[name.replace("modules_to_save.default", "original_module")]
            torch.testing.assert_close(after[name].detach(), start + 0.9 * (value - start))
    assert summary["lora"] == 4 and summary["embeddings"] == (1 if tied else 2) and summary["left"] == []


def _dataset(replay: bool):
    tokenizer = byte_bpe_tokenizer()
    extra = {"replay_source": OLD, "replay_ratio": 0.25} if replay else {}
    return CPTDataset(NEW, tokenizer, 32, seed=0, **extra)


def _trainer(tmp_path, dataset, **cpt):
    model = tiny_llama(tied=False, vocab_size=len(dataset.tokenizer))
    callback = CPTCallback(lora_r=4, memory_report=False, **cpt)
    return Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=dataset,
                   callbacks=[callback]), callback  # fmt: skip


def test_a_trainer_with_replay_data_gets_all_three_and_the_trained_weights_step_back(tmp_path, caplog):
    torch.manual_seed(0)
    kept_trainer, _ = _trainer(tmp_path / "kept", _dataset(True), final_step_back=1.0)
    kept_trainer.train()
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="cpt_plugin"):
        trainer, callback = _trainer(tmp_path / "default", _dataset(True))
        trainer.train()
    assert (callback.config.domain_shift_ratio, callback.config.output_row_projection) == (4.0, 4)
    assert callback._projection is not None and callback.stepped_back["lora"] > 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "the training data has replay" in messages and "kept off 4 directions" in messages
    kept = dict(kept_trainer.model.named_parameters())
    for name, param in trainer.model.named_parameters():
        if ".lora_B." in name:  # the same training, then B x 0.975
            torch.testing.assert_close(param.detach(), 0.975 * kept[name].detach(), rtol=1e-5, atol=1e-7)


def test_without_replay_data_nothing_changes_and_an_explicit_projection_is_an_error(tmp_path):
    trainer, callback = _trainer(tmp_path / "plain", _dataset(False))
    assert (callback.config.domain_shift_ratio, callback.config.output_row_projection) == (0.0, 0)
    assert callback.config.final_step_back == 1.0
    with pytest.raises(CPTConfigError, match="'output_row_projection' is 4.*replay_source"):
        _trainer(tmp_path / "asked", _dataset(False), output_row_projection=4)


def test_the_update_of_the_trained_lm_head_stays_off_the_directions_in_training(tmp_path):
    trainer, callback = _trainer(tmp_path, _dataset(True), final_step_back=1.0)
    head = trainer.model.get_output_embeddings()
    weight = next(p for p in head.parameters() if p.requires_grad)
    start = weight.detach().clone()
    trainer.train()
    projection = callback._projection
    moved = weight.detach() - start
    assert float(moved.abs().max()) > 0
    along = moved @ projection.directions.t()
    assert float(along.abs().max()) < 1e-4 * float(moved.abs().max()) + 1e-7


@pytest.mark.parametrize("refresh", [0, 3])
def test_resume_with_the_replay_defaults_continues_exactly(tmp_path, refresh):
    """The directions start from the base and, refreshed at step 3, travel with checkpoint-3; the rounding
    seeds come from the global step; the checkpoint holds the trained weights, and the step back happens at
    each run's end."""

    def run(resume=None):
        torch.manual_seed(0)
        dataset = _dataset(True)
        model = tiny_llama(tied=False, vocab_size=len(dataset.tokenizer), seed=1)
        args = training_args(tmp_path, max_steps=6, save_steps=3, save_strategy="steps", warmup_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          callbacks=[CPTCallback(lora_r=4, memory_report=False,
                                                 output_row_projection_refresh=refresh)])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    assert (tmp_path / "out" / "checkpoint-3" / "cpt_output_rows.safetensors").is_file()
    resumed = run(resume=str(tmp_path / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    final_full = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(
                param.detach(), final_full[name].detach(), rtol=1e-5, atol=1e-7, msg=name
            )


def test_the_directions_are_refreshed_before_every_refresh_th_step():
    weight = torch.nn.Parameter(torch.randn(5, 8))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    step = {"n": 0}
    made = []

    def directions_of():
        made.append(step["n"] + 1)
        return principal_directions(torch.randn(20, 8), 2)

    projection = OutputRowProjection(
        weight, principal_directions(torch.randn(20, 8), 2), 0, lambda: step["n"], 3, directions_of
    )
    projection.attach(optimizer)
    for _ in range(7):
        weight.grad = torch.randn(5, 8)
        optimizer.step()
        step["n"] += 1  # as the Trainer counts, after the step
    assert made == [3, 6]


def test_the_held_out_evaluation_at_the_end_is_of_the_stepped_back_model(tmp_path):
    """An evaluation made at the last step (before the step back) is replaced by one of the final model."""
    from cpt_plugin.evaluation import heldout_loss, take_blocks

    dataset = _dataset(True)
    held_out = take_blocks(CPTDataset(NEW[:4], dataset.tokenizer, 32, seed=1), 256)
    model = tiny_llama(tied=False, vocab_size=len(dataset.tokenizer))
    callback = CPTCallback(lora_r=4, memory_report=False, eval_every_steps=3, eval_new=held_out)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=dataset,
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    steps = [h["step"] for h in callback.evaluator.history]
    assert steps == [0, 3]  # the base, then one entry at the end: the step-3 one was replaced
    assert callback.evaluator.history[-1]["new"] == pytest.approx(
        heldout_loss(trainer.model, held_out), rel=1e-6
    )


def test_an_optimizer_whose_step_calls_its_parents_is_projected_once_over_the_whole_update():
    """CPTAdamW's step() calls torch's AdamW.step(), which carries the hooks too once any AdamW exists: the
    projection must wrap the whole update, not the inner part (a CI run caught it skipping the update)."""

    class Outer(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(p.grad, alpha=-0.3)  # its own update first, as CPTAdamW's row groups
            return super().step(closure)

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # torch now hooks SGD.step too
    weight = torch.nn.Parameter(torch.randn(11, 8))
    basis = principal_directions(torch.randn(30, 8) + 1.0, 2)
    optimizer = Outer([weight], lr=0.2)
    OutputRowProjection(weight, basis, seed=0, step_of=lambda: 0).attach(optimizer)
    before = weight.detach().clone()
    weight.grad = torch.randn(11, 8)
    optimizer.step()
    along = (weight.detach() - before) @ basis.t()
    assert float(along.abs().max()) < 1e-5
