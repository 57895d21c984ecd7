"""One run of the multi-GPU check: a stock HF Trainer + CPTCallback on a random-weight model.

    python benchmarks/distributed/train.py --out single.json                       # the reference
    accelerate launch --config_file benchmarks/distributed/ddp.yaml \\
        benchmarks/distributed/train.py --out ddp.json                             # or fsdp2 / deepspeed
    ... --cpu                                                                      # tiny model, gloo

Every run trains the same model (weights set by parameter name, so every engine and every rank starts
from the same values) on the same global batches: the single process takes ``--global-batch`` rows per
step, each of N processes takes ``global_batch / N`` consecutive rows (a sequential sampler, so
accelerate's batch sharding gives rank r rows [r*B, (r+1)*B) of the global batch). A forward hook
records, per step and rank, a hash of every row and the rank's own loss, so the report can prove that
the global batches were identical and that the Trainer's logged loss is the mean over all ranks.

The data are synthetic but learnable, so that the loss moves within a dozen steps and a broken gradient
sync or a wrong learning rate would show: token ids are log-uniform (Zipf-like) over a sub-vocabulary
whose size depends on the row (vocab/2048 ids ... the whole vocabulary), so rows differ strongly in
loss once the model has learned that low ids are frequent, and the ranks of a step see different losses.
The LoRA and trained-embedding parameters are kept in fp32 in every run (``--trainable-dtype``), as FSDP2
and DeepSpeed keep fp32 masters anyway; the frozen base is bf16 on a GPU.

Rank 0 writes one JSON file (``--out``): engine, world size, per-step logged losses, grad norms and
learning rates, the per-rank forward losses and row hashes, tokens/s (after ``--untimed-steps``),
peak memory per rank, the optimizer's parameter groups as seen after the Trainer/accelerate prepared
them, the kernel patch state, the checkpointing mode that ran, versions and the GPU name.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script (python / accelerate launch) from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from benchmarks.systems import init_base_weights, init_lora_weights  # noqa: E402
from benchmarks.workloads import LORA_ALPHA, resolve_workload  # noqa: E402
from cpt_plugin import CPTCallback  # noqa: E402

PACKAGES = ("torch", "transformers", "accelerate", "peft", "deepspeed", "triton", "cpt-plugin")
SUB_VOCAB_SHIFTS = (11, 7, 3, 0)  # row r uses ids [0, vocab >> shift) with shift = SUB_VOCAB_SHIFTS[r % 4]


# ------------------------------------------------------------------------------------------------
# Data
def synthetic_rows(n_rows: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Log-uniform token ids over a per-row sub-vocabulary (see the module docstring); CPU, seeded."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n_rows):
        size = max(8, vocab_size >> SUB_VOCAB_SHIFTS[r % len(SUB_VOCAB_SHIFTS)])
        u = torch.rand(seq_len, generator=generator, dtype=torch.float64)
        rows.append((size**u).floor().long().clamp_(1, size) - 1)
    return torch.stack(rows)


class Rows(Dataset):
    """Fixed-length rows; labels = input_ids (the model shifts them)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.rows[index]
        return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------------
# Probes
class ForwardProbe:
    """Forward hook on the trained model: per step, a hash of each row it saw and its own loss."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        self.hashes: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.num_items: list[torch.Tensor | None] = []

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.weights is None or self.weights.numel() != ids.shape[-1] or self.weights.device != ids.device:
            gen = torch.Generator().manual_seed(12345)
            self.weights = torch.randint(1, 2**20, (ids.shape[-1],), generator=gen).to(ids.device)
        # position-aware, computed on the device (no sync); ids < 2**17, so the sum stays below 2**49
        self.hashes.append(((ids.long() + 1) * self.weights).sum(-1).detach())
        loss = output["loss"] if isinstance(output, dict) else output[0]
        # a copy: the Trainer scales the returned loss in place (by the world size) after this hook
        self.losses.append(loss.detach().float().clone().reshape(()))
        items = kwargs.get("num_items_in_batch")
        self.num_items.append(torch.as_tensor(items).detach().float() if items is not None else None)

    def to_lists(self) -> dict[str, Any]:
        return {
            "row_hashes": [h.cpu().tolist() for h in self.hashes],
            "losses": [float(x) for x in self.losses],
            "num_items_in_batch": [None if n is None else float(n.sum()) for n in self.num_items],
        }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Recorder(TrainerCallback):
    """Wall time at every step end (device synchronized) and the prepared optimizer's groups."""

    def __init__(self) -> None:
        self.train_begin: float | None = None
        self.step_ends: list[float] = []
        self.param_groups: list[dict[str, Any]] = []
        self.optimizer_chain: list[str] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.param_groups = describe_param_groups(optimizer)
        self.optimizer_chain = optimizer_chain(optimizer)
        _sync()
        self.train_begin = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.step_ends.append(time.perf_counter())
        return control


