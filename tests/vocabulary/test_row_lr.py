"""Row-aware embedding learning rates: fresh rows step as AdamW at the fresh LR, known rows at the embedding
LR, inside one optimizer (a per-row factor on the update), resumable exactly."""

from __future__ import annotations

import logging

import pytest
import torch

from cpt_plugin import CPTConfig, CPTConfigError, prepare_model
from cpt_plugin import stochastic_rounding as sr
from cpt_plugin.optim import CPTAdamW, create_optimizer
from cpt_plugin.vocabulary.fresh_rows import mark_fresh_rows
from tests.tiny import tiny_llama

FRESH = [3, 10, 200]
LR, KNOWN_LR = 1e-2, 1e-3  # LoRA LR (the fresh rows' default) and the embedding LR (ratio 0.1)


def _prepared(tied: bool, **settings):
    base = tiny_llama(tied=tied)
    mark_fresh_rows(base, FRESH)
    config = CPTConfig(lora_r=4, trained_embeddings_dtype="float32", **settings)
    return prepare_model(base, config), config


def _embedding_group(optimizer):
    return next(g for g in optimizer.param_groups if g["cpt_group"] == "embeddings")


def _fresh_mask(rows: int) -> torch.Tensor:
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[FRESH] = True
    return mask


@pytest.mark.parametrize("tied", [True, False])
def test_fresh_rows_step_as_adamw_at_the_fresh_lr_and_known_rows_at_the_embedding_lr(tied):
    """fp32 copies, weight decay and a schedule: against two plain torch AdamW runs (one per LR) on copies."""
    model, config = _prepared(tied)
    optimizer = create_optimizer(model, config, learning_rate=LR, weight_decay=0.1)
    group = _embedding_group(optimizer)
    assert group["lr"] == LR and group["cpt_update"] == "adamw"
    params = group["params"]
    assert len(params) == (1 if tied else 2)
    schedule = lambda step: 1.0 / (1 + step)  # noqa: E731 - the scheduler scales the group LR
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    references = {}
    for lr in (LR, KNOWN_LR):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        plain = torch.optim.AdamW(copies, lr=lr, weight_decay=0.1, foreach=False)
        references[lr] = (copies, plain, torch.optim.lr_scheduler.LambdaLR(plain, schedule))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 257, (2, 9), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        for copies, plain, plain_schedule in references.values():
            for copy, param in zip(copies, params, strict=True):
                copy.grad = param.grad.clone()
            plain.step()
            plain_schedule.step()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    fresh = _fresh_mask(257)
    for index, param in enumerate(params):
        fast, slow = references[LR][0][index], references[KNOWN_LR][0][index]
        torch.testing.assert_close(param[fresh], fast[fresh], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(param[~fresh], slow[~fresh], rtol=1e-6, atol=1e-8)
        assert (param[~fresh] - fast[~fresh]).abs().max() > 1e-3  # the known rows did not take the fast LR


def test_the_fresh_lr_is_its_own_key_and_the_row_ratio_survives_the_schedule():
    model, config = _prepared(tied=True, fresh_row_learning_rate=5e-3)
    optimizer = create_optimizer(model, config, learning_rate=LR)
    group = _embedding_group(optimizer)
    assert group["lr"] == 5e-3
    scale = group["cpt_row_scale"]
    fresh = _fresh_mask(257)
    assert torch.all(scale[fresh] == 1.0)
    torch.testing.assert_close(scale[~fresh], torch.full((254,), KNOWN_LR / 5e-3))


def test_one_line_at_optimizer_creation_says_both_rates(caplog):
    model, config = _prepared(tied=True)
    with caplog.at_level(logging.INFO, logger="cpt_plugin"):
        create_optimizer(model, config, learning_rate=LR)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("cpt_plugin.optim")]
    assert lines == [
        "cpt-plugin: 3 new or untrained embedding rows learn at LR 0.01 (the other 254 at 0.001)"
    ]


@pytest.mark.parametrize("settings", [{}, {"row_aware_embedding_lr": False}])
def test_without_fresh_rows_or_with_row_aware_off_everything_is_as_before(settings):
    base = tiny_llama(tied=False)
    if settings:
        mark_fresh_rows(base, FRESH)
    config = CPTConfig(lora_r=4, trained_embeddings_dtype="float32", **settings)
    model = prepare_model(base, config)
    optimizer = create_optimizer(model, config, learning_rate=LR)
    assert type(optimizer) is torch.optim.AdamW  # no own update needed
    group = _embedding_group(optimizer)
    assert group["lr"] == pytest.approx(KNOWN_LR) and "cpt_row_scale" not in group


