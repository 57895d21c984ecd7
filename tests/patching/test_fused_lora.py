"""The fused LoRA path inside PEFT models: same numbers as PEFT, PEFT's API untouched, honest fallbacks."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel

from cpt_plugin import CPTConfig, setup_model
from cpt_plugin.kernels import lora as lora_kernels
from cpt_plugin.patching.lora import disable_fused_lora, enable_fused_lora
from cpt_plugin.patching.registry import unpatch
from tests.patching.models import FAMILIES, assert_same_grads, batch, tiny_model, train_step

NO_FUSED = ["rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"]


def _config(**overrides) -> CPTConfig:
    return CPTConfig(**{"lora_r": 8, "lora_alpha": 16, "gradient_checkpointing": "off", **overrides})


@torch.no_grad()
def _randomize_lora_b(model: torch.nn.Module, seed: int = 5) -> None:
    """PEFT starts B at zero, which would hide every error in the LoRA branch and in dA."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _setup(family: str, config: CPTConfig, **model_overrides) -> torch.nn.Module:
    model = setup_model(tiny_model(family, **model_overrides), config)
    _randomize_lora_b(model)
    return model


def _count_calls(monkeypatch) -> dict[str, int]:
    calls = {"linear": 0, "group": 0, "mlp": 0}
    for key, fn_name in (
        ("linear", "lora_linear"),
        ("group", "lora_grouped_linear"),
        ("mlp", "lora_gated_mlp"),
    ):
        original = getattr(lora_kernels, fn_name)

        def counting(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"cpt_plugin.patching.lora.{fn_name}", counting)
    return calls


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_unpatched_peft(family, tied, monkeypatch):
    """Every kernel on (fused LoRA included) against plain PEFT on the unpatched model: loss and grads."""
    inputs = batch()
    reference = _setup(family, _config(kernels=False), tie_word_embeddings=tied)
    want_loss, want_grads, _ = train_step(reference, inputs)
    calls = _count_calls(monkeypatch)
    fused = _setup(family, _config(kernels=True), tie_word_embeddings=tied)
    got_loss, got_grads, _ = train_step(fused, inputs)
    assert calls == {"linear": 1, "group": 1, "mlp": 1}  # one decoder layer: q/k/v together, o, the MLP
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def test_fused_lora_alone_matches_peft_bf16_autocast():
    """bf16 autocast, as the Trainer runs: the fused path against PEFT within bf16 tolerance."""
    inputs = batch(shape=(2, 13))
    reference = _setup("llama", _config(kernels=NO_FUSED))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grads, _ = train_step(reference, inputs)
    fused = _setup("llama", _config(kernels=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss, got_grads, _ = train_step(fused, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for name, want in want_grads.items():
        got = got_grads[name]
        assert got.dtype == want.dtype, name
        err = (got - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 5e-2, f"{name}: relative error {err:.3g}"


def test_peft_api_is_untouched(tmp_path):
    """disable_adapter, merge_and_unload and an adapter saved by the fused path loaded in plain PEFT."""
    model = _setup("llama", _config(kernels=True))
    model.eval()
    ids = batch()["input_ids"]
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(fused_logits, base_logits)
    model.save_pretrained(tmp_path / "adapter")
    # plain PEFT, nothing of cpt-plugin active: a fresh base model with the same weights
    unpatch()
    base = tiny_model("llama")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded.eval()
    with torch.no_grad():
        plain_logits = loaded(input_ids=ids).logits
        merged = loaded.merge_and_unload()
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(plain_logits, fused_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_logits, fused_logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base_again = tiny_model("llama")(input_ids=ids).logits
    torch.testing.assert_close(base_again, base_logits, rtol=1e-5, atol=1e-5)


def test_parameter_names_and_state_dict_unchanged():
    a = _setup("llama", _config(kernels=NO_FUSED))
    b = _setup("llama", _config(kernels=True))
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert a.state_dict().keys() == b.state_dict().keys()


def test_dropout_falls_back_to_peft_with_one_notice(caplog, monkeypatch):
    calls = _count_calls(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.patching.lora"):
        model = _setup("llama", _config(kernels=True, lora_dropout=0.1))
    notices = [r.getMessage() for r in caplog.records if "PEFT's own" in r.getMessage()]
    assert len(notices) == 1 and "lora_dropout > 0" in notices[0] and notices[0].startswith("cpt-plugin: 7 ")
    train_step(model, batch())
    assert calls == {"linear": 0, "group": 0, "mlp": 0}


def test_dora_falls_back_to_peft(caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.patching.lora"):
        assert enable_fused_lora(model) == 0
    assert any("variant" in r.getMessage() for r in caplog.records)


def test_cached_projection_follows_replaced_tensors_and_scales():
    """projection_of reuses the projection it built while the layer's tensors and scale are the same ones:
    a replaced factor or base weight (FSDP2 swaps parameters, a user may too), a new scale, a disabled or
    merged adapter are each seen at the next call, and the output matches PEFT's own forward then."""
    from cpt_plugin.patching.lora import projection_of

    model = _setup("llama", _config(kernels=True))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    first = projection_of(layer)
    assert first is not None and projection_of(layer) is first
    x = torch.randn(2, 5, layer.in_features)

    def peft_output() -> torch.Tensor:
        layer.__dict__.pop("_cpt_fused_lora")
        try:
            return layer(x)
        finally:
            layer.__dict__["_cpt_fused_lora"] = True

    with torch.no_grad():
        layer.lora_B["default"].weight = torch.nn.Parameter(torch.randn_like(layer.lora_B["default"].weight))
        assert projection_of(layer).lora_b is layer.lora_B["default"].weight
        torch.testing.assert_close(layer(x), peft_output(), rtol=1e-5, atol=1e-5)
        layer.base_layer.weight = torch.nn.Parameter(torch.randn_like(layer.base_layer.weight), False)
        assert projection_of(layer).weight is layer.base_layer.weight
        layer.scaling["default"] = 0.25
        assert projection_of(layer).scale == 0.25
        torch.testing.assert_close(layer(x), peft_output(), rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            assert projection_of(layer) is None
        layer.merge()
        assert projection_of(layer) is None
        layer.unmerge()
        assert projection_of(layer) is not None
    layer.base_layer.weight.requires_grad_(True)  # unfrozen after set-up: PEFT's path, with its gradient
    assert projection_of(layer) is None
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_disable_fused_lora_restores_peft_numbers():
    model = _setup("llama", _config(kernels=True))
    inputs = batch()
    loss_fused, grads_fused, _ = train_step(model, inputs)
    assert disable_fused_lora(model) == 7
    loss_peft, grads_peft, _ = train_step(model, inputs)
    torch.testing.assert_close(loss_fused, loss_peft, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads_fused, grads_peft)


@pytest.mark.parametrize("mode", ["recompute", "offload"])
@pytest.mark.parametrize("tiled", [False, True])
def test_fused_lora_inside_checkpointing_and_tiled_mlp(mode, tiled):
    from cpt_plugin.offload.checkpointing import enable_checkpointing
    from cpt_plugin.offload.tiled_mlp import enable_tiled_mlp

    inputs = batch(shape=(2, 9))
    plain = _setup("llama", _config(kernels=True), num_hidden_layers=2)
    want_loss, want_grads, _ = train_step(plain, inputs)
    model = _setup("llama", _config(kernels=True), num_hidden_layers=2)
    enable_checkpointing(model, mode, _simulate_offload=mode == "offload")
    if tiled:
        enable_tiled_mlp(model, chunk_tokens=5)
    got_loss, got_grads, _ = train_step(model, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(got_grads, want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("after_eval", [False, True], ids=["fresh", "after_an_eval_forward"])
def test_four_bit_base_matches_peft(after_eval):
    """A bitsandbytes NF4 base (CPU build): the fused path dequantizes once per pass, same numbers as PEFT.

    ``after_eval``: bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval forward without
    gradients (samples, held-out evaluation); the fused path must read that layout too."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 96, bias=False)
        quantized = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        try:
            quantized.weight = quantized.weight.to("cpu")
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"bitsandbytes cannot quantize on this CPU: {exc}")

        class Holder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = quantized

            def forward(self, x):
                return self.proj(x)

        model = get_peft_model(Holder(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
        _randomize_lora_b(model)
        if after_eval:
            model.eval()
            with torch.no_grad():
                model(torch.randn(1, 3, 64))
            model.train()
        return model

    x = torch.randn(2, 7, 64)
    reference = build()
    want = reference(x)
    want.square().sum().backward()
    fused = build()
    assert enable_fused_lora(fused) == 1
    got = fused(x)
    got.square().sum().backward()
    if not after_eval:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for (name, p), (_, q) in zip(fused.named_parameters(), reference.named_parameters(), strict=True):
        if p.requires_grad and not after_eval:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        elif p.requires_grad:  # after the repack PEFT runs bitsandbytes' CPU kernel, which computes in bf16
            assert (p.grad - q.grad).norm() / q.grad.norm() < 2e-2, name
    if after_eval:
        assert (got - want).norm() / want.norm() < 2e-2


def test_group_falls_back_when_siblings_see_another_input(monkeypatch):
    """k/v called on a tensor other than q's: each is computed on its own, with the right numbers."""
    model = _setup("llama", _config(kernels=True))
    attention = model.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    q = attention.q_proj(x)
    k_other = attention.k_proj(other)  # not the stashed input
    v = attention.v_proj(x)
    disable_fused_lora(model)
    torch.testing.assert_close(q, attention.q_proj(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_other, attention.k_proj(other), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, attention.v_proj(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_four_bit_base_matches_peft_on_gpu():
    """NF4 base with bf16 compute on CUDA under autocast (the QLoRA recipe): fused path vs PEFT's."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        linear = torch.nn.Linear(512, 384, bias=False).to(torch.bfloat16)
        quantized = bnb.nn.Linear4bit(512, 384, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        holder = torch.nn.Sequential()
        holder.add_module("proj", quantized.to("cuda"))
        model = get_peft_model(holder, LoraConfig(r=32, lora_alpha=32, target_modules=["proj"]))
        _randomize_lora_b(model)
        return model

    x = torch.randn(3, 257, 512, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fused in (False, True):
        model = build()
        if fused:
            assert enable_fused_lora(model) == 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        grads = [p.grad.float() for p in model.parameters() if p.requires_grad]
        outs.append((out.float(), grads))
    (want, want_grads), (got, got_grads) = outs
    assert (got - want).norm() / want.norm() < 1e-2
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g - w).norm() / w.norm() < 2e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_skips_the_down_projection_only_where_its_output_is_unused(family, monkeypatch):
    """Llama/Mistral/Qwen: the recompute skips the MLP's last matmul; Gemma (norm after the MLP) does not."""
    from cpt_plugin.offload.checkpointing import enable_checkpointing

    skips = []
    original = lora_kernels.lora_gated_mlp

    def spy(*args, skip_output=False, **kwargs):
        skips.append(skip_output)
        return original(*args, skip_output=skip_output, **kwargs)

    monkeypatch.setattr("cpt_plugin.patching.lora.lora_gated_mlp", spy)
    inputs = batch(shape=(2, 9))
    plain = _setup(family, _config(kernels=True), num_hidden_layers=2)
    want_loss, want_grads, _ = train_step(plain, inputs)
    model = _setup(family, _config(kernels=True), num_hidden_layers=2)
    enable_checkpointing(model, "recompute")
    skips.clear()
    got_loss, got_grads, _ = train_step(model, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(got_grads, want_grads, rtol=1e-4, atol=1e-6)
    residual_only = not family.startswith("gemma")
    assert skips == [False, False] + [residual_only] * 2  # two forwards, then two recomputes
