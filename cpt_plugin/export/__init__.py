"""Taking the trained model out: a merged 16-bit checkpoint, and GGUF for llama.cpp and friends.

``merge(adapter_or_model, out_dir)`` writes a plain transformers checkpoint (safetensors) with the LoRA
merged and the trained embeddings in the model dtype; ``to_gguf(merged_dir, out_file)`` converts such a
checkpoint to one GGUF file and checks that transformers' GGUF loader reads it back to the same logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpt_plugin._lazy import lazy_getattr

__all__ = ["merge", "to_gguf", "GGUF_FAMILIES"]

_LAZY = {
    "merge": "cpt_plugin.export.merging",
    "to_gguf": "cpt_plugin.export.gguf_writer",
    "GGUF_FAMILIES": "cpt_plugin.export.gguf_families",
}

if TYPE_CHECKING:  # pragma: no cover
    from cpt_plugin.export.gguf_families import GGUF_FAMILIES
    from cpt_plugin.export.gguf_writer import to_gguf
    from cpt_plugin.export.merging import merge


__getattr__ = lazy_getattr(__name__, _LAZY)
