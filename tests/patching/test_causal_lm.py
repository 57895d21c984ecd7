"""The fused-loss causal-LM forward: PEFT heads, LoRA gradients, loss conventions, eval and generate."""

from __future__ import annotations

import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from cpt_plugin.patching.registry import patch
from tests.patching.models import assert_same_grads, batch, tiny_model, train_step

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(model, **lora):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)  # random B: A gets gradients too
    return get_peft_model(model, config)


def _fused_matches_unpatched(model, inputs, reports: list | None = None) -> dict[str, torch.Tensor]:
    """Trains one step unpatched, patches, trains the same step again: the fused loss ran (no logits) and
    gave the same loss and gradients. Returns the fused step's gradients (``reports`` gets the patch report)."""
    want_loss, want_grads, _ = train_step(model, inputs)
    report = patch(model)
    if reports is not None:
        reports.append(report)
    got_loss, got_grads, out = train_step(model, inputs)
    assert out.logits is None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    assert_same_grads(got_grads, want_grads)
    return got_grads


def test_peft_lora_with_trained_embeddings_matches_unpatched() -> None:
    model = _peft(
        tiny_model("llama"), target_modules=PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"]
    )
    reports = []
    got_grads = _fused_matches_unpatched(model, batch(), reports)
    assert "LlamaForCausalLM.forward" in reports[0].applied["fused_linear_cross_entropy"]
    head = [n for n in got_grads if "lm_head.modules_to_save" in n]
    assert head and all(got_grads[n].abs().sum() > 0 for n in head)
    assert not any("lm_head.original_module" in n for n in got_grads)
    assert any("lora_A" in n and "gate_proj" in n for n in got_grads)


def test_lora_on_lm_head_gets_gradients_under_the_fused_loss() -> None:
    model = _peft(tiny_model("llama"), target_modules=["q_proj", "lm_head"], lora_dropout=0.1)
    got_grads = _fused_matches_unpatched(model, batch())
    for factor in ("lora_A", "lora_B"):
        name = next(n for n in got_grads if "lm_head" in n and factor in n)
        assert got_grads[name].abs().sum() > 0, name


def test_tied_gemma_head_with_softcap_under_peft() -> None:
    model = _peft(tiny_model("gemma2"), target_modules=PROJECTIONS)
    assert model.get_base_model().config.tie_word_embeddings
    model.get_base_model().model.embed_tokens.weight.requires_grad_(True)  # tied head weight trains too
    got_grads = _fused_matches_unpatched(model, batch())
    assert got_grads["base_model.model.model.embed_tokens.weight"].abs().sum() > 0


@pytest.fixture(scope="module")
def llama_pair():
    """(unpatched reference, patched copy) with the same weights."""
    reference = tiny_model("llama")
    model = tiny_model("llama")
    model.load_state_dict(reference.state_dict())
    return reference, model


def test_num_items_in_batch_and_ignored_labels(llama_pair) -> None:
    reference, model = llama_pair
    patch(model)
    inputs = batch()
    items = torch.tensor(7)
    want, _, _ = train_step(reference, inputs, num_items_in_batch=items)
    got, _, _ = train_step(model, inputs, num_items_in_batch=items)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    mean, _, _ = train_step(model, inputs)
    assert not torch.allclose(got, mean)

    ignored = {"input_ids": inputs["input_ids"], "labels": torch.full_like(inputs["labels"], -100)}
    loss, grads, _ = train_step(model, ignored)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_logits_to_keep_return_dict_and_eval(llama_pair) -> None:
    reference, model = llama_pair
    patch(model)
    inputs = batch()
    ids, labels = inputs["input_ids"], inputs["labels"]

    # logits_to_keep=k: the loss of the last k positions (transformers itself cannot combine the two).
    model.train()
    loss = model(**inputs, logits_to_keep=4).loss
    with torch.no_grad():
        logits = reference(input_ids=ids).logits[:, -4:]
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:][:, -4:]
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))
    )

    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.is_tensor(as_tuple[0]) and as_tuple[0].ndim == 0

    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        want = reference.eval()(**inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-4, atol=1e-6)
    model.cpt_fused_loss = True  # forces the fused loss in eval too
    try:
        with torch.no_grad():
            forced = model(**inputs)
    finally:
        del model.cpt_fused_loss
    assert forced.logits is None
    torch.testing.assert_close(forced.loss, want.loss, rtol=1e-4, atol=1e-6)


def test_signature_kept_and_generate_works(llama_pair) -> None:
    reference, model = llama_pair
    patch(model)
    parameters = inspect.signature(model.forward).parameters
    assert {"input_ids", "labels", "logits_to_keep"} <= set(parameters)  # Trainer / generate() inspect it
    prompt = batch()["input_ids"][:1, :4]
    model.eval()
    reference.eval()
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=3, do_sample=False)
        want = reference.generate(prompt, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("tied", "head_too"), [(False, False), (False, True), (True, False)])
def test_peft_trainable_tokens_give_the_unpatched_loss_and_gradients(tied, head_too) -> None:
    """PEFT's ``trainable_token_indices`` (only some embedding rows trained): untied, lm_head stays a plain
    Linear or gets its own trainable rows (``embedding_rows: fresh`` does that); tied, PEFT wraps lm_head too.
    A wrapped head gives the fused loss the weight with its trained rows. Every way the fused loss runs (no
    logits) and gives the unpatched model's loss and gradients."""
    inputs = batch()
    seen = sorted({int(i) for i in inputs["input_ids"][1, :3]})  # rows the batch reads: input gradients too
    indices = {"embed_tokens": [*seen, 250], **({"lm_head": [*seen, 250]} if head_too else {})}
    model = _peft(
        tiny_model("llama", tie_word_embeddings=tied),
        target_modules=PROJECTIONS,
        trainable_token_indices=indices,
    )
    assert (type(model.base_model.model.lm_head).__name__ == "TrainableTokensWrapper") == (tied or head_too)
    with torch.no_grad():  # PEFT starts the deltas at the original rows: move them
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    got_grads = _fused_matches_unpatched(model, inputs)
    assert any("trainable_tokens_delta" in n and got_grads[n].abs().sum() > 0 for n in got_grads)
    with torch.no_grad():
        trained_loss = model(**inputs).loss
        with model.disable_adapter():  # the base head: the plain weight
            base_loss = model(**inputs).loss
    assert not torch.allclose(base_loss, trained_loss)


def test_an_unknown_head_keeps_transformers_loss_with_one_notice(caplog) -> None:
    """A head the fused loss does not know (here a Linear with its own forward) falls back to the original
    forward (full logits), with one notice for that kind of head, not one per step."""
    from cpt_plugin.patching import causal_lm

    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    causal_lm._NOTICED_HEADS.clear()
    model = tiny_model("llama", tie_word_embeddings=False)
    old = model.lm_head
    model.lm_head = ScaledHead(old.in_features, old.out_features, bias=False)
    model.lm_head.weight = old.weight
    inputs = batch()
    want_loss, want_grads, _ = train_step(model, inputs)
    patch(model)
    with caplog.at_level("WARNING", logger="cpt_plugin.patching.causal_lm"):
        got_loss, got_grads, out = train_step(model, inputs)
        train_step(model, inputs)
    assert out.logits is not None
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-6)
    notices = [r for r in caplog.records if "does not know an lm_head of type ScaledHead" in r.getMessage()]
    assert len(notices) == 1
