"""The sharded half of the FSDP2 row-offset test (tests/vocabulary/test_row_lr.py): a spawned gloo rank
imports only this module, torch and cpt_plugin.optim (the test module's imports cost seconds per rank)."""

from __future__ import annotations

import torch

from cpt_plugin.optim import CPTAdamW

ROWS, WORLD = 7, 2  # 7 rows over 2 ranks: shards of 4 and 3 rows (torch.chunk, as FSDP2 splits them)


def case():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(ROWS, 5, generator=generator)
    grads = [torch.randn(ROWS, 5, generator=generator) for _ in range(2)]
    scale = torch.tensor([1.0, 0.1, 0.1, 1.0, 0.1, 1.0, 0.1])  # fresh rows on both shards
    return weight, grads, scale


def two_steps(param, grads, make_grad, scale):
    group = {"params": [param], "cpt_update": "adamw", "cpt_row_scale": scale, "cpt_group": "embeddings"}
    optimizer = CPTAdamW([group], lr=1e-2, weight_decay=0.1)
    for grad in grads:
        param.grad = make_grad(grad)
        optimizer.step()


def worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cpt_plugin.optim import _row_offset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    weight, grads, scale = case()
    param = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    two_steps(param, grads, lambda g: distribute_tensor(g, mesh, [Shard(0)]), scale)
    full = param.detach().full_tensor()
    offset = _row_offset(param)
    if rank == 1:
        torch.save({"weight": full, "offset": offset, "local_rows": param.to_local().shape[0]}, out)
    dist.destroy_process_group()
    os._exit(
        0
    )  # gloo's exit-time destructors sometimes abort a finished worker (tests/offload/test_ddp_no_sync.py)
