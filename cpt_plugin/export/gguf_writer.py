"""GGUF export of a merged checkpoint through the ``gguf`` package, with a read-back check.

``to_gguf(merged_dir, out_file, outtype)`` writes one GGUF file (f16, bf16 or q8_0) following llama.cpp's
conventions for the family (gguf_families.py), with the tokenizer (gguf_vocab.py), and then, unless
``check=False``, loads the file with transformers' own GGUF loader and compares its logits with the
merged model's (readback.py). Everything is checked before the file is written, the file is written
under a temporary name, and it only gets its name once the read-back passed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt_plugin import CPTConfigError
from cpt_plugin.export.gguf_families import GGUFFamily, family_for, llama3_rope_factors, permute_qk
from cpt_plugin.export.gguf_vocab import GGUFVocab, vocab_from_tokenizer, write_vocab
from cpt_plugin.export.paths import atomic_file, check_new_output

logger = logging.getLogger(__name__)

OUTTYPES = ("f16", "bf16", "q8_0")
_Q8_BLOCK = 32


def _weight_files(merged_dir: Path) -> list[Path]:
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [merged_dir / name for name in names]
    single = merged_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise CPTConfigError(
        f"cpt-plugin export: {merged_dir} has no model.safetensors (or index). GGUF export reads a merged "
        "checkpoint: run the merged export first (cpt_plugin.export.merge / --to merged)."
    )


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                shapes[key] = (path, tuple(handle.get_slice(key).get_shape()))
    return shapes


def _qtype(outtype: str, shape: tuple[int, ...]) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32  # norms and biases stay f32, as llama.cpp writes them
    if outtype == "bf16":
        return Q.BF16
    if outtype == "q8_0" and shape[-1] % _Q8_BLOCK == 0:
        return Q.Q8_0
    return Q.F16  # f16, and q8_0 rows that are not a whole number of 32-value blocks


def _plan(config: Any, family: GGUFFamily, shapes: dict) -> list[tuple[str, str]]:
    """(safetensors key, GGUF name) for every tensor, checked before anything is written."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    if "lm_head.weight" in shapes and not family.has_output:
        raise CPTConfigError(
            f"cpt-plugin export: the merged {config.model_type} model has an untied lm_head, but llama.cpp's "
            f"{family.arch} architecture has no output tensor (it always uses the input embeddings). Train with "
            "tied embeddings (the default for this family), or use the merged export."
        )
    plan, unknown = [], []
    for key in shapes:
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(key)
        else:
            plan.append((key, gguf_name))
    if unknown:
        raise CPTConfigError(
            f"cpt-plugin export: {len(unknown)} tensors of the {config.model_type} checkpoint have no GGUF name "
            f"for architecture {family.arch!r} (e.g. {unknown[:3]}). Is this a plain {config.model_type} "
            "checkpoint written by the merged export?"
        )
    return plan


def _tensor_data(key: str, tensor: torch.Tensor, config: Any, family: GGUFFamily) -> np.ndarray:
    data = tensor.float()
    if family.permute_qk and key.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in key else config.num_key_value_heads
        data = permute_qk(data, heads)
    if family.norm_offset and key.endswith("norm.weight"):
        data = data + family.norm_offset
    return data.numpy()


def _quantized(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quantize(data, qtype)


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType

    return {
        "f16": LlamaFileType.MOSTLY_F16,
        "bf16": LlamaFileType.MOSTLY_BF16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
    }[outtype]


def _write(
    tmp: Path,
    merged_dir: Path,
    config: Any,
    family: GGUFFamily,
    vocab: GGUFVocab,
    plan: list[tuple[str, str]],
    shapes: dict,
    outtype: str,
) -> None:
    import gguf
    from safetensors import safe_open

    writer = gguf.GGUFWriter(str(tmp), family.arch)
    writer.add_name(merged_dir.name)
    family.write_hparams(writer, config)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    handles = {path: safe_open(str(path), "pt") for path in {path for path, _ in shapes.values()}}
    for key, gguf_name in plan:
        path, shape = shapes[key]
        data = _tensor_data(key, handles[path].get_tensor(key), config, family)
        qtype = _qtype(outtype, shape)
        writer.add_tensor(gguf_name, _quantized(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _load_tokenizer(tokenizer: Any, merged_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    source = Path(tokenizer) if tokenizer is not None else merged_dir
    if not (source / "tokenizer.json").is_file():
        raise CPTConfigError(
            f"cpt-plugin export: no tokenizer.json in {source}; a GGUF file must carry the tokenizer. Pass "
            "tokenizer= (CLI: the merged export saves the tokenizer it finds beside the adapter; put it there, "
            "or pass merge(..., tokenizer=...))."
        )
    return AutoTokenizer.from_pretrained(str(source))


def to_gguf(
    merged_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    outtype: str = "f16",
    *,
    check: bool = True,
    tokenizer: Any | None = None,
) -> Path:
    """Writes ``merged_dir`` (a merged export) as one GGUF file and returns its path.

    ``outtype``: "f16", "bf16" or "q8_0" (norms and biases stay f32; q8_0 rows whose length is not a multiple
    of 32 are written f16). ``check``: load the file with transformers' GGUF loader and compare its logits
    with the merged model's before the file gets its name (bounds in readback.py). ``tokenizer``: a
    tokenizer or its directory (default: the one saved in ``merged_dir``).
    """
    from transformers import AutoConfig

    started = time.perf_counter()
    if outtype not in OUTTYPES:
        raise CPTConfigError(
            f"cpt-plugin export: GGUF outtype {outtype!r} is not one of {', '.join(OUTTYPES)}. Pick one of them."
        )
    out = check_new_output(out_file, "GGUF")
    if out.suffix != ".gguf":
        raise CPTConfigError(f"cpt-plugin export: the GGUF output {out} should end in .gguf. Rename it.")
    merged_dir = Path(merged_dir).expanduser().absolute()
    if not (merged_dir / "config.json").is_file():
        raise CPTConfigError(
            f"cpt-plugin export: {merged_dir} is not a merged model directory (no config.json). Run the merged "
            "export first (cpt_plugin.export.merge / --to merged) and pass its directory."
        )
    config = AutoConfig.from_pretrained(str(merged_dir))
    family = family_for(config)
    files = _weight_files(merged_dir)
    shapes = _tensor_shapes(files)
    plan = _plan(config, family, shapes)
    rows = shapes[next(key for key, name in plan if name == "token_embd.weight")][1][0]
    if rows != config.vocab_size:
        raise CPTConfigError(
            f"cpt-plugin export: {merged_dir}/config.json says vocab_size={config.vocab_size} but the embeddings "
            f"have {rows} rows. Re-run the merged export (it writes them consistent)."
        )
    tok = _load_tokenizer(tokenizer, merged_dir)
    from cpt_plugin.export.merging import check_vocabulary

    check_vocabulary(rows, tok, f"of {merged_dir}")
    vocab = vocab_from_tokenizer(tok, rows)
    if check:
        from cpt_plugin.export.readback import check_supported

        check_supported(family.arch)
    with atomic_file(out) as tmp:
        _write(tmp, merged_dir, config, family, vocab, plan, shapes, outtype)
        error = None
        if check:
            from cpt_plugin.export.readback import read_back

            error = read_back(tmp, merged_dir, outtype, tok)
    logger.info(
        "cpt-plugin: GGUF written to %s (%s, %s, %.1f MB%s) in %.1f s",
        out,
        family.arch,
        outtype,
        out.stat().st_size / 1e6,
        f", read back by transformers: logits relative error {error:.1e}" if error is not None else "",
        time.perf_counter() - started,
    )
    return out
