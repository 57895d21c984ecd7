"""GGUF export: transformers' own GGUF loader reads the file back to the adapter model's logits."""

from __future__ import annotations

import pytest
import torch

from cpt_plugin.export import merge, to_gguf
from cpt_plugin.export.readback import TOLERANCE
from tests.export.helpers import VOCAB, byte_bpe_tokenizer, cpt_model, relative_error, sample_ids
from tests.patching.models import FAMILIES

# Settings transformers' GGUF loader does not read from the file (the exporter writes them for llama.cpp).
UNREAD = {
    "qwen3": ("head_dim",),
    "gemma2": ("query_pre_attn_scalar",),
    "gemma3_text": ("final_logit_softcapping", "query_pre_attn_scalar"),
}
CASES = [(f, t) for f in FAMILIES for t in (True, False) if not (f == "gemma2" and not t)]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """(adapter model logits, merged dir) per (family, tied), merged once per module."""
    cache = {}

    def get(family, tied):
        if (family, tied) not in cache:
            model = cpt_model(family, tied)
            with torch.no_grad():
                logits = model(input_ids=sample_ids()).logits.float()
            out = tmp_path_factory.mktemp(f"{family}-{tied}") / "merged"
            cache[family, tied] = logits, merge(model, out, tokenizer=tokenizer)
        return cache[family, tied]

    return get


def _load_gguf(path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_plugin.patching.registry import unpatch

    unpatch()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    merged = AutoConfig.from_pretrained(str(path.parent.parent / "merged"))
    for key in UNREAD.get(family, ()):
        setattr(config, key, getattr(merged, key))
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    ).eval()


def _tensor_names_and_vocab(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return {t.name for t in reader.tensors}, len(tokens.data)


@pytest.mark.parametrize(
    ("family", "tied"), CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES]
)
def test_f16_gguf_reads_back_to_adapter_logits(family, tied, exported, tokenizer):
    want, merged = exported(family, tied)
    path = to_gguf(merged, merged.parent / "gguf" / "model.gguf", "f16")
    names, n_tokens = _tensor_names_and_vocab(path)
    assert ("output.weight" in names) is not tied  # tied: no separate output tensor
    assert "token_embd.weight" in names and n_tokens == VOCAB  # tokens padded to the embedding rows
    model = _load_gguf(path, family)
    assert model.config.vocab_size == VOCAB and model.config.tie_word_embeddings is tied
    with torch.no_grad():
        got = model(input_ids=sample_ids()).logits
    # against the bf16 adapter model: the merged bf16 model's own distance (test_merge.py) dominates
    assert relative_error(got, want) < 2e-2


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
@pytest.mark.parametrize(("family", "tied"), [("llama", True), ("qwen3", False), ("gemma3_text", True)])
def test_other_outtypes_read_back(family, tied, outtype, exported):
    from gguf import GGMLQuantizationType, GGUFReader

    want, merged = exported(family, tied)
    path = to_gguf(merged, merged.parent / outtype / "model.gguf", outtype)
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    expected = GGMLQuantizationType.BF16 if outtype == "bf16" else GGMLQuantizationType.Q8_0
    assert (
        types["blk.0.attn_q.weight"] == expected and types["output_norm.weight"] == GGMLQuantizationType.F32
    )
    with torch.no_grad():
        got = _load_gguf(path, family)(input_ids=sample_ids()).logits
    assert relative_error(got, want) < (2e-2 if outtype == "bf16" else 2e-2 + TOLERANCE["q8_0"])


def test_gguf_tokenizer_reads_back(exported, tokenizer):
    from transformers import AutoTokenizer

    _, merged = exported("llama", True)
    path = to_gguf(merged, merged.parent / "tok" / "model.gguf", "f16")
    reloaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "def merge(adapter):\n    return 'caf\u00e9 \u2713'  # The quick brown fox"
    assert (
        reloaded(text, add_special_tokens=False)["input_ids"]
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    # the ids llama.cpp reads
    from gguf import GGUFReader
    from packaging.version import Version
    from transformers import __version__ as transformers_version

    fields = GGUFReader(str(path)).fields
    token = {int(fields[f"tokenizer.ggml.{k}_token_id"].parts[-1][0]): k for k in ("bos", "eos")}
    assert {reloaded.convert_ids_to_tokens(i): k for i, k in token.items()} == {"<s>": "bos", "</s>": "eos"}
    # transformers 5.17's GGUF tokenizer converter takes the eos token from the bos id (its ggml.py);
    # the newest release reads both right
    if Version(transformers_version) >= Version("5.24"):
        assert reloaded.eos_token == "</s>" and reloaded.bos_token == "<s>"


def test_llama3_rope_is_written_as_rope_freqs(tmp_path, tokenizer):
    """Llama 3 RoPE scaling (Llama 3.2 1B) goes into llama.cpp's rope_freqs tensor; the read-back passes."""
    from gguf import GGUFReader

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    model = cpt_model("llama", True, rope_parameters=rope)
    merged = merge(model, tmp_path / "merged", tokenizer=tokenizer)
    path = to_gguf(merged, tmp_path / "model.gguf")
    factors = next(t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight").data
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = model.get_base_model().config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    # llama.cpp divides each frequency by its factor: the same frequencies transformers uses
    torch.testing.assert_close(torch.from_numpy(factors.copy()), plain / scaled, rtol=1e-5, atol=1e-6)


def test_pre_tokenizer_names_do_not_need_transformers_table(monkeypatch):
    """transformers 5.17 (the GPU image's) has no GGUF_PRE_TOKENIZER_SPLITS: the GGUF export failed there
    with an ImportError. Our table names the same splits, and equals transformers' where it exists."""
    import transformers.integrations.gguf.gguf_tokenizer_mapping as mapping

    from cpt_plugin.export import gguf_vocab

    newest = getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", None)
    if newest is not None:
        for name, regex in gguf_vocab.KNOWN_SPLITS.items():
            assert newest[name] == regex, name
        monkeypatch.delattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS")
    for name, regex in gguf_vocab.KNOWN_SPLITS.items():
        spec = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ]}}  # fmt: skip
        assert gguf_vocab._gpt2_pre_name(spec) == name
