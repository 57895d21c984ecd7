"""Raw text -> tokenized documents -> packed fixed-length blocks, with token-level replay mixing.

The package, one module per job: ``sources`` (every kind of source -> documents, as pieces), ``packing``
(tokenizing, packing into blocks, replay mixing), ``dataset`` (CPTDataset and its helpers), ``checks``
(pre-flight checks of a source and the errors the readers raise). The public names are re-exported here.

Everything streams, with memory bounded whatever the length of a document: text files are read and
decoded in blocks, documents travel as pieces of about ``chunk_chars`` characters (:func:`iter_document_pieces`),
pieces are tokenized in batches of bounded size and packed as they come. A corpus larger than RAM, or one
document of several GB, trains without being materialized. Iteration is deterministic for a given source
and seed, which the HF Trainer relies on when it resumes from a checkpoint (it re-iterates and skips the
batches it has already seen).

Chunk joins: a document is cut only before a space that follows a non-space character, a point where
byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece (Llama 2, Mistral, Gemma) tokenizers always
start a new pre-token; each later piece is tokenized behind the last word of the piece before it (an
"anchor", whose tokens are dropped), so prefix-space and "▁" rules apply as inside the whole text. The
tokens equal those of the whole document. A document with no such space in ``8 * chunk_chars`` characters
is cut after a line break followed by a letter or digit, else anywhere (tokens there may differ).

Packing contract (see :func:`pack_documents`):
- every document ends with EOS, so two documents are never joined without one;
- ``position_ids`` restart at 0 at every document start and at every block start, which lets
  transformers' SDPA / flash-attention paths keep documents apart (they detect packed sequences from
  ``position_ids`` when no ``attention_mask`` is given and no KV cache is used);
- the label of every document's first token is -100, so no token is trained to follow a foreign
  document; the label at block position 0 is always -100 as well (HF causal-LM losses shift labels
  left, so that label is never a target anyway, and masking it keeps ``num_items_in_batch`` exact);
- the final partial block is dropped by default (``drop_last=False`` pads it instead).

Special tokens: documents are tokenized with ``add_special_tokens=False``; EOS is appended to every
document, and BOS is prepended only when the tokenizer adds one by itself (Llama, Gemma: the model was
pretrained with it; Qwen adds none), so each packed document looks like a document the model has seen.

Sources are checked before training by :func:`cpt_plugin.data.checks.validate_source` (``CPTDataset``
calls it); the readers here raise the same errors, with file, line and byte, for what lies past the check.
"""

from __future__ import annotations

from cpt_plugin.data.checks import SPLITS, DataSourceError, validate_source
from cpt_plugin.data.dataset import CPTDataset, collate_packed, count_tokens, estimate_steps, materialize
from cpt_plugin.data.packing import (
    IGNORE_INDEX,
    mix_replay,
    mix_replay_pieces,
    pack_documents,
    pack_pieces,
    tokenize_documents,
    tokenize_pieces,
)
from cpt_plugin.data.sources import CHUNK_CHARS, iter_document_pieces, iter_documents

__all__ = [
    "IGNORE_INDEX", "SPLITS", "CHUNK_CHARS", "DataSourceError", "CPTDataset",
    "collate_packed", "count_tokens", "estimate_steps", "iter_document_pieces", "iter_documents",
    "materialize", "mix_replay", "mix_replay_pieces", "pack_documents", "pack_pieces", "tokenize_documents",
    "tokenize_pieces", "validate_source",
]  # fmt: skip
