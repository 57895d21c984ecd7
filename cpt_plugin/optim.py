"""Optimizer parameter groups for CPT: embeddings at their own (smaller) learning rate.

Groups are fixed when the optimizer is created, so the scheduler's per-group state and the optimizer
state saved in checkpoints always agree (adding groups later breaks resume).

Trained embeddings kept bf16 with stochastic rounding (``trained_embeddings_dtype: bfloat16_sr``) or with
8-bit AdamW states (``embedding_optimizer: adamw_8bit``) need an update torch's AdamW does not do. CPTAdamW
is still ONE torch AdamW to the Trainer (scheduler per group, state_dict, zero_grad): groups marked
``cpt_update: "torch"`` take torch's (fused) step, the others the updates in stochastic_rounding.py.

Row-aware embedding LR: rows of tokens the base never trained (``vocabulary.fresh_rows``: added by
vocabulary extension or found by healing) start from an initialisation, not from knowledge to protect, so
they learn at ``fresh_row_learning_rate`` (default: the LoRA LR, twice it with domain-shifted rows) while known rows keep the embedding LR.
The embedding group then runs at the fresh LR and carries ``cpt_row_scale``, one factor per row (1 for
fresh rows, known LR / fresh LR for the others) that CPTAdamW applies to the update (and the weight
decay) of each row. The scheduler scales the group LR, so the ratio stays fixed; the vector is in the
param group, so the Trainer's optimizer checkpoint carries it and resume is exact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cpt_plugin import stochastic_rounding as sr
from cpt_plugin.config import CPTConfig, CPTConfigError
from cpt_plugin.model_parts import embedding_parameter_ids, input_embeddings
from cpt_plugin.trainer_settings import DEFAULT_OPTIMIZER
from cpt_plugin.vocabulary.fresh_rows import fresh_rows

logger = logging.getLogger(__name__)

MAIN_GROUP = "lora"
EMBEDDING_GROUP = "embeddings"
OTHER_EMBEDDING_GROUP = "embeddings_other"  # row-aware runs: embedding parameters without token rows


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias")


def row_scale(model: nn.Module, config: CPTConfig, learning_rate: float) -> tuple[torch.Tensor, float] | None:
    """(per-row factor vector, fresh-row LR) when some embedding rows are fresh and row-aware LR is on,
    else None. Fresh rows get 1, the others known LR / fresh LR; the embedding group runs at the fresh LR."""
    rows = fresh_rows(model)
    if rows is None or not config.row_aware_embedding_lr or not config.train_embeddings:
        return None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # set by TrainingArguments too
        logger.warning(
            "cpt-plugin: %d new or untrained embedding rows learn at the embedding LR like the others: DeepSpeed "
            "ZeRO flattens the embeddings, so their rows cannot have an LR of their own (DDP and FSDP2 can). "
            "Set row_aware_embedding_lr: false to silence this.",
            rows.numel(),
        )
        return None
    embed = input_embeddings(model)
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CPTConfigError(
            "cpt-plugin config 'row_aware_embedding_lr': found no input embedding weight to count rows. "
            "Set row_aware_embedding_lr: false."
        )
    vocab = weight.shape[0]
    if int(rows.max()) >= vocab or int(rows.min()) < 0:
        raise CPTConfigError(
            f"cpt-plugin: fresh embedding row {int(rows.max())} is outside the embedding's {vocab} rows "
            "(marked before a resize that shrank the vocabulary?). Mark rows after resizing "
            "(cpt_plugin.vocabulary.fresh_rows), or set row_aware_embedding_lr: false."
        )
    fresh_lr = config.resolved_fresh_lr(learning_rate)
    scale = torch.full((vocab,), config.resolved_embedding_lr(learning_rate) / fresh_lr, dtype=torch.float32)
    scale[rows] = 1.0
    return scale.to(weight.device), fresh_lr


def build_param_groups(
    model: nn.Module, config: CPTConfig, learning_rate: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """LoRA (and any other trainable weight) at ``learning_rate``; embeddings and lm_head at the
    embedding LR; no weight decay on norms and biases. Empty groups are left out. With fresh embedding
    rows (module doc), the embedding groups run at the fresh-row LR with a per-row ``cpt_row_scale``."""
    embedding_lr = config.resolved_embedding_lr(learning_rate)
    embedding_ids = embedding_parameter_ids(model)
    rows = row_scale(model, config, learning_rate) if embedding_ids else None
    if config.embedding_rows == "fresh":  # only fresh rows train (PEFT trainable tokens): all at the fresh LR
        embedding_lr = config.resolved_fresh_lr(learning_rate)
        rows = None
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # tied parameters appear once
        seen.add(id(param))
        group = EMBEDDING_GROUP if id(param) in embedding_ids else MAIN_GROUP
        if (
            group == EMBEDDING_GROUP
            and rows is not None
            and (not param.ndim or param.shape[0] != len(rows[0]))
        ):
            group = OTHER_EMBEDDING_GROUP  # no token rows to scale: the embedding LR as before
        buckets.setdefault((group, _no_decay(name, param)), []).append(param)
    groups = []
    for group in (MAIN_GROUP, EMBEDDING_GROUP, OTHER_EMBEDDING_GROUP):
        for no_decay in (False, True):
            params = buckets.get((group, no_decay))
            if params:
                lr = {MAIN_GROUP: learning_rate}.get(group, embedding_lr)
                extra: dict[str, Any] = {}
                if group == EMBEDDING_GROUP and rows is not None:
                    lr = rows[1]
                    extra = {"cpt_row_scale": rows[0].clone(), "cpt_known_row_scale": embedding_lr / rows[1]}
                groups.append(
                    {
                        "params": params,
                        "lr": lr,
                        "weight_decay": 0.0 if no_decay else weight_decay,
                        "cpt_group": group + ("_no_decay" if no_decay else ""),
                        **extra,
                    }
                )
    if not groups:
        raise CPTConfigError(
            "cpt-plugin: the model has no trainable parameters. Call prepare_model(model, config) first."
        )
    if any((EMBEDDING_GROUP, no_decay) in buckets for no_decay in (False, True)):
        from cpt_plugin.preflight import warn_if_embedding_lr_suspicious

        warn_if_embedding_lr_suspicious(learning_rate, embedding_lr)
    return groups


def _fused_supported(groups: list[dict[str, Any]]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


def _mark_updates(groups: list[dict[str, Any]], config: CPTConfig, name: str) -> bool:
    """Marks each group with the update it takes (``cpt_update``, ``cpt_stochastic_rounding``); True when
    some group needs CPTAdamW rather than a stock optimizer."""
    special = False
    for group in groups:
        embedding = group["cpt_group"].startswith(EMBEDDING_GROUP)
        rounding = (
            embedding
            and config.trained_embeddings_dtype == "bfloat16_sr"
            and any(p.dtype == torch.bfloat16 for p in group["params"])
        )
        eight_bit = name == "adamw_8bit" or (embedding and config.embedding_optimizer == "adamw_8bit")
        per_row = "cpt_row_scale" in group  # torch's AdamW has one lr per group
        group["cpt_stochastic_rounding"] = rounding
        group["cpt_update"] = "adamw_8bit" if eight_bit else ("adamw" if rounding or per_row else "torch")
        special = special or rounding or per_row or (eight_bit and name != "adamw_8bit")
    return special


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares its storage), the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _row_offset(param: torch.Tensor) -> int:
    """The global index of the first row of this rank's shard (0 for a plain tensor). FSDP2 shards by rows
    (Shard(0)); any other split has no row offset, which is a clear error."""
    if not hasattr(param, "to_local"):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)
    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in placements):
        raise CPTConfigError(
            f"cpt-plugin config 'row_aware_embedding_lr': the embedding is sharded as {placements}, not by "
            "rows (Shard(0), as FSDP2 does), so its rows cannot be told apart. Shard it by rows, or set "
            "row_aware_embedding_lr: false."
        )
    _shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    return int(offset[0])


def _local_row_scale(dist_param: torch.Tensor, param: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The factors of the rows this rank holds (all of them without sharding), on the param's device."""
    if dist_param.shape[0] != scale.numel():
        raise CPTConfigError(
            f"cpt-plugin: the per-row LR vector has {scale.numel()} entries but a parameter of its group has shape "
            f"{tuple(dist_param.shape)}: resized after the optimizer was built, or flattened by an engine "
            "(DeepSpeed ZeRO). Build the optimizer after resizing, use DDP or FSDP2, or set "
            "row_aware_embedding_lr: false."
        )
    start = _row_offset(dist_param)
    return scale[start : start + param.shape[0]].to(param.device)


