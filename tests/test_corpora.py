"""Offline default corpora (stdlib prose vs stdlib code) and the byte-level BPE tokenizer."""

from __future__ import annotations

import json

import pytest

from cpt_plugin.cli.corpora import train_tokenizer, write_default_corpora
from cpt_plugin.data import CPTDataset, iter_documents


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return write_default_corpora(tmp_path_factory.mktemp("corpora"), max_mb=0.3)


def _names(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["name"] for line in handle]


def test_corpora_written_split_and_small(corpora):
    assert set(corpora) == {"old_train", "old_heldout", "new_train", "new_heldout"}
    for key, path in corpora.items():
        assert path.is_file() and path.stat().st_size > 0, key
        assert list(iter_documents(path)), key
    # each domain stays near the budget: one document may overshoot it
    assert corpora["new_train"].stat().st_size + corpora["new_heldout"].stat().st_size < 1_000_000
    for domain in ("old", "new"):
        assert not set(_names(corpora[f"{domain}_train"])) & set(_names(corpora[f"{domain}_heldout"]))
    # a held-out module's docstrings (old domain) never sit inside a new-domain training document
    assert not set(_names(corpora["old_heldout"])) & set(_names(corpora["new_train"]))
    code = next(iter_documents(corpora["new_train"]))
    assert "def " in code or "import " in code
    prose = list(iter_documents(corpora["old_train"]))
    assert any("Python" in doc for doc in prose)
    assert not any(name.split("/")[-1].startswith("test_") for name in _names(corpora["new_train"]))


def test_corpora_deterministic(corpora, tmp_path):
    again = write_default_corpora(tmp_path, max_mb=0.3)
    for key in corpora:
        assert again[key].read_bytes() == corpora[key].read_bytes(), key


def test_tokenizer_trains_round_trips_and_reloads(corpora, tmp_path):
    from transformers import AutoTokenizer

    paths = [corpora["old_train"], corpora["new_train"]]
    tok = train_tokenizer(paths, vocab_size=512, out_dir=tmp_path / "tok")
    assert len(tok) == 512
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id is not None
    text = "def f(x):\n    return x ** 2  # café ✓\n\nThe quick brown fox."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.eos_token_id == tok.eos_token_id
    twice = train_tokenizer(paths, vocab_size=512)
    assert twice.get_vocab() == tok.get_vocab()
    blocks = list(CPTDataset(corpora["new_heldout"], tok, max_seq_length=128))
    assert blocks and all(b["input_ids"].shape == (128,) for b in blocks)
