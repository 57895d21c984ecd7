"""Memory features for long-context training: offloaded checkpointing, tiled MLP, frozen embeddings off GPU."""

from cpt_plugin.offload.checkpointing import checkpointing_mode, enable_checkpointing, offload_pool_stats
from cpt_plugin.offload.embeddings import (
    offload_frozen_embeddings,
    offloaded_bytes,
    restore_frozen_embeddings,
)
from cpt_plugin.offload.tiled_mlp import disable_tiled_mlp, enable_tiled_mlp, tiled_mlp

__all__ = [
    "checkpointing_mode",
    "disable_tiled_mlp",
    "enable_checkpointing",
    "enable_tiled_mlp",
    "offload_frozen_embeddings",
    "offload_pool_stats",
    "offloaded_bytes",
    "restore_frozen_embeddings",
    "tiled_mlp",
]