def optimizer_chain(optimizer: Any) -> list[str]:
    """Class names from the Trainer's optimizer down through its wrappers (accelerate, DeepSpeed)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def describe_param_groups(optimizer: Any) -> list[dict[str, Any]]:
    """Per group: our tag, lr, initial lr, weight decay, tensors, elements (global and on this rank)."""
    from torch.distributed.tensor import DTensor

    groups = []
    for group in getattr(optimizer, "param_groups", None) or []:
        params = list(group["params"])
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        groups.append(
            {
                "cpt_group": group.get("cpt_group"),
                "lr": float(group["lr"]),
                "initial_lr": float(group.get("initial_lr", group["lr"])),
                "weight_decay": float(group.get("weight_decay", 0.0)),
                "tensors": len(params),
                "numel": int(sum(p.numel() for p in params)),
                "local_numel": int(sum(p.numel() for p in local)),
                "dtensors": sum(isinstance(p, DTensor) for p in params),
                "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in params}),
            }
        )
    return groups


def kernel_state(model: Any) -> dict[str, Any]:
    """Which cpt-plugin kernels are patched in (module level + RMSNorm instances of this model) and how
    many Triton kernel variants were compiled in this process (proof that they ran on the GPU)."""
    import importlib

    from cpt_plugin.patching.family import is_patched
    from cpt_plugin.patching.registry import get_registry

    out: dict[str, Any] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    patcher = get_registry().get(model_type) if model_type else None
    spec = getattr(patcher, "spec", None)
    if spec is not None:
        module = importlib.import_module(spec.module)
        norm_cls = getattr(module, spec.rms_norm_class, None) if spec.rms_norm_class else None
        mlp_cls = getattr(module, spec.mlp_class, None) if spec.mlp_class else None
        rope = getattr(module, spec.rope_function, None) if spec.rope_function else None
        lm_classes = [getattr(module, name, None) for name in spec.causal_lm_classes]
        norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
        out["patched"] = {
            "rms_norm": bool(norm_cls is not None and is_patched(norm_cls)),
            "rms_norm_instances": f"{sum(is_patched(type(m)) for m in norms)}/{len(norms)}",
            "swiglu": bool(mlp_cls is not None and is_patched(mlp_cls.forward)),
            "rope": bool(rope is not None and is_patched(rope)),
            "fused_linear_cross_entropy": any(c is not None and is_patched(c.forward) for c in lm_classes),
        }
    out["triton_compiled"] = triton_compiled_variants()
    return out


def triton_compiled_variants() -> dict[str, int] | str:
    """Compiled variants per Triton kernel of cpt_plugin.kernels (0: never launched on a GPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    import importlib
    import pkgutil

    import cpt_plugin.kernels as kernels

    counts: dict[str, int] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"cpt_plugin.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = obj
            while hasattr(fn, "fn") and not hasattr(fn, "device_caches"):  # Autotuner / Heuristics
                fn = fn.fn
            caches = getattr(fn, "device_caches", None)
            if caches is None:
                continue
            total = 0
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                total += len(cache) if hasattr(cache, "__len__") else 0
            counts[f"{info.name}.{name}"] = total
    return counts


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    if out.get("cpt-plugin") == "missing":  # run from a source checkout (the GPU machine), not installed
        import cpt_plugin

        out["cpt-plugin"] = f"{cpt_plugin.__version__} (source)"
    return out


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    parser.add_argument("--label", help="name of this run in the report (default: the engine)")
    parser.add_argument("--workload", default="llama-1b", help="benchmarks.workloads name (tiny on --cpu)")
    parser.add_argument("--cpu", action="store_true", help="CPU (gloo), the tiny model, fp32")
    parser.add_argument("--global-batch", type=int, default=4, help="rows per optimizer step, all ranks")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default 2048; 64 on --cpu)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--untimed-steps", type=int, default=2, help="first steps left out of the timing")
    # GPU default 2e-4: at 1e-3 the 12-step loss curve of llama-1b shapes is unstable (12.2 -> 15.3 at
    # step 5 on 2xH100) and amplifies rounding differences between engines beyond any fixed tolerance.
    parser.add_argument("--lr", type=float, help="LoRA learning rate, embeddings 1/10 (2e-4; 1e-3 on --cpu)")
    parser.add_argument("--lora-r", type=int, help="default 128 (8 on --cpu)")
    parser.add_argument("--checkpointing", choices=("recompute", "offload"), default="recompute")
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto", help="auto: on with CUDA")
    parser.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 with CUDA"
    )
    parser.add_argument(
        "--trainable-dtype",
        choices=("fp32", "model"),
        default="fp32",
        help="fp32: LoRA and trained embeddings in fp32 in every run (FSDP2 and DeepSpeed keep fp32 masters "
        "anyway); model: PEFT's choice (LoRA fp32, trained embeddings in the model dtype, i.e. pure bf16 "
        "on a GPU for single-device and DDP runs only)",
    )
    parser.add_argument(
        "--sampler",
        choices=("sequential", "random"),
        default="sequential",
        help="train_sampling_strategy; random: the Trainer's default (then the hashes show whether the "
        "global batches still match the single-process run)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        args.cpu = True
    args.seq_len = args.seq_len or (64 if args.cpu else 2048)
    args.lora_r = args.lora_r or (8 if args.cpu else 128)
    args.lr = args.lr or (1e-3 if args.cpu else 2e-4)
    if args.precision == "auto":
        args.precision = "fp32" if args.cpu else "bf16"
    return args


def allow_fsdp_on_cpu() -> bool:
    """CPU dry runs and tests only: let ``accelerate launch`` with an FSDP config run FSDP2 under gloo.

    accelerate 1.15 turns a launch with an FSDP config into ``DistributedType.FSDP`` only for GPU-type
    devices; on the CPU (``MULTI_CPU``) the plugin is silently dropped and the run would be plain DDP.
    torch's ``fully_shard`` itself works on the CPU with gloo, so we set the FSDP type on the CPU state
    and the Trainer then takes its real FSDP2 path (accelerate's fsdp2_prepare_model, the optimizer's
    parameters switched to the sharded DTensors). Returns whether the shim was installed.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__
    return True


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    cpu_fsdp_shim = args.cpu and allow_fsdp_on_cpu()
    device = "cpu" if args.cpu else "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} is not divisible by {world} processes")
    per_device = args.global_batch // world
    if args.cpu:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kernels = {"auto": not args.cpu, "on": True, "off": False}[args.kernels]

    from transformers import AutoModelForCausalLM

    workload = resolve_workload(args.workload, device)
    config = workload.make_config()
    config.use_cache = False
    bf16 = args.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    init_base_weights(model, args.seed)

    rows = synthetic_rows(args.steps * args.global_batch, args.seq_len, workload.vocab_size, args.seed)
    out_dir = tempfile.mkdtemp(prefix="cpt-dist-")
    training_args = dict(
        output_dir=out_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=2,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=bf16,
        use_cpu=args.cpu,
        gradient_checkpointing=True,
        train_sampling_strategy=args.sampler,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    callback = CPTCallback(
        lora_r=args.lora_r,
        lora_alpha=LORA_ALPHA,
        train_embeddings=True,
        embedding_lr_ratio=0.1,
        # "model" keeps PEFT's choice for the copies; "fp32" is also cpt-plugin's default
        trained_embeddings_dtype="model" if args.trainable_dtype == "model" else "float32",
        kernels=kernels,
        gradient_checkpointing=args.checkpointing,
        schedule="cosine",
        seed=args.seed,
    )
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_args),
        train_dataset=Rows(rows),
        callbacks=[callback, recorder],
    )
    init_lora_weights(trainer.model, args.seed)  # same LoRA A on every rank and engine (B stays zero)
    if args.trainable_dtype == "fp32":  # before the optimizer exists (it is built in train())
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    probe = ForwardProbe()
    handle = trainer.model.register_forward_hook(probe, with_kwargs=True)
    start = time.perf_counter()
    trainer.train()
    _sync()
    wall = time.perf_counter() - start
    handle.remove()

    from cpt_plugin.offload.checkpointing import checkpointing_mode, offload_pool_stats

    mine = {
        "rank": rank,
        "probe": probe.to_lists(),
        "step_ends": recorder.step_ends,
        "train_begin": recorder.train_begin,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if not args.cpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if not args.cpu else None,
        "param_groups": recorder.param_groups,
        "offload_pool": offload_pool_stats(),
    }
    ranks = _gather(mine)
    if rank != 0:
        return None

    accelerator = trainer.accelerator
    state = accelerator.state
    engine_config: dict[str, Any] = {}
    if trainer.is_fsdp_enabled:
        engine = f"fsdp{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
        engine_config["mixed_precision_policy"] = str(state.fsdp_plugin.mixed_precision_policy)
    elif trainer.is_deepspeed_enabled:
        engine = f"deepspeed_zero{state.deepspeed_plugin.zero_stage}"
        ds = state.deepspeed_plugin.deepspeed_config
        for key in ("bf16", "zero_optimization", "gradient_clipping", "train_micro_batch_size_per_gpu"):
            engine_config[key] = ds.get(key)
        engine_config["zero_allow_untested_optimizer"] = ds.get("zero_allow_untested_optimizer")
    else:
        engine = "ddp" if accelerator.num_processes > 1 else "single"
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    tokens_per_step = args.global_batch * args.seq_len
    warm = max(0, min(args.untimed_steps, args.steps - 1))
    elapsed = []
    for r in ranks:
        begin = r["step_ends"][warm - 1] if warm else r["train_begin"]
        elapsed.append(r["step_ends"][-1] - begin)
    timed_steps = args.steps - warm
    tokens_per_second = tokens_per_step * timed_steps / max(elapsed)
    ends = [ranks[0]["train_begin"], *ranks[0]["step_ends"]]
    result = {
        "label": args.label
        or f"{engine}" + ("" if args.checkpointing == "recompute" else f"+{args.checkpointing}"),
        "engine": engine,
        "world_size": accelerator.num_processes,
        "distributed_type": str(state.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if not args.cpu else None,
        "workload": workload.name,
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "per_device_batch": per_device,
        "steps": args.steps,
        "lr": args.lr,
        "lora_r": args.lora_r,
        "sampler": args.sampler,
        "precision": args.precision,
        "trainable_dtype_requested": args.trainable_dtype,
        "kernels_requested": kernels,
        "checkpointing_requested": args.checkpointing,
        "checkpointing_mode": checkpointing_mode(trainer.model),
        "engine_config": engine_config,
        "wrapped_model": type(trainer.model_wrapped).__name__,
        "cpu_fsdp_shim": cpu_fsdp_shim,
        "optimizer_chain": recorder.optimizer_chain,
        "param_groups": ranks[0]["param_groups"],
        "param_groups_local_numel_per_rank": [[g["local_numel"] for g in r["param_groups"]] for r in ranks],
        "trainable_dtypes": sorted(
            {str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad}
        ),
        "kernels": kernel_state(trainer.model),
        "offload_pool_per_rank": [r["offload_pool"] for r in ranks],
        "loss": [h["loss"] for h in logged],
        "grad_norm": [h.get("grad_norm") for h in logged],
        "learning_rate": [h.get("learning_rate") for h in logged],
        "embedding_learning_rate": [h.get("embedding_learning_rate") for h in logged],
        "rank_losses": [r["probe"]["losses"] for r in ranks],
        "rank_num_items_in_batch": [r["probe"]["num_items_in_batch"] for r in ranks],
        "rank_row_hashes": [r["probe"]["row_hashes"] for r in ranks],
        "step_seconds": [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)],
        "timed_steps": timed_steps,
        "tokens_per_second": tokens_per_second,
        "tokens_per_second_per_gpu": tokens_per_second / accelerator.num_processes,
        "peak_allocated_gib_per_rank": [r["peak_allocated_gib"] for r in ranks],
        "peak_reserved_gib_per_rank": [r["peak_reserved_gib"] for r in ranks],
        "train_wall_seconds": wall,
        "versions": versions(),
        "env": {
            k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
        },
    }
    result["global_loss_from_ranks"] = global_loss_from_ranks(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"[{result['label']}] world={result['world_size']} loss {result['loss'][0]:.4f} -> "
        f"{result['loss'][-1]:.4f}; {result['tokens_per_second_per_gpu']:.0f} tokens/s per device; "
        f"wrote {args.out}"
    )
    return result


def global_loss_from_ranks(result: dict[str, Any]) -> list[float]:
    """The global loss of each step rebuilt from the ranks' own forward losses.

    With ``num_items_in_batch`` (the Trainer passes the token count of the whole global batch) each rank's
    loss is its token-loss sum / that count, so the global loss is the sum over ranks; without it each
    rank's loss is its own mean and, rows being equally long, the global loss is the mean over ranks.
    """
    per_rank = result["rank_losses"]
    counted = all(n is not None for rank in result["rank_num_items_in_batch"] for n in rank)
    steps = min(len(r) for r in per_rank)
    combine = sum if counted else (lambda xs: sum(xs) / len(xs))
    return [combine([r[i] for r in per_rank]) for i in range(steps)]


def _shut_down_process_group() -> None:
    """Tear the process group down before the interpreter exits."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _exit_without_destructors(code: int) -> None:
    """Leave at once once the result file is written and the group is down.

    Left to the interpreter's exit-time destructors, a finished gloo rank still aborts about 1 run in 10
    ("terminate called without an active exception", SIGABRT) even after ``destroy_process_group``: seen
    in CI on 2026-12-01 and locally (1 of 8 FSDP2 launches). Nothing is left to clean up at this point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = 1
    try:
        main()
        exit_code = 0
    finally:
        _shut_down_process_group()
        if exit_code == 0:
            _exit_without_destructors(0)