class CPTAdamW(torch.optim.AdamW):
    """torch's AdamW whose groups may take another update, chosen per group by ``cpt_update``:

    - ``"torch"``: torch's own step (fused on CUDA where the parameters allow);
    - ``"adamw"``: the same math in fp32 chunks, bf16 tensors written back stochastically rounded;
    - ``"adamw_8bit"``: bitsandbytes' blockwise 8-bit AdamW (uint8 moments), bf16 weights stochastically
      rounded when ``cpt_stochastic_rounding`` is set.

    The rounding of parameter i at step t is seeded from (``cpt_seed``, i, t): the seed is in the param
    group and the step in the state, so a checkpoint carries everything and resume draws the same bits.
    """

    MIN_8BIT_SIZE = 4096  # as bitsandbytes: smaller tensors keep full-precision moments

    def __init__(self, params: Any, *, seed: int = 0, **adamw_kwargs: Any) -> None:
        super().__init__(params, **adamw_kwargs)
        own_defaults = {"cpt_update": "torch", "cpt_stochastic_rounding": False, "cpt_seed": seed}
        self.defaults.update(own_defaults)
        for group in self.param_groups:
            for key, value in own_defaults.items():
                group.setdefault(key, value)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indexed_params(self) -> Iterator[tuple[int, dict[str, Any], torch.Tensor]]:
        """(index as in state_dict, group, param) over every parameter."""
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                yield index, group, param
                index += 1

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        every_group = self.param_groups
        torch_groups = [g for g in every_group if g.get("cpt_update", "torch") == "torch"]
        if torch_groups:
            self.param_groups = torch_groups  # torch's step over its own groups; state is shared
            try:
                super().step()
            finally:
                self.param_groups = every_group
        for index, group, param in self._indexed_params():
            if group.get("cpt_update", "torch") != "torch" and param.grad is not None:
                self._own_step(index, group, param)
        return loss

    def _own_step(self, index: int, group: dict[str, Any], dist_param: torch.Tensor) -> None:
        if dist_param.grad.is_sparse:
            raise RuntimeError("cpt-plugin: CPTAdamW does not support sparse gradients")
        state = self.state[dist_param]
        param = _local(dist_param)  # FSDP2 DTensor: this rank's shard (updates are element-wise)
        grad = _local(dist_param.grad)
        scale = group.get("cpt_row_scale")
        if scale is not None:
            scale = _local_row_scale(dist_param, param, scale)
        eight_bit = group["cpt_update"] == "adamw_8bit" and param.numel() >= self.MIN_8BIT_SIZE
        if not state:
            state["step"] = 0
            if eight_bit:
                state.update(sr.init_8bit_state(param))
            else:  # bf16 moments for a bf16 weight (rounded stochastically), fp32 otherwise
                moments = param.dtype if param.dtype == torch.bfloat16 else torch.float32
                state["exp_avg"] = torch.zeros_like(param, dtype=moments)
                state["exp_avg_sq"] = torch.zeros_like(param, dtype=moments)
        state["step"] += 1
        rounding = group["cpt_stochastic_rounding"] and param.dtype == torch.bfloat16
        seed = sr.rounding_seed(group["cpt_seed"], index, state["step"])
        hyper = dict(
            step=state["step"], lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
            weight_decay=group["weight_decay"], row_scale=scale,
        )  # fmt: skip
        if eight_bit:
            qmaps = self._qmaps.get(param.device)
            if qmaps is None:
                qmaps = self._qmaps[param.device] = sr.dynamic_qmaps(param.device)
            generator = self._generator(param.device, seed) if rounding else None
            sr.adamw_8bit_step_(param, grad, state, qmaps, **hyper, generator=generator)
            return
        moments = (_local(state["exp_avg"]), _local(state["exp_avg_sq"]))
        if rounding and sr.fused_path_applies(param, grad, *moments):
            sr.adamw_bf16_sr_fused_(param, grad, *moments, **hyper, seed=seed)
        else:  # without rounding (fp32, or trained_embeddings_dtype: model): exact / round-to-nearest
            generator = self._generator(param.device, seed) if rounding else None
            sr.adamw_step_(param, grad, *moments, **hyper, generator=generator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, except that the state of our own groups keeps its dtypes (torch would cast
        every floating state to the parameter's dtype: 8-bit absmax to bf16, for one)."""
        saved = state_dict["state"]
        own = {
            index
            for group in state_dict["param_groups"]
            if group.get("cpt_update", "torch") != "torch"
            for index in group["params"]
        }
        super().load_state_dict({**state_dict, "state": {k: v for k, v in saved.items() if k not in own}})
        for index, _group, param in self._indexed_params():
            if index in own and index in saved:
                self.state[param] = {
                    key: value.to(param.device, copy=True) if isinstance(value, torch.Tensor) else value
                    for key, value in saved[index].items()
                }


def create_optimizer(
    model: nn.Module,
    config: CPTConfig,
    learning_rate: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over the CPT parameter groups: torch (fused where the parameters allow) or 8-bit; CPTAdamW
    when the embeddings need stochastic rounding or 8-bit states of their own."""
    groups = build_param_groups(model, config, learning_rate, weight_decay)
    name = config.optimizer or DEFAULT_OPTIMIZER
    special = _mark_updates(groups, config, name)
    if name == "adamw_8bit" or any(g["cpt_update"] == "adamw_8bit" for g in groups):
        try:
            import bitsandbytes  # noqa: F401  (only: is it installed?)
        except ImportError as error:
            key = "optimizer" if name == "adamw_8bit" else "embedding_optimizer"
            raise CPTConfigError(
                f"cpt-plugin config '{key}': adamw_8bit needs bitsandbytes. "
                "Install it with `pip install cpt-plugin[bnb]`, or use "
                f"{'adamw_torch_fused' if key == 'optimizer' else 'adamw'}."
            ) from error
        if not special:
            from cpt_plugin.optim_8bit import BatchedAdamW8bit  # imports bitsandbytes

            return BatchedAdamW8bit(groups, lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = name == "adamw_torch_fused" and _fused_supported(groups)
    if name == "adamw_torch_fused" and not fused:
        # news on a GPU machine (parameters left on the CPU); expected on a CPU-only one: debug there
        say = logger.info if torch.cuda.is_available() else logger.debug
        say("cpt-plugin: fused AdamW needs CUDA parameters; using the foreach AdamW instead.")
    kwargs = dict(lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if not special:
        return torch.optim.AdamW(groups, **kwargs)
    for group in groups:
        group["cpt_seed"] = config.seed
    optimizer = CPTAdamW(groups, seed=config.seed, **kwargs)
    for group in optimizer.param_groups:
        if group["cpt_update"] == "adamw_8bit" or group["cpt_stochastic_rounding"]:  # per-row LR: below
            logger.info(
                "cpt-plugin: %s: %s%s", group["cpt_group"],
                "8-bit AdamW states" if group["cpt_update"] == "adamw_8bit" else "AdamW",
                ", bf16 weights rounded stochastically" if group["cpt_stochastic_rounding"] else "",
            )  # fmt: skip
    _log_row_rates(model, optimizer.param_groups)
    return optimizer


def _log_row_rates(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """One line: how many rows learn at the fresh-row LR and how many at the embedding LR."""
    group = next((g for g in groups if "cpt_row_scale" in g), None)
    if group is None:
        return
    fresh, lr = int(fresh_rows(model).numel()), float(group["lr"])
    logger.info(
        "cpt-plugin: %d new or untrained embedding rows learn at LR %.3g (the other %d at %.3g)",
        fresh, lr, group["cpt_row_scale"].numel() - fresh, lr * group["cpt_known_row_scale"],
    )  # fmt: skip
