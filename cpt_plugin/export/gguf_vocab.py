"""The tokenizer as GGUF metadata (``tokenizer.ggml.*``), from a transformers fast tokenizer.

Two tokenizer kinds are written, the ones the supported families use:
- byte-level BPE (Llama 3, Qwen 2/3, GPT-2-style tokenizers trained with the ``tokenizers`` library):
  ``tokenizer.ggml.model = "gpt2"`` with tokens, merges and a pre-tokenizer name;
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma as ``tokenizer.json``):
  ``"llama"`` with tokens, scores, merges and byte tokens marked.
The token list always has exactly as many entries as the embedding matrix has rows: ids no token uses
are written as ``[PAD<id>]`` of type UNUSED, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from cpt_plugin import CPTConfigError

logger = logging.getLogger(__name__)

NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None


def _pre_tokenizer_kinds(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        return [p for part in spec.get("pretokenizers", []) for p in _pre_tokenizer_kinds(part)]
    return [spec]


# llama.cpp's pre-tokenizer names for the split patterns of the tokenizers of the families we export
# (the ``Split`` regex in their tokenizer.json). transformers ships this table from 5.2x on as
# ``GGUF_PRE_TOKENIZER_SPLITS``; older releases (the GPU image's 5.17) do not, and the export failed there.
KNOWN_SPLITS: dict[str, str] = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-4o": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "tekken": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _known_splits() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # transformers before the table existed
        return KNOWN_SPLITS
    return {**KNOWN_SPLITS, **GGUF_PRE_TOKENIZER_SPLITS}


def _gpt2_pre_name(spec: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE."""
    splits_by_name = _known_splits()
    parts = _pre_tokenizer_kinds(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1:
        regex = splits[0].get("pattern", {}).get("Regex")
        for preferred in ("llama-bpe", "qwen2", "gpt-4o", "tekken"):
            if splits_by_name.get(preferred) == regex:
                return preferred
    logger.warning(
        "cpt-plugin export: the tokenizer's pre-tokenizer (%s) is not one cpt-plugin can name for llama.cpp; "
        "the GGUF says 'default', so llama.cpp may split text differently from transformers.",
        "+".join(str(k) for k in kinds) or "none",
    )
    return "default"


def _kind(spec: dict) -> str:
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CPTConfigError(
            f"cpt-plugin export: the tokenizer is a {model.get('type')!r} model; cpt-plugin writes BPE "
            "tokenizers to GGUF (byte-level as in Llama 3 and Qwen, or SentencePiece-style with byte fallback "
            "as in Llama 2, Mistral and Gemma). Convert the merged model with llama.cpp's convert_hf_to_gguf.py."
        )
    parts = _pre_tokenizer_kinds(spec.get("pre_tokenizer")) + _pre_tokenizer_kinds(spec.get("decoder"))
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "gpt2"
    if model.get("byte_fallback") or any(p.get("type") in ("Metaspace", "ByteFallback") for p in parts):
        return "llama"
    raise CPTConfigError(
        "cpt-plugin export: the tokenizer is BPE but neither byte-level nor SentencePiece-style (no ByteLevel, "
        "Metaspace or byte fallback in tokenizer.json), so llama.cpp could not reproduce it. Convert the merged "
        "model with llama.cpp's convert_hf_to_gguf.py."
    )


def vocab_from_tokenizer(tokenizer: Any, rows: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` padded to ``rows`` entries (the embedding rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CPTConfigError(
            f"cpt-plugin export: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; GGUF export "
            "reads tokenizer.json. Save a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    spec = json.loads(backend.to_str())
    kind = _kind(spec)
    by_id: dict[int, str] = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= rows:
        raise CPTConfigError(
            f"cpt-plugin export: the tokenizer uses token id {max(by_id)} but the model's embeddings have only "
            f"{rows} rows. Resize the model (model.resize_token_embeddings(len(tokenizer))) before training, or "
            "pass the tokenizer the model was trained with."
        )
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].special else USER_DEFINED)
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            tokens.append(token)
            types.append(BYTE)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special_ids = {
        name: int(value)
        for name in ("bos", "eos", "unk", "pad")
        if (value := getattr(tokenizer, f"{name}_token_id", None)) is not None
    }
    return GGUFVocab(
        model=kind,
        pre=_gpt2_pre_name(spec) if kind == "gpt2" else "default",
        tokens=tokens,
        token_types=types,
        merges=merges,
        scores=[-float(i) for i in range(rows)] if kind == "llama" else [],
        special_ids=special_ids,
        add_bos=getattr(tokenizer, "add_bos_token", None),
        add_eos=getattr(tokenizer, "add_eos_token", None),
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(bool(vocab.add_bos))
    if vocab.add_eos is not None:
        writer.add_add_eos_token(bool(vocab.add_eos))
    if isinstance(vocab.chat_template, str):
        writer.add_chat_template(vocab.chat_template)
