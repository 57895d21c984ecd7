"""Streaming with bounded memory: documents in pieces, exact tokens at the joins, peak RSS flat in length."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

from cpt_plugin.data import (
    SPLITS,
    CPTDataset,
    iter_document_pieces,
    iter_documents,
    tokenize_pieces,
)

WORDS = ["the", "cat", "sat", "on", "mat", "def", "return", "x1", "12345", "café", "中文", "(", ")", ":", "."]
SEPARATORS = [" ", "  ", "   ", "\n", "\n\n", ".\n", " \n ", "\t", "\r\n", "\r", " \n\n  \n", ""]


def _text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(words))


# ------------------------------------------------------------------------------------------------
# Pieces are the documents, cut
# ------------------------------------------------------------------------------------------------
def _reference_documents(path, split):
    """The documents as the whole-file reader of earlier versions read them."""
    if split == "file":
        docs = [path.read_bytes().decode("utf-8-sig")]
    else:
        with open(path, encoding="utf-8-sig") as handle:
            lines = list(handle)
        if split == "line":
            docs = [line.rstrip("\r\n") for line in lines]
        else:
            docs, paragraph = [], []
            for line in lines:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    docs.append("".join(paragraph).rstrip("\r\n"))
                    paragraph = []
            if paragraph:
                docs.append("".join(paragraph).rstrip("\r\n"))
    return [doc for doc in docs if doc and not doc.isspace()]


@pytest.mark.parametrize("split", SPLITS)
def test_pieces_join_to_the_documents(tmp_path, split):
    rng = random.Random(split)
    for trial in range(6):
        path = tmp_path / f"{trial}.txt"
        text = _text(rng, rng.randint(1, 3000)) + rng.choice(["", "\n", "  "])
        path.write_bytes(("\ufeff" if trial == 1 else "").encode() + text.encode("utf-8"))
        expected = _reference_documents(path, split)
        assert list(iter_documents(path, split=split)) == expected
        for chunk_chars in (5, 64):
            pieces = list(iter_document_pieces(path, split=split, chunk_chars=chunk_chars))
            docs, parts = [], []
            for piece, end in pieces:
                parts.append(piece)
                if end:
                    docs.append("".join(parts))
                    parts = []
            assert docs == expected and not parts
            assert max(len(piece) for piece, _ in pieces) <= 8 * chunk_chars


# ------------------------------------------------------------------------------------------------
# Tokens at the joins equal whole-text tokens
# ------------------------------------------------------------------------------------------------
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe(kind: str):
    """A small trained BPE in the style of a real family: GPT-2, Llama 3, SentencePiece (new and legacy)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    elif kind == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif kind == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        alphabet = []
    else:  # Llama 2's legacy tokenizer.json: "▁" prepended by the normalizer to every call, no pre-tokenizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # for training only
        alphabet = []
    rng = random.Random(0)
    corpus = [_text(rng, 200) for _ in range(40)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>", "<unk>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if kind == "sp_legacy":
        tok.pre_tokenizer = None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "metaspace", "sp_legacy"])
def test_chunked_tokens_equal_whole_text_tokens(kind):
    tokenizer = _bpe(kind)
    rng = random.Random(kind)
    naive_differs = 0
    for _ in range(12):
        text = _text(rng, 300).replace("\r", "")
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        for chunk_chars in (16, 41):
            pieces = list(iter_document_pieces([text], chunk_chars=chunk_chars))
            assert len(pieces) > 10
            tokens = [t for ids, _ in tokenize_pieces(pieces, tokenizer, add_bos=False) for t in ids]
            assert tokens == whole
            naive = [
                t for piece, _ in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]
            ]
            naive_differs += naive != whole
    # the legacy SentencePiece file adds "▁" to every call: pieces tokenized alone would get it at each cut
    assert naive_differs == (24 if kind == "sp_legacy" else 0)


def test_dataset_blocks_equal_whatever_the_chunk_size(tmp_path):
    """The packing contract is kept across pieces: same blocks as with every document whole."""
    from tests.test_data import _word_tokenizer

    rng = random.Random(3)
    words = "alpha beta gamma delta  epsilon\tzeta".split(" ")
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400))) for _ in range(30)]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    for tokenizer in (_word_tokenizer(), _word_tokenizer(bos_post_processor=True)):
        for kwargs in ({}, {"replay_source": lines[::-1], "replay_ratio": 0.3}):
            whole = list(
                CPTDataset(path, tokenizer, 37, split="line", chunk_chars=10**9, **kwargs).iter_blocks()
            )
            cut = list(CPTDataset(path, tokenizer, 37, split="line", chunk_chars=7, **kwargs).iter_blocks())
            assert len(whole) > 20 and cut == whole


# ------------------------------------------------------------------------------------------------
# Peak memory does not grow with the length of a document
# ------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import random, resource, sys
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from cpt_plugin.data import CPTDataset

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    vocab = {"</s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(100_000)) + " "
    # A fresh allocation cap: the whole-document reader needed GBs here and fails with MemoryError.
    with open("/proc/self/status") as status:
        vm = next(int(l.split()[1]) for l in status if l.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1536 << 20), resource.RLIM_INFINITY))
    for megabytes in (5, 50):
        path = f"{sys.argv[1]}/{megabytes}.txt"
        with open(path, "w") as handle:  # one document, no line break
            for _ in range(megabytes * 1_000_000 // len(line) + 1):
                handle.write(line)
        blocks = CPTDataset(path, tok, 512).iter_blocks()
        for _ in range(100):
            next(blocks)
        print(megabytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)
    """
)


def test_peak_memory_does_not_grow_with_document_length(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = dict(line.split() for line in result.stdout.split("\n") if line)
    small, large = int(peaks["5"]), int(peaks["50"])
    assert large - small < 32, f"peak RSS {small} MiB at 5 MB, {large} MiB at 50 MB"
