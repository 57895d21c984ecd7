"""CPU tests of the GPU benchmark harness (benchmarks/): arguments, FLOPs, search, reports, workers."""

from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import report, run
from benchmarks.flops import flops_per_token, mfu
from benchmarks.search import memory_slope_kib_per_token, search_max_context
from benchmarks.workloads import WORKLOADS, resolve_workload

# -- arguments -------------------------------------------------------------------------------------


def test_parse_shapes_and_suite_defaults(tmp_path):
    assert run.parse_shapes("4x2048, 1X16384") == ((4, 2048), (1, 16384))
    with pytest.raises(Exception, match="bad shape"):
        run.parse_shapes("4by2048")
    args = run.resolve_args(["--suite", "quick", "--out", str(tmp_path)])
    assert args.systems == ["hf", "liger", "unsloth", "unsloth_nogc", "cpt_nogc", "cpt", "cpt_offload"]
    assert args.workloads == ["llama-1b"] and args.shapes == ((4, 2048),)
    assert args.maxctx_workloads == ["llama-1b"] and args.warmup >= 3 and args.steps >= 10
    full = run.resolve_args(
        ["--suite", "full", "--systems", "hf,cpt", "--workloads", "qwen3-0.6b,mistral-7b"]
    )
    assert (
        full.systems == ["hf", "cpt"]
        and (1, 16384) in full.shapes
        and full.maxctx_workloads == ["mistral-7b"]
    )
    cpu = run.resolve_args(["--device", "cpu"])
    assert max(s for _, s in cpu.shapes) <= 256 and cpu.maxctx_cap <= 1024
    assert resolve_workload("llama-1b", "cpu").hidden_size == 64


def test_bad_system_name_is_an_argument_error():
    with pytest.raises(SystemExit):
        run.resolve_args(["--systems", "hf,unslot"])


