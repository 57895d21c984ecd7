"""Memory features: per-layer and offloaded checkpointing, the memory planner, tiled MLP, frozen embeddings off GPU."""

from cpt_plugin.offload.checkpointing import (
    LayerPlan,
    checkpointing_mode,
    enable_checkpointing,
    enable_layer_plan,
    offload_pool_stats,
)
from cpt_plugin.offload.embeddings import (
    offload_frozen_embeddings,
    offloaded_bytes,
    restore_frozen_embeddings,
)
from cpt_plugin.offload.planner import MemoryPlanner, find_planner, install_planner
from cpt_plugin.offload.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, set_tiled_layers, tiled_mlp

__all__ = [
    "LayerPlan",
    "MemoryPlanner",
    "checkpointing_mode",
    "disable_tiled_mlp",
    "enable_checkpointing",
    "enable_layer_plan",
    "enable_tiled_mlp",
    "find_planner",
    "install_planner",
    "offload_frozen_embeddings",
    "offload_pool_stats",
    "offloaded_bytes",
    "restore_frozen_embeddings",
    "set_tiled_layers",
    "tiled_mlp",
]