def test_fresh_rows_outside_the_embedding_are_a_clear_error():
    base = tiny_llama(tied=True)
    config = CPTConfig(lora_r=4)
    model = prepare_model(base, config)
    mark_fresh_rows(model, [300])
    with pytest.raises(CPTConfigError, match=r"fresh embedding row 300 is outside the embedding's 257 rows"):
        create_optimizer(model, config, learning_rate=LR)


def _bf16_case(rows: int = 64, width: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = (0.02 * torch.randn(rows, width, generator=generator)).to(torch.bfloat16)
    grad = torch.randn(rows, width, generator=generator).to(torch.bfloat16)
    scale = torch.full((rows,), 0.1)
    scale[: rows // 4] = 1.0
    return weight, grad, scale


@pytest.mark.parametrize("path", ["triton", "torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_stochastic_rounding_per_row_is_unbiased(path):
    """bf16 weights (the default bfloat16_sr): each stored value is a bf16 neighbour of the exact fp32
    AdamW result at its row's LR, and the rounding error averages out. "triton": the fused kernel under
    the CPU interpreter; "cuda": the same kernel compiled for the GPU (GPU machine only)."""
    weight, grad, scale = _bf16_case(rows=512 if path == "cuda" else 64)
    hyper = dict(step=1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    lr = 1e-3
    exact = torch.empty(weight.shape, dtype=torch.float64)
    zeros = torch.zeros_like(weight, dtype=torch.float32)
    for rate, rows in ((lr, scale == 1.0), (lr * 0.1, scale != 1.0)):
        w, _, _ = sr.adamw_step_reference(weight.float()[rows], grad.float()[rows], zeros[rows], zeros[rows],
                                          lr=rate, **hyper)  # fmt: skip
        exact[rows] = w
    if path == "triton" and torch.cuda.is_available():
        pytest.skip("no interpreter on a GPU machine: the 'cuda' case runs this kernel there")
    device = "cuda" if path == "cuda" else "cpu"
    updated = weight.clone().to(device)
    moments = (torch.zeros_like(updated), torch.zeros_like(updated))
    if path in ("triton", "cuda"):
        on_device = (grad.to(device), scale.to(device))
        assert sr.fused_path_applies(updated, on_device[0], *moments)
        sr.adamw_bf16_sr_fused_(
            updated, on_device[0], *moments, lr=lr, **hyper, seed=5, row_scale=on_device[1]
        )
        updated = updated.cpu()
    else:
        generator = torch.Generator().manual_seed(5)
        sr.adamw_step_(updated, grad, *moments, lr=lr, **hyper, generator=generator, row_scale=scale)
    down = exact.float().to(torch.bfloat16)  # the neighbours of the exact value
    result, low = updated.double(), torch.minimum(down.double(), exact)
    ulp = (exact.abs() * 2.0**-7).clamp_min(1e-30)
    off = (result - exact).abs() > ulp * 1.01
    if off.any():  # say which elements, so a GPU-only difference can be understood from the log
        idx = off.nonzero()[:5].tolist()
        detail = [
            (
                r,
                c,
                float(weight[r, c]),
                float(grad[r, c]),
                float(scale[r]),
                float(exact[r, c]),
                float(result[r, c]),
            )
            for r, c in idx
        ]
        pytest.fail(
            f"{int(off.sum())} of {off.numel()} off by more than 1 ulp; (row, col, w, g, scale, exact, got): {detail}"
        )
    assert torch.all(result >= low - ulp * 1.01)
    error = ((result - exact) / ulp).mean()
    assert abs(float(error)) < 0.05  # unbiased: 16K elements, the mean error well under 1/20 ulp


def test_bf16_without_rounding_rounds_to_nearest():
    """trained_embeddings_dtype: model keeps its meaning on the per-row path: round-to-nearest, no randomness."""
    weight, grad, scale = _bf16_case()
    hyper = dict(step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    results = []
    for _ in range(2):
        updated = weight.clone()
        moments = (torch.zeros_like(weight), torch.zeros_like(weight))
        sr.adamw_step_(updated, grad, *moments, **hyper, generator=None, row_scale=scale)
        results.append(updated)
    fp32 = weight.float()
    sr.adamw_step_(fp32, grad.float(), torch.zeros_like(fp32), torch.zeros_like(fp32), **hyper, generator=None,
                   row_scale=scale)  # fmt: skip
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], fp32.to(torch.bfloat16))


def test_embedding_parameters_without_token_rows_keep_the_embedding_lr():
    base = tiny_llama(tied=False)
    base.get_output_embeddings().register_parameter("extra", torch.nn.Parameter(torch.zeros(5)))
    mark_fresh_rows(base, FRESH)
    config = CPTConfig(lora_r=4, trained_embeddings_dtype="float32")
    model = prepare_model(base, config)
    groups = {g["cpt_group"]: g for g in create_optimizer(model, config, learning_rate=LR).param_groups}
    assert [p.shape for p in groups["embeddings_other_no_decay"]["params"]] == [torch.Size([5])]
    assert groups["embeddings_other_no_decay"]["lr"] == pytest.approx(KNOWN_LR)
    assert "cpt_row_scale" not in groups["embeddings_other_no_decay"]
    assert groups["embeddings"]["lr"] == LR and len(groups["embeddings"]["params"]) == 2


def test_healed_rows_get_the_fresh_lr_end_to_end():
    base = tiny_llama(tied=True)
    with torch.no_grad():
        base.get_input_embeddings().weight[[4, 8]] = 0.0  # two reserved-token rows
    config = CPTConfig(lora_r=4)
    model = prepare_model(base, config)
    scale = _embedding_group(create_optimizer(model, config, learning_rate=LR))["cpt_row_scale"]
    assert torch.nonzero(scale == 1.0).flatten().tolist() == [4, 8]


def _8bit_case(device: str):
    generator = torch.Generator().manual_seed(1)
    rows, width = 64, 128  # 8192 elements: 8-bit states (>= 4096)
    weight = 0.02 * torch.randn(rows, width, generator=generator)
    grads = [torch.randn(rows, width, generator=generator).to(device) for _ in range(2)]
    scale = torch.full((rows,), 0.1)
    scale[:16] = 1.0
    return weight.to(device), grads, scale.to(device), sr.dynamic_qmaps(torch.device(device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_8bit_states_per_row_match_two_runs_at_the_two_rates(device):
    pytest.importorskip("bitsandbytes")
    weight, grads, scale, qmaps = _8bit_case(device)
    hyper = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, generator=None)
    runs = {}
    for name, lr, row_scale in (("per_row", 1e-3, scale), ("fast", 1e-3, None), ("slow", 1e-4, None)):
        param, state = weight.clone(), sr.init_8bit_state(weight)
        for step, grad in enumerate(grads, start=1):
            sr.adamw_8bit_step_(param, grad, state, qmaps, step=step, lr=lr, **hyper, row_scale=row_scale)
        runs[name] = param
    fresh = scale == 1.0
    torch.testing.assert_close(runs["per_row"][fresh], runs["fast"][fresh], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(runs["per_row"][~fresh], runs["slow"][~fresh], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_8bit_states_per_row_on_bf16_weights_round_to_a_neighbour(device):
    """embedding_optimizer adamw_8bit on bf16 copies (rounded stochastically): one step lands on a bf16
    neighbour of the fp32 per-row result."""
    pytest.importorskip("bitsandbytes")
    weight, grads, scale, qmaps = _8bit_case(device)
    weight = weight.to(torch.bfloat16)
    hyper = dict(step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, row_scale=scale)
    exact = weight.float()
    sr.adamw_8bit_step_(exact, grads[0], sr.init_8bit_state(exact), qmaps, **hyper, generator=None)
    rounded = weight.clone()
    generator = torch.Generator(device=device).manual_seed(3)
    sr.adamw_8bit_step_(rounded, grads[0], sr.init_8bit_state(rounded), qmaps, **hyper, generator=generator)
    ulp = exact.abs() * 2.0**-7
    assert torch.all((rounded.float() - exact).abs() <= ulp * 1.01)
    assert (rounded != weight).float().mean() > 0.1  # small known-row updates survive some of the time


def test_the_per_row_vector_comes_back_from_a_saved_optimizer_and_the_next_step_is_identical(tmp_path):
    model, config = _prepared(tied=False, embedding_optimizer="adamw_8bit")
    ids = torch.randint(0, 257, (2, 9), generator=torch.Generator().manual_seed(2))

    def step(optimizer):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    optimizer = create_optimizer(model, config, learning_rate=LR, weight_decay=0.1)
    step(optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    saved_weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    step(optimizer)
    expected = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for param, saved in zip(
            [p for p in model.parameters() if p.requires_grad], saved_weights, strict=True
        ):
            param.copy_(saved)
    resumed = create_optimizer(model, config, learning_rate=LR, weight_decay=0.1)
    _embedding_group(resumed)["cpt_row_scale"].fill_(7.0)  # whatever it holds, the checkpoint's wins
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert torch.equal(
        _embedding_group(resumed)["cpt_row_scale"], _embedding_group(optimizer)["cpt_row_scale"]
    )
    step(resumed)
    for got, want in zip([p for p in model.parameters() if p.requires_grad], expected, strict=True):
        assert torch.equal(got, want)


def test_trainer_resume_is_bit_identical_with_bf16_rows_rounded_stochastically(tmp_path):
    """HF Trainer, bf16 model, the default bfloat16_sr: stopping at step 3 and resuming gives the same
    weights, bit for bit, as the uninterrupted run; the log's embedding LR is the known rows' LR."""
    from transformers import Trainer

    from cpt_plugin import CPTCallback
    from cpt_plugin.integrations.hf import uninstall_trainer_hooks
    from tests.tiny import RandomBlocks, training_args

    def run(resume: str | None = None) -> Trainer:
        base = tiny_llama(tied=True, seed=1).to(torch.bfloat16)
        mark_fresh_rows(base, FRESH)  # as extension or healing would, in the same script on resume
        trainer = Trainer(
            model=base,
            args=training_args(tmp_path, max_steps=6, save_steps=3, save_strategy="steps"),
            train_dataset=RandomBlocks(seed=3),
            callbacks=[CPTCallback(lora_r=4)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    try:
        full = run()
        resumed = run(resume=str(tmp_path / "out" / "checkpoint-3"))
    finally:
        uninstall_trainer_hooks()
    group = _embedding_group(full.optimizer.optimizer)
    assert isinstance(full.optimizer.optimizer, CPTAdamW) and group["cpt_stochastic_rounding"]
    assert group["params"][0].dtype == torch.bfloat16
    logged = [h for h in full.state.log_history if "embedding_learning_rate" in h]
    assert logged[0]["embedding_learning_rate"] == pytest.approx(logged[0]["learning_rate"] / 10)
    final = [p.detach() for p in full.model.parameters() if p.requires_grad]
    again = [p.detach() for p in resumed.model.parameters() if p.requires_grad]
    for a, b in zip(final, again, strict=True):
        assert torch.equal(a, b)


def test_a_shard_split_by_columns_has_no_row_offset_and_says_so():
    from cpt_plugin.optim import _row_offset

    class ColumnShard(torch.Tensor):
        placements = ()
        device_mesh = None

        def to_local(self):
            return self

    from torch.distributed.tensor import Shard

    shard = torch.zeros(4, 2).as_subclass(ColumnShard)
    ColumnShard.placements = (Shard(1),)
    with pytest.raises(CPTConfigError, match=r"not by rows \(Shard\(0\)"):
        _row_offset(shard)


@pytest.mark.slow
def test_fsdp2_row_shards_take_their_own_rows_factors(tmp_path):
    """Two gloo ranks holding Shard(0) DTensor slices (4 + 3 rows): the sharded step equals the unsharded one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from tests.vocabulary import shards

    out = str(tmp_path / "sharded.pt")
    mp.start_processes(shards.worker, args=(port, out), nprocs=shards.WORLD, start_method="spawn", join=True)
    sharded = torch.load(out, weights_only=True)
    assert sharded["offset"] == 4 and sharded["local_rows"] == 3
    weight, grads, scale = shards.case()
    param = torch.nn.Parameter(weight.clone())
    shards.two_steps(param, grads, lambda g: g.clone(), scale)
    assert torch.equal(sharded["weight"], param.detach())


def test_under_deepspeed_every_row_keeps_the_embedding_lr_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what TrainingArguments(deepspeed=...) sets
    model, config = _prepared(tied=True)
    with caplog.at_level(logging.WARNING, logger="cpt_plugin"):
        optimizer = create_optimizer(model, config, learning_rate=LR)
    group = _embedding_group(optimizer)
    assert group["lr"] == pytest.approx(KNOWN_LR) and "cpt_row_scale" not in group
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "DeepSpeed ZeRO flattens the embeddings" in warned[0]
    assert "row_aware_embedding_lr: false" in warned[0]


@pytest.mark.gpu
def test_per_row_lr_step_time_on_llama_1b_embedding_shapes():
    """128256 x 2048 (Llama-3.2-1B, tied): the bf16 SR kernel with per-row factors costs about what it
    costs without them; the fp32 per-row path (chunked torch) is timed against torch's fused AdamW."""
    import time

    rows, width = 128256, 2048
    scale = torch.full((rows,), 0.1, device="cuda")
    scale[:1024] = 1.0
    hyper = dict(step=1, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def timed(step, repeat: int = 10) -> float:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeat

    w = (0.02 * torch.randn(rows, width, device="cuda")).bfloat16()
    g, m, v = torch.randn_like(w), torch.zeros_like(w), torch.zeros_like(w)
    plain = timed(lambda: sr.adamw_bf16_sr_fused_(w, g, m, v, **hyper, seed=1))
    per_row = timed(lambda: sr.adamw_bf16_sr_fused_(w, g, m, v, **hyper, seed=1, row_scale=scale))
    w32 = w.float().requires_grad_()
    w32.grad = g.float()
    fused = torch.optim.AdamW([w32], lr=1e-4, weight_decay=0.01, fused=True)
    torch_fused = timed(fused.step)
    m32, v32 = torch.zeros_like(w32), torch.zeros_like(w32)
    chunked = timed(
        lambda: sr.adamw_step_(w32.data, w32.grad, m32, v32, **hyper, generator=None, row_scale=scale)
    )
    print(
        f"bf16 SR kernel {plain * 1e3:.2f} ms, with per-row factors {per_row * 1e3:.2f} ms; "
        f"fp32 torch fused AdamW {torch_fused * 1e3:.2f} ms, fp32 per-row chunked {chunked * 1e3:.2f} ms"
    )
    assert per_row <= 1.3 * plain + 2e-4


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_rows_fresh_trains_only_the_marked_rows_without_full_copies(tied):
    """``embedding_rows: fresh``: PEFT's trainable tokens on the marked rows (no vocab x hidden copies), at
    the fresh-row LR; one step moves those rows of the effective embedding (and lm_head) and no other, and
    the merged weights carry them."""
    import warnings

    from cpt_plugin.export.merging import merged_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, config = _prepared(tied, embedding_rows="fresh", heal_untrained_tokens=False)
    assert not [w for w in caught if "ensure_weight_tying" in str(w.message)]  # no line that looks wrong
    assert type(model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"  # tied: PEFT ties it
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any("modules_to_save" in n for n in trained)
    deltas = [p for n, p in trained.items() if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2) and all(p.shape == (len(FRESH), 32) for p in deltas)
    optimizer = create_optimizer(model, config, learning_rate=LR, weight_decay=0.0)
    group = _embedding_group(optimizer)
    assert group["lr"] == LR and "cpt_row_scale" not in group
    assert {id(p) for p in group["params"]} == {id(p) for p in deltas}
    before = merged_state_dict(model, torch.float32)
    ids = torch.tensor([[3, 10, 200, 7, 3, 9, 10, 11]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after = merged_state_dict(model, torch.float32)
    fresh = _fresh_mask(257)
    for key in ("model.embed_tokens.weight", *(() if tied else ("lm_head.weight",))):
        moved = (after[key] - before[key]).abs().amax(dim=1) > 0
        assert moved[fresh].all() and not moved[~fresh].any(), key


def test_embedding_rows_fresh_without_marked_rows_or_with_domain_shift_is_an_error():
    base = tiny_llama()
    with pytest.raises(CPTConfigError, match="embedding_rows' is 'fresh'.*none are marked"):
        prepare_model(base, CPTConfig(lora_r=4, embedding_rows="fresh", heal_untrained_tokens=False))
    with pytest.raises(CPTConfigError, match="embedding_rows.*domain_shift_ratio"):
        CPTConfig(embedding_rows="fresh", domain_shift_ratio=4.0)
    with pytest.raises(CPTConfigError, match="Did you mean 'fresh'"):
        CPTConfig(embedding_rows="frsh")
    with pytest.raises(CPTConfigError, match="train_embeddings"):
        CPTConfig(embedding_rows="fresh", train_embeddings=False)