@pytest.mark.parametrize(
    "name, total, non_embedding, tied",
    [
        ("llama-1b", 1_235_814_400, 973_146_112, True),  # Llama-3.2-1B's safetensors: 1.24B
        ("qwen3-0.6b", 596_049_920, 440_467_456, True),  # Qwen3-0.6B's card: 0.6B, 0.44B non-embedding
        ("mistral-7b", 7_248_023_552, 7_113_805_824, False),  # Mistral-7B-v0.3's safetensors: 7.25B
    ],
)
def test_workload_builds_the_published_model(name, total, non_embedding, tied):
    """The model built from the workload's config (on the meta device) has the real model's parameters."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(WORKLOADS[name].make_config())
    embedding = model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == total
    assert total - embedding.numel() == non_embedding
    assert (model.get_output_embeddings().weight is embedding) == tied


# -- FLOPs -----------------------------------------------------------------------------------------


def test_flops_formula_llama_1b():
    f = flops_per_token(WORKLOADS["llama-1b"], 2048)
    assert f.forward == pytest.approx(2.786e9, rel=1e-3)  # ANCHORS: forward 2.8
    assert f.total == pytest.approx(6.41e9, rel=1e-2)  # ANCHORS: ~6.3 (backward counted slightly differently)
    # The attention term is linear in seq per token: 2 * seq * heads * head_dim * layers forward, 3x in total.
    longer = flops_per_token(WORKLOADS["llama-1b"], 4096)
    assert longer.total - f.total == pytest.approx(3 * 2 * 2048 * 32 * 64 * 16)
    assert mfu(WORKLOADS["llama-1b"], 2048, 31684.0, 790e12) == pytest.approx(f.total * 31684 / 790e12)
    assert math.isnan(mfu(WORKLOADS["llama-1b"], 2048, 1.0, 0.0))


# -- max-context search ----------------------------------------------------------------------------


def _threshold_probe(limit: int, calls: list[int], status_over: str = "oom"):
    def probe(seq: int, timeout: float) -> dict:
        calls.append(seq)
        return {"status": "ok" if seq <= limit else status_over, "peak_allocated_gib": 1.0 + seq / 1000}

    return probe


@pytest.mark.parametrize("limit", [8192, 20000, 73728, 100001, 131071])
def test_search_brackets_the_limit(limit):
    calls: list[int] = []
    res = search_max_context(_threshold_probe(limit, calls), start=8192, cap=262144, granularity=4096)
    assert res.status == "exact"
    assert res.max_ok <= limit < res.min_fail and res.min_fail - res.max_ok <= 4096
    assert res.max_ok % 4096 == 0 and len(calls) == len(set(calls)) == len(res.probes)


def test_search_cap_start_failure_budget_and_unavailable():
    res = search_max_context(_threshold_probe(10**9, []), start=8192, cap=100000, granularity=4096)
    assert res.status == "cap" and res.max_ok == 100000 and res.min_fail is None
    assert [p["seq"] for p in res.probes] == [8192, 16384, 32768, 65536, 100000]
    res = search_max_context(_threshold_probe(5000, []), start=8192, cap=262144, granularity=1024)
    assert res.max_ok == 4096 and res.min_fail == 5120
    res = search_max_context(_threshold_probe(-1, []), start=8192, cap=262144, granularity=4096)
    assert res.status == "no_ok" and res.max_ok is None
    now = [0.0]

    def slow_probe(seq, timeout):
        now[0] += 30.0
        assert timeout <= 95.0
        return {"status": "ok"}

    res = search_max_context(slow_probe, 8192, 10**7, 4096, budget_s=95.0, clock=lambda: now[0])
    assert res.status == "budget" and res.max_ok == 32768 and len(res.probes) == 3
    res = search_max_context(lambda s, t: {"status": "unavailable"}, 8192, 262144, 4096)
    assert res.status == "unavailable" and len(res.probes) == 1
    res = search_max_context(lambda s, t: {"status": "ok" if s < 20000 else "budget"}, 8192, 262144, 4096)
    assert res.status == "budget" and res.max_ok == 16384 and res.min_fail is None


def test_memory_slope():
    points = [(16384, 10.0), (32768, 10.0 + 16384 * 100 / 2**20), (65536, 10.0 + 49152 * 100 / 2**20)]
    assert memory_slope_kib_per_token(points) == pytest.approx(100.0)
    assert memory_slope_kib_per_token(points[:1]) is None
    assert memory_slope_kib_per_token([(8192, 1.0), *points], min_seq=16384) == pytest.approx(100.0)


# -- the harness with a fake worker ----------------------------------------------------------------


def _fake_worker(job: dict, timeout: float, root: str | None = None) -> dict:
    if job["mode"] == "matmul":
        return {
            "status": "ok",
            "matmul_tflops": 800.0,
            "matmul_n": 8192,
            "environment": {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "date": "2026-11-26"},
        }
    if job["system"] == "cpt":
        return {"status": "unavailable", "error": "prepare_model: ImportError: nope"}
    limit = {"hf": 40000, "liger": 300000}[job["system"]]
    if job["mode"] == "probe":
        ok = job["seq"] <= limit
        return {"status": "ok" if ok else "oom", "peak_allocated_gib": 5 + job["seq"] * 200 / 2**20}
    speed = {"hf": 30000.0, "liger": 36000.0}[job["system"]]
    return {
        "status": "ok",
        "tokens_per_s": speed,
        "peak_allocated_gib": 20.0 if job["system"] == "hf" else 8.5,
        "peak_reserved_gib": 22.0,
        "losses": [12.16, 11.9, 11.5],
        "info": {"trainable_params": 615_500_000},
    }


def test_harness_flow_with_fake_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "run_worker", _fake_worker)
    argv = ["--suite", "quick", "--systems", "hf,liger,cpt", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["system"]: r for r in data["train"]}
    assert rows["cpt"]["status"] == "unavailable" and "ImportError" in rows["cpt"]["error"]
    assert rows["hf"]["mfu"] == pytest.approx(
        flops_per_token(WORKLOADS["llama-1b"], 2048).total * 30000 / 800e12
    )
    ctx = {r["system"]: r for r in data["maxctx"]}
    assert ctx["hf"]["max_ok"] <= 40000 < ctx["hf"]["min_fail"] and ctx["hf"]["status"] == "exact"
    assert ctx["liger"]["status"] == "cap" and ctx["liger"]["max_ok"] == 131072
    assert ctx["liger"]["kib_per_token"] == pytest.approx(200.0)
    assert ctx["cpt"]["status"] == "unavailable" and ctx["cpt"]["probes"] == []
    md = (tmp_path / "report.md").read_text()
    assert "1.20x" in md and "0.42x" in md and "NVIDIA H100" in md and "unavailable" in md


def test_a_system_from_another_checkout_runs_there_in_the_same_run(tmp_path, monkeypatch):
    """``--tree old=PATH`` and ``hf@old``: that row's worker runs from PATH (cwd and PYTHONPATH), keeps
    its name in the results, and stays out of the max-context search; bad names say how to fix them."""
    old = tmp_path / "old"
    (old / "benchmarks").mkdir(parents=True)
    (old / "benchmarks" / "worker.py").write_text("")
    roots = []

    def worker(job, timeout, root=None):
        roots.append((job["mode"], job.get("system"), root))
        return _fake_worker(job, timeout)

    monkeypatch.setattr(run, "run_worker", worker)
    out = tmp_path / "out"
    argv = ["--suite", "quick", "--systems", "hf,hf@old", "--tree", f"old={old}", "--out", str(out)]
    assert run.main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in data["train"]] == ["hf", "hf@old"]
    assert data["meta"]["trees"] == {"old": str(old.resolve())}
    assert ("train", "hf", None) in roots and ("train", "hf", str(old.resolve())) in roots
    assert {r["system"] for r in data["maxctx"]} == {"hf"}
    env = run.child_env("cpu", str(old))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(old)
    with pytest.raises(SystemExit):
        run.resolve_args(["--systems", "hf@new", "--tree", f"old={old}"])
    with pytest.raises(SystemExit):
        run.resolve_args(["--systems", "hf", "--tree", f"old={tmp_path}"])  # no benchmarks/worker.py


# -- report ----------------------------------------------------------------------------------------


def _fake_results(tmp_path):
    results = {
        "meta": {
            "suite": "quick",
            "device": "cuda",
            "command": "python -m benchmarks.run --suite quick",
            "warmup": 3,
            "steps": 10,
            "seed": 0,
            "precision": "bf16",
            "allocator": "expandable",
        },
        "hardware": {
            "status": "ok",
            "matmul_tflops": 790.0,
            "matmul_n": 8192,
            "environment": {
                "card": "NVIDIA H200",
                "card_memory_gib": 139.8,
                "torch": "2.11.0+cu130",
                "transformers": "5.17.0",
                "date": "2026-11-26T00:00:00+00:00",
            },
        },
        "train": [
            {
                "system": "hf",
                "workload": "llama-1b",
                "batch": 4,
                "seq": 2048,
                "status": "ok",
                "tokens_per_s": 31684.0,
                "peak_allocated_gib": 20.6,
                "peak_reserved_gib": 22.0,
                "mfu": 0.257,
                "losses": [12.164, 11.5, 10.885],
            },
            {
                "system": "liger",
                "workload": "llama-1b",
                "batch": 4,
                "seq": 2048,
                "status": "ok",
                "tokens_per_s": 37956.0,
                "peak_allocated_gib": 8.5,
                "peak_reserved_gib": 9.0,
                "mfu": 0.31,
                "losses": [12.164, 11.51, 10.886],
            },
            {
                "system": "cpt",
                "workload": "llama-1b",
                "batch": 4,
                "seq": 2048,
                "status": "oom",
                "error": "CUDA OOM",
            },
        ],
        "maxctx": [
            {
                "system": "hf",
                "workload": "llama-1b",
                "status": "exact",
                "max_ok": 73728,
                "min_fail": 77824,
                "granularity": 4096,
                "cap": 262144,
                "kib_per_token": 1843.0,
                "reserved_kib_per_token": 1900.0,
                "probes": [
                    {"seq": 65536, "status": "ok", "peak_allocated_gib": 115.0, "peak_reserved_gib": 118.0},
                    {"seq": 73728, "status": "ok", "peak_allocated_gib": 129.0, "peak_reserved_gib": 131.0},
                    {"seq": 77824, "status": "oom"},
                ],
            },
        ],
    }
    kernels = {
        "device": "cuda",
        "copy_gbps": 4275.0,
        "matmul_tflops": 790.0,
        "rows": [
            {
                "op": "swiglu",
                "impl": "eager",
                "shape": "8192×14336",
                "status": "ok",
                "ms": 0.78,
                "gbps": 2400.0,
                "pct_copy": 56.0,
                "rel_err": 2e-3,
                "extra_peak_gib": 0.2,
            },
            {
                "op": "swiglu",
                "impl": "liger",
                "shape": "8192×14336",
                "status": "ok",
                "ms": 0.45,
                "gbps": 4180.0,
                "pct_copy": 98.0,
                "rel_err": 2e-3,
                "extra_peak_gib": 0.0,
            },
            {"op": "swiglu", "impl": "cpt", "status": "unavailable", "error": "ImportError: x"},
        ],
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "kernels.json").write_text(json.dumps(kernels))


def test_report_tables_docs_and_summary(tmp_path):
    _fake_results(tmp_path)
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nintro text\n")
    md = report.write_report(tmp_path, docs)
    assert "| llama-1b | 4 × 2048 | liger | 37,956 | 1.20x | – | 31.0% | 8.50 | 0.41x | – |" in md
    assert "73,728" in md and "77,824 (oom)" in md and "1843" in md
    assert "12.164 11.510 10.886 | 0.0100" in md
    assert "| swiglu (8192×14336) | liger | 0.450 | 1.73x |" in md and "unavailable: ImportError" in md
    assert "NVIDIA H200" in md and "790.0 TFLOP/s" in md and "6.41 GFLOP/token" in md
    report.write_report(tmp_path, docs)  # a rerun replaces its block instead of appending
    text = docs.read_text()
    assert (
        text.startswith("# Benchmarks\n\nintro text") and text.count("<!-- results:quick-cuda:start -->") == 1
    )
    pytest.importorskip("matplotlib")
    assert (tmp_path / "training.png").stat().st_size > 1000 and (
        tmp_path / "maxctx.png"
    ).stat().st_size > 1000
    summary = report.summary(report.load(tmp_path))
    assert "SUMMARY" in summary and "37,956 tok/s (1.20x)" in summary and "maxctx llama-1b hf" in summary


def test_memory_slope_table_and_plot_from_batch1_rows(tmp_path):
    def row(system, seq, peak, tps):
        return {
            "system": system,
            "workload": "llama-1b",
            "batch": 1,
            "seq": seq,
            "status": "ok",
            "tokens_per_s": tps,
            "peak_allocated_gib": peak,
        }

    gib_per_16k_at = {"hf": 1024.0, "cpt_offload": 64.0}  # KiB/token
    rows = []
    for system, kib in gib_per_16k_at.items():
        for seq in (16384, 32768):
            rows.append(row(system, seq, 5.0 + seq * kib / 2**20, 20000.0 if system == "hf" else 22000.0))
    rows.append(row("trl_offload", 16384, 9.0, 15000.0))  # one length only: no slope row
    data = {"meta": {"suite": "full", "device": "cuda"}, "train": rows}
    table = "\n".join(report.slope_table(data))
    assert "| llama-1b | hf | 1024 | 1.00x |" in table
    assert "| llama-1b | cpt_offload | 64 | 0.06x |" in table and "22,000 (1.10x)" in table
    assert "trl_offload" not in table
    assert report.plot_memory_vs_length(data, tmp_path / "mem.png") == (report._pyplot() is not None)


def test_qlora_workload_recipe():
    qlora = WORKLOADS["mistral-7b-qlora"]
    assert qlora.recipe.quantize_4bit and qlora.recipe.lora_r == 32 and not qlora.recipe.train_embeddings
    assert qlora.recipe.optimizer == "adamw_8bit" and WORKLOADS["llama-1b"].recipe.train_embeddings
    assert resolve_workload("mistral-7b-qlora", "cpu").name == "tiny-mistral-qlora"
    assert qlora.make_config().hidden_size == 4096 and "recipe_name" not in qlora.config_kwargs()


def test_quantize_decoder_linears_4bit_keeps_the_model_close():
    """NF4 replaces every decoder linear (not lm_head); the logits stay close to the 16-bit model's."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from benchmarks.systems import _build_model, quantize_decoder_linears_4bit

    workload = WORKLOADS["tiny-mistral"]
    model = _build_model(workload, "cpu", torch.float32, seed=0)
    ids = torch.randint(0, workload.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        count = quantize_decoder_linears_4bit(model)
        after = model(input_ids=ids).logits
    assert count == 7 * workload.num_hidden_layers and model.is_loaded_in_4bit
    assert isinstance(model.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    # NF4 noise (4 bits per weight), not garbage: the logits keep their direction
    cosine = torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0)
    assert cosine > 0.95, cosine


def test_qlora_workers_agree_and_use_8bit_adam_on_cpu():
    """HF + PEFT QLoRA and cpt-plugin on the same NF4 model: same trainable set, same losses."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.worker import run_train

    args = {"mode": "train", "workload": "mistral-7b-qlora", "batch": 1, "seq": 24, "device": "cpu"}
    args.update(warmup=1, steps=1, seed=0)
    hf = run_train({**args, "system": "hf"})
    cpt = run_train({**args, "system": "cpt_offload"})
    assert hf["status"] == "ok" and cpt["status"] == "ok", (hf, cpt)
    for res, optimizer in (
        (hf, "AdamW8bit"),
        (cpt, "BatchedAdamW8bit"),
    ):  # ours: bitsandbytes' stepped per group
        assert res["workload_built"] == "tiny-mistral-qlora"
        assert res["info"]["optimizer"] == optimizer and res["info"]["param_group_lrs"] == [5e-5]
    assert hf["info"]["trainable_params"] == cpt["info"]["trainable_params"]
    assert hf["losses"] == pytest.approx(cpt["losses"], abs=1e-3)


def test_offload_competitors_are_unavailable_on_cpu():
    from benchmarks.worker import run_train

    for system in ("hf_offload", "trl_offload", "axolotl_offload"):
        res = run_train(
            {"mode": "train", "system": system, "workload": "llama-1b", "batch": 1, "seq": 8, "device": "cpu"}
        )
        assert res["status"] == "unavailable" and "CUDA" in res["error"], res


# -- real workers on the CPU (tiny models) ---------------------------------------------------------


def test_worker_trains_tiny_llama_hf_on_cpu():
    from benchmarks.worker import run_train

    args = {
        "mode": "train",
        "system": "hf",
        "workload": "llama-1b",
        "batch": 2,
        "seq": 16,
        "device": "cpu",
        "warmup": 1,
        "steps": 1,
        "seed": 0,
    }
    first = run_train(args)
    assert first["status"] == "ok", first
    assert first["workload_built"] == "tiny-llama" and len(first["losses"]) == 2
    assert all(math.isfinite(x) for x in first["losses"]) and first["tokens_per_s"] > 0
    assert first["info"]["param_group_lrs"] == [5e-5, 5e-6]
    assert "torch.float32" in first["info"]["trainable_dtypes"]  # LoRA kept as PEFT makes it
    again = run_train({**args, "mode": "probe"})
    assert again["status"] == "ok" and len(again["losses"]) == 1
    assert again["losses"][0] == pytest.approx(first["losses"][0], abs=1e-6)  # same weights, same data


def test_run_worker_records_failures_in_a_subprocess():
    bad = run.run_worker(
        {"mode": "train", "system": "nope", "workload": "llama-1b", "batch": 1, "seq": 8, "device": "cpu"},
        timeout=120,
    )
    assert bad["status"] == "error" and "unknown system" in bad["error"]
    slow = run.run_worker({"mode": "matmul", "device": "cpu"}, timeout=0.01)
    assert slow["status"] == "timeout"


def test_kernel_bench_rows_on_cpu():
    from benchmarks.kernels import bench_one

    row = bench_one("swiglu", "eager", "cpu", copy_rate=1.0, matmul_rate=None)
    assert row["status"] == "ok" and row["rel_err"] < 1e-2 and row["bytes"] == 8 * 33 * 96 * 2
    row = bench_one("flce", "eager", "cpu", copy_rate=None, matmul_rate=1.0)
    assert row["status"] == "ok" and row["tflops"] > 0 and row["rel_err"] < 1e-2
    row = bench_one("flce", "cpt@1", "cpu", copy_rate=None, matmul_rate=1.0)  # a 1 MiB chunk budget
    assert row["status"] == "ok" and row["rel_err"] < 1e-2 and row["extra_analytic_gib"] > 0
    assert bench_one("swiglu", "cpt@1", "cpu", None, None)["status"] == "error"


# -- on the GPU machine ----------------------------------------------------------------------------


@pytest.mark.gpu
def test_worker_trains_tiny_llama_hf_on_gpu():
    from benchmarks.worker import run_train

    res = run_train(
        {
            "mode": "train",
            "system": "hf",
            "workload": "tiny-llama",
            "batch": 2,
            "seq": 64,
            "device": "cuda",
            "warmup": 1,
            "steps": 2,
        }
    )
    assert res["status"] == "ok", res
    assert res["peak_allocated_gib"] > 0 and all(math.isfinite(x) for x in res["losses"])


@pytest.mark.gpu
def test_kernel_bench_eager_on_gpu():
    from benchmarks.kernels import bench_one

    row = bench_one("rms_norm", "eager", "cuda", copy_rate=1000.0, matmul_rate=None)
    assert row["status"] == "ok" and row["rel_err"] < 2e-2 and row["extra_peak_gib"] is not None


@pytest.mark.gpu
def test_qlora_workers_agree_on_gpu():
    """The NF4 workload with real Triton kernels, fused loss and offloading: same losses as HF + PEFT."""
    pytest.importorskip("bitsandbytes")
    from benchmarks.worker import run_train

    args = {"mode": "train", "workload": "tiny-mistral-qlora", "batch": 2, "seq": 96, "device": "cuda"}
    args.update(warmup=1, steps=2, seed=0)
    hf = run_train({**args, "system": "hf"})
    cpt = run_train({**args, "system": "cpt_offload"})
    assert hf["status"] == "ok" and cpt["status"] == "ok", (hf, cpt)
    assert hf["losses"] == pytest.approx(cpt["losses"], abs=2e-2)


def test_memory_trace_finds_the_blocks_alive_at_the_peak() -> None:
    from benchmarks.memory_trace import frame_key, group_blocks, live_at_peak

    frames_a = [
        {"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
        {"filename": "/x/cpt_plugin/kernels/rope.py", "line": 144, "name": "_out_like"},
        {"filename": "/x/transformers/models/mistral/modeling_mistral.py", "line": 9, "name": "forward"},
    ]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames_a},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames_a},
        {"action": "alloc", "addr": 3, "size": 30, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},  # 140 < the peak of 180
        {"action": "free_requested", "addr": 99, "size": 7},  # allocated before the trace: ignored
    ]
    peak, blocks = live_at_peak(events)
    assert peak == 180 and {b["addr"] for b in blocks} == {1, 2, 3}
    assert frame_key(frames_a) == "kernels/rope.py:144 _out_like < mistral/modeling_mistral.py:9 forward"
    assert group_blocks(blocks) == [(frame_key(frames_a), 150, 2), ("(no python frame)", 30, 1)]


# -- Unsloth as a system (CPU: the harness side, with a stand-in for the unsloth module) ------------


def test_benchmark_modules_do_not_import_transformers():
    """The worker must be able to import unsloth before transformers: nothing imported earlier may."""
    import subprocess
    import sys

    code = (
        "import sys, benchmarks.worker, benchmarks.systems, benchmarks.unsloth_system, benchmarks.run, "
        "benchmarks.report; print(sorted(m for m in ('transformers', 'peft', 'trl') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unsloth_is_unavailable_without_unsloth(monkeypatch):
    import sys

    from benchmarks import unsloth_system
    from benchmarks.worker import run_train

    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` raises ImportError
    monkeypatch.setattr(unsloth_system, "_import_error", None)
    res = run_train(
        {
            "mode": "train",
            "system": "unsloth_nogc",
            "workload": "llama-1b",
            "batch": 1,
            "seq": 8,
            "device": "cpu",
        }
    )
    assert res["status"] == "unavailable" and "unsloth not importable" in res["error"], res


def _fake_unsloth(calls: list):
    """A stand-in for the unsloth module: loads the saved folder with transformers, LoRA with PEFT (the
    embeddings as full copies, as Unsloth does with them in target_modules), and records the arguments."""
    import types

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            calls.append(("from_pretrained", kwargs))
            model = AutoModelForCausalLM.from_pretrained(kwargs["model_name"], dtype=kwargs["dtype"])
            return model, AutoTokenizer.from_pretrained(kwargs["model_name"])

        @staticmethod
        def get_peft_model(model, **kwargs):
            from peft import LoraConfig, get_peft_model

            calls.append(("get_peft_model", kwargs))
            embeddings = [m for m in kwargs["target_modules"] if m in ("embed_tokens", "lm_head")]
            config = LoraConfig(
                r=kwargs["r"],
                lora_alpha=kwargs["lora_alpha"],
                lora_dropout=kwargs["lora_dropout"],
                use_rslora=kwargs["use_rslora"],
                target_modules=[m for m in kwargs["target_modules"] if m not in embeddings],
                modules_to_save=embeddings or None,
                task_type="CAUSAL_LM",
            )
            return get_peft_model(model, config)

        @staticmethod
        def for_training(model):
            calls.append(("for_training", {}))
            model.train()

    module = types.ModuleType("unsloth")
    module.FastLanguageModel = FastLanguageModel
    return module


def test_unsloth_system_with_a_fake_module(tmp_path, monkeypatch):
    """Same saved model, Unsloth's documented arguments, deterministic LoRA init: HF's loss curve."""
    import sys

    import torch

    from benchmarks import unsloth_system
    from benchmarks.worker import run_train

    calls: list = []
    monkeypatch.setitem(sys.modules, "unsloth", _fake_unsloth(calls))
    monkeypatch.setattr(unsloth_system, "_import_error", None)
    monkeypatch.setattr(unsloth_system, "CACHE_ROOT", tmp_path)
    args = {"mode": "train", "workload": "llama-1b", "batch": 2, "seq": 16, "device": "cpu"}
    args.update(warmup=1, steps=1, seed=0)
    res = run_train({**args, "system": "unsloth"})
    hf = run_train({**args, "system": "hf"})
    assert res["status"] == "ok" and hf["status"] == "ok", (res, hf)
    saved = tmp_path / "tiny-llama-seed0"
    assert (saved / "model.safetensors").exists() and (saved / unsloth_system.COMPLETE).exists()
    assert (saved / "tokenizer.json").exists()
    load, peft_args = calls[0][1], calls[1][1]
    assert load == dict(model_name=str(saved), max_seq_length=16, dtype=torch.bfloat16, load_in_4bit=False)
    assert peft_args == dict(
        r=128,
        lora_alpha=32.0,
        lora_dropout=0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "embed_tokens",
            "lm_head",
        ],
        use_gradient_checkpointing="unsloth",
        use_rslora=True,
    )
    assert calls[2][0] == "for_training"
    assert res["info"]["param_group_lrs"] == hf["info"]["param_group_lrs"] == [5e-5, 5e-6]
    assert res["info"]["unsloth_args"]["use_gradient_checkpointing"] == "unsloth"
    assert res["losses"] == pytest.approx(hf["losses"], abs=1e-5)
    # A second Unsloth system of the same call reuses the saved folder.
    stamp = (saved / "model.safetensors").stat().st_mtime_ns
    again = run_train({**args, "system": "unsloth_nogc", "mode": "probe"})
    assert again["status"] == "ok" and calls[-2][1]["use_gradient_checkpointing"] is False
    assert (saved / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["losses"][0] == pytest.approx(res["losses"][0], abs=1e-5)


def test_unsloth_qlora_arguments():
    from benchmarks.unsloth_system import load_kwargs, peft_kwargs

    workload = WORKLOADS["tiny-mistral-qlora"]
    assert load_kwargs(workload, run.Path("/x"), 8192)["load_in_4bit"] is True
    lora = peft_kwargs("unsloth_nogc", workload)
    assert (
        lora["r"] == 32 and "embed_tokens" not in lora["target_modules"] and len(lora["target_modules"]) == 7
    )
    assert lora["use_gradient_checkpointing"] is False


def test_report_compares_cpt_rows_with_the_unsloth_row_of_their_checkpointing(tmp_path):
    def row(system, tps, peak, mode=None):
        info = {"cpt_config": {"gradient_checkpointing": mode}} if mode else {}
        return {
            "system": system,
            "workload": "llama-1b",
            "batch": 4,
            "seq": 2048,
            "status": "ok",
            "tokens_per_s": tps,
            "peak_allocated_gib": peak,
            "losses": [12.0, 11.0],
            "info": info,
        }

    rows = [
        row("hf", 30000.0, 20.0),
        row("unsloth", 40000.0, 6.0),
        row("unsloth_nogc", 60000.0, 14.0),
        row("cpt_nogc", 72000.0, 14.0, "off"),
        row("cpt_offload", 48000.0, 6.3, "offload"),
    ]
    data = {"meta": {"suite": "quick", "device": "cuda"}, "train": rows}
    table = "\n".join(report.train_table(data))
    assert "| cpt_nogc | 72,000 | 2.40x | 1.20x (unsloth_nogc) |" in table
    assert "| cpt_offload | 48,000 | 1.60x | 1.20x (unsloth) |" in table and "1.05x (unsloth)" in table
    assert "| unsloth | 40,000 | 1.33x | – |" in table
    text = report.summary(data)
    assert "vs unsloth_nogc 1.20x tok/s, 1.00x peak" in text and "vs unsloth 1.20x tok/s, 1.05x peak" in text


def test_cpt_nogc_trains_without_checkpointing():
    from benchmarks.systems import build_system
    from benchmarks.worker import run_train

    built = build_system("cpt_nogc", resolve_workload("llama-1b", "cpu"), "cpu")
    flags = {m.gradient_checkpointing for m in built.model.modules() if hasattr(m, "gradient_checkpointing")}
    assert flags == {False} and built.info["cpt_config"]["gradient_checkpointing"] == "off"
    args = {"mode": "train", "workload": "llama-1b", "batch": 2, "seq": 16, "device": "cpu"}
    res = run_train({**args, "warmup": 1, "steps": 1, "system": "cpt_nogc"})
    assert res["status"] == "ok" and all(math.isfinite(x) for x in res["losses"]), res


def test_profile_step_writes_the_kernel_table_and_copy_counts(tmp_path):
    from benchmarks.profile_step import run_profile

    args = {
        "system": "hf",
        "workload": "llama-1b",
        "batch": 1,
        "seq": 16,
        "device": "cpu",
        "out": str(tmp_path),
    }
    res = run_profile({**args, "warmup": 1, "steps": 1})
    assert res["status"] == "ok", res
    copies = json.loads((tmp_path / "hf_profile.json").read_text())["copy_ops"]
    assert set(copies) == {"aten::copy_", "aten::to", "aten::_to_copy"}
    assert copies["aten::to"]["count_per_step"] > 0  # autocast casts, even on the CPU
    text = (tmp_path / "hf_profile.txt").read_text()
    assert "Top 30 GPU kernels" in text and "aten::_to_copy" in text and "ms/step on the host" in text
    host = json.loads((tmp_path / "hf_profile.json").read_text())["host"]
    assert 0 < host["host_ms_per_step"] <= host["wall_ms_per_step"]  # host-bound or not, measured
    assert host["syncs_per_step"] == 0 and "host vs device" in text  # sync counting is CUDA-only
    phases = json.loads((tmp_path / "hf_profile.json").read_text())["phases"]
    assert set(phases) == {"forward", "backward", "optimizer"} and "## phases" in text
    assert all(0 < p["host_ms"] <= p["wall_ms"] for p in phases.values())
    hotspots = (tmp_path / "hf_python.txt").read_text()
    assert "thread" in hotspots and "tottime" in hotspots
    gemms = json.loads((tmp_path / "hf_profile.json").read_text())["gemms"]
    # the tokens (1 x 16) are the projections' M; each row's K is the same on both operands
    assert any(g["op"] in ("aten::mm", "aten::addmm") and g["m"] == 16 for g in gemms)
    assert all(g["k_matches"] for g in gemms) and "matrix products by shape" in text


def test_export_time_run_is_the_cpt_recipe_and_exports(tmp_path):
    """benchmarks/export_time.py's run on the tiny workload: r=128 on every projection, trained embeddings,
    a base that the adapter names, and a merge of it that loads (the timed command's work, in process)."""
    import json

    from benchmarks.export_time import make_run
    from cpt_plugin.export import merge

    info = make_run("tiny-llama", tmp_path)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 128 and config["use_rslora"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        config["target_modules"]
    )
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert info["trained_parameters"] > 0 and info["parameters"] > 0
    out = merge(tmp_path / "run", tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_embedding_rounding_summary_means_and_spreads():
    """benchmarks/embedding_rounding_curve.py's table: per dtype, the mean and max-min over seeds."""
    from benchmarks.embedding_rounding_curve import summarize

    def run(dtype, seed, held, moved):
        return {"dtype": dtype, "seed": seed, "heldout_new_loss": held, "embedding_entries_moved": moved,
                "curve": [(10 * i, held + 0.1) for i in range(1, 7)]}  # fmt: skip

    table = summarize([run("float32", 0, 6.0, 1.0), run("float32", 1, 6.2, 1.0), run("model", 0, 7.0, 0.1)])
    assert set(table) == {"float32", "model"}
    assert table["float32"]["heldout_new_loss"] == pytest.approx(6.1)
    assert table["float32"]["heldout_spread"] == pytest.approx(0.2)
    assert table["float32"]["train_loss_last_50"] == pytest.approx(6.2)
    assert table["model"]["seeds"] == 1 and table["model"]["entries_moved"] == 0.1


def test_evaluator_overhead_measures_one_evaluation_against_the_steps(tmp_path):
    """benchmarks/evaluator_overhead.py on the tiny workload: the step time, one evaluation's time, and the
    overhead at one evaluation per ``every`` steps (the GPU number is issue 11's < 5% target)."""
    from benchmarks.evaluator_overhead import main

    args = ["--system", "hf", "--device", "cpu", "--shape", "2x64", "--tokens", "256", "--steps", "2"]
    assert (
        main([*args, "--out", str(tmp_path)]) == 0
    )  # hf: our kernels under the test's Triton interpreter are slow
    result = json.loads((tmp_path / "evaluator.json").read_text())
    assert result["eval_tokens_per_domain"] == 256 and result["eval_every_steps"] == 100
    assert result["overhead"] == pytest.approx(result["eval_seconds"] / (100 * result["step_seconds"]))
    assert set(result["losses"]) == {"new", "old"}


def test_embedding_group_memory_counts_weight_grad_and_states():
    """benchmarks/embedding_group_memory.py at a small shape: fp32 copies 4+4+8 bytes per parameter,
    bf16_sr 2+2+4, bf16_sr with 8-bit states 2+2+~2."""
    from benchmarks.embedding_group_memory import GIB, measure

    vocab, hidden = 4096, 64  # 262,144 parameters: above the 8-bit threshold (4,096)
    fp32 = measure("float32", "adamw", vocab, hidden)
    sr = measure("bfloat16_sr", "adamw", vocab, hidden)
    eight = measure("bfloat16_sr", "adamw_8bit", vocab, hidden)
    n = vocab * hidden
    assert fp32["trained_params"] == n
    assert fp32["total_gib"] * GIB == pytest.approx(16 * n, abs=16)  # (+ torch's step counter)
    assert sr["total_gib"] * GIB == pytest.approx(8 * n, abs=16)
    assert 6 * n < eight["total_gib"] * GIB < 6.2 * n  # uint8 moments + blockwise absmax


def test_rounds_measure_systems_in_turns_and_the_report_takes_the_median(tmp_path):
    """--rounds 3: every system three times, in turns, so a card drifting during the call moves all of
    them; the report keeps one row per system (the median round, the highest peak) and says so. (hf and
    its copy on the tiny CPU workload; an unavailable system is recorded once.)"""
    from benchmarks.report import collapse_rounds, load, train_table
    from benchmarks.run import main as run_main

    out = tmp_path / "bench"
    argv = [
        "--suite",
        "quick",
        "--device",
        "cpu",
        "--systems",
        "hf,unsloth",
        "--shapes",
        "2x16",
        "--no-maxctx",
    ]
    argv += ["--rounds", "3", "--warmup", "1", "--steps", "2", "--out", str(out), "--no-report"]
    assert run_main(argv) == 0
    raw = json.loads((out / "results.json").read_text())["train"]
    assert [(r["system"], r["round"]) for r in raw] == [("hf", 0), ("unsloth", 0), ("hf", 1), ("hf", 2)]
    rows = load(out)["train"]
    assert [r["system"] for r in rows] == ["hf", "unsloth"]
    mine = sorted(r["tokens_per_s"] for r in raw if r["system"] == "hf")
    assert rows[0]["rounds_tokens_per_s"] == mine and rows[0]["tokens_per_s"] == mine[1]
    assert "median of 3 rounds" in "\n".join(train_table({"train": rows}))
    fake = [
        {"workload": "w", "batch": 1, "seq": 8, "system": "s", "status": "ok", "tokens_per_s": t, "peak_allocated_gib": p}
        for t, p in ((10.0, 1.0), (30.0, 3.0), (20.0, 2.0), (40.0, 0.5))
    ]  # fmt: skip
    (row,) = collapse_rounds(fake)
    assert row["tokens_per_s"] == 20.0 and row["peak_allocated_gib"] == 3.0  # lower middle; highest peak


def test_report_shows_the_planners_prediction_against_the_timed_peak():
    """cpt_auto rows carry the plan the worker read from the planner; the report gives its error against
    the peak of the timed steps (a warm-up probe may have run another plan)."""
    plan = {"plan": "16 keep", "tokens": 8192, "predicted_peak_gib": 14.0, "budget_gib": 120.0}
    row = {
        "system": "cpt_auto",
        "workload": "llama-1b",
        "batch": 4,
        "seq": 2048,
        "status": "ok",
        "tokens_per_s": 70000.0,
        "peak_allocated_gib": 15.0,
        "timed_peak_allocated_gib": 13.33,
        "losses": [12.0, 11.0],
        "info": {},
        "memory_plan": plan,
    }
    data = {"meta": {"suite": "quick", "device": "cuda"}, "train": [row]}
    table = "\n".join(report.plan_table(data))
    assert "| llama-1b | 4 × 2048 | cpt_auto | 16 keep | 120.00 | 14.00 | 13.33 | +5.0% |" in table
    assert "plan: 16 keep; predicted 14.00 GiB, measured 13.33 GiB" in report.summary(data)
    assert "predicted against measured peak" in report.render_markdown(data)


def test_worker_records_no_plan_for_a_model_without_a_planner():
    import torch

    from benchmarks.worker import memory_plan

    assert memory_plan(torch.nn.Linear(2, 2)) is None


def test_worker_reports_the_probe_the_plan_was_calibrated_on_in_gib():
    from benchmarks.worker import _probe_in_gib

    probe = {"tokens": 8192, "plan": "offload 16", "peak_bytes": 3 * 2**30, "correction_per_token": -12.5}
    assert _probe_in_gib(probe) == {
        "tokens": 8192,
        "plan": "offload 16",
        "peak_gib": 3.0,
        "correction_per_token": -12.5,
    }
    assert _probe_in_gib(None) is None


def test_idle_gaps_count_the_device_waiting_between_compute_kernels():
    """Overlapping kernels are one busy stretch, side-stream copies are not busy, and each idle gap is
    charged to the kernel that ended it."""
    from benchmarks.profile_step import idle_gaps

    intervals = [
        (0.0, 100.0, "gemm"),
        (50.0, 120.0, "glu"),  # overlaps: busy 0-120
        (130.0, 200.0, "Memcpy DtoH (Device -> Pinned)"),  # not compute
        (1120.0, 1200.0, "rms_norm"),  # 1000 us idle before rms_norm
        (1700.0, 1800.0, "rms_norm"),  # 500 more
        (1810.0, 1900.0, "gemm"),  # 10
    ]
    got = idle_gaps(intervals, steps=1)
    assert got["busy_ms_per_step"] == pytest.approx((120 + 80 + 100 + 90) / 1e3)
    assert got["idle_ms_per_step"] == pytest.approx(1.51)
    assert got["gaps_before"][0] == {"kernel": "rms_norm", "gaps_per_step": 2, "idle_ms_per_step": 1.5}


def test_host_breakdown_stack_timer_splits_inclusive_and_self_time():
    """The host breakdown's timer: a wrapped call's own time excludes the wrapped calls inside it."""
    import time as _time

    from benchmarks.host_breakdown import StackTimer

    timer = StackTimer()
    inner = timer.wrap("inner", lambda: _time.sleep(0.02))

    def outer_body():
        _time.sleep(0.01)
        inner()
        inner()

    outer = timer.wrap("outer", outer_body)
    outer()  # not enabled: nothing recorded
    assert not timer.totals
    timer.enabled = True
    outer()
    count, inclusive, own = timer.totals["outer"]
    inner_count, inner_inclusive, inner_own = timer.totals["inner"]
    assert count == 1 and inner_count == 2
    assert inner_own == pytest.approx(inner_inclusive)
    assert inclusive == pytest.approx(own + inner_inclusive, abs=1e-4)
    assert 0.009 < own < 0.05 and inner_inclusive >= 0.04  # sleeps never return early


def test_gemm_shapes_reads_the_factors_whatever_the_op_and_out():
    from types import SimpleNamespace

    from benchmarks.profile_step import gemm_shapes

    def avg(key, shapes, us):
        return SimpleNamespace(key=key, input_shapes=shapes, count=2, self_device_time_total=us)

    profile = SimpleNamespace(
        key_averages=lambda group_by_input_shape: [
            avg("aten::mm", [[8, 4], [4, 6], [8, 6]], 10.0),  # mm(a, b, out=c)
            avg("aten::addmm", [[8, 6], [8, 4], [4, 6]], 30.0),  # addmm(self, a, b)
            avg("aten::addmm_", [[8, 6], [8, 4], [4, 6], []], 20.0),
            avg("aten::add", [[8, 6], [8, 6]], 99.0),  # not a matrix product
        ]
    )
    rows = gemm_shapes(profile, steps=2)
    assert [(r["op"], r["m"], r["k"], r["n"]) for r in rows] == [
        ("aten::addmm", 8, 4, 6),
        ("aten::addmm_", 8, 4, 6),
        ("aten::mm", 8, 4, 6),
    ]
    assert all(r["k_matches"] and r["calls_per_step"] == 1 for r in rows)
    assert rows[0]["tflops"] == pytest.approx(2 * 8 * 4 * 6 * 2 / (30.0 * 1e6))


def test_optimizer_step_benchmark_times_both_8bit_optimizers_on_cpu():
    pytest.importorskip("bitsandbytes")
    from benchmarks.optimizer_step import measure

    rows = measure("mistral-7b-qlora", "cpu", steps=1, layers=1)
    assert [row["optimizer"] for row in rows] == ["AdamW8bit", "BatchedAdamW8bit"]
    assert all(row["tensors"] == 14 and row["wall_ms"] >= row["host_ms"] > 0 for row in rows)
    assert rows[0]["elements"] == 32 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096 + 3 * (4096 + 14336))
