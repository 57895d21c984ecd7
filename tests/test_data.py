"""Data pipeline: sources, packing contract, replay mixing, CPTDataset determinism and sharding."""

from __future__ import annotations

import gzip
import json
import logging
import random
import warnings

import pytest
import torch

from cpt_plugin.data import (
    IGNORE_INDEX,
    CPTDataset,
    DataSourceError,
    collate_packed,
    count_tokens,
    iter_documents,
    materialize,
    mix_replay,
    pack_documents,
)

EOS = 0


# ------------------------------------------------------------------------------------------------
# Tokenizers (tiny, offline)
# ------------------------------------------------------------------------------------------------
WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)


def _word_tokenizer(eos: bool = True, bos_post_processor: bool = False):
    """A word-level tokenizer over WORDS plus doc markers d0..d999: one token per word, exact counts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<s>": 1, "<unk>": 2, "<pad>": 3}
    for word in WORDS + [f"d{i}" for i in range(1000)]:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>"}
    if eos:
        special["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def _docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join([f"d{i}"] + [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))])
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------
def _check_blocks(blocks, docs, block_size, eos):
    stream = [t for doc in docs for t in (doc if doc[-1] == eos else doc + [eos])]
    starts = set()
    offset = 0
    for doc in docs:
        starts.add(offset)
        offset += len(doc) if doc[-1] == eos else len(doc) + 1
    assert all(
        len(b["input_ids"]) == len(b["labels"]) == len(b["position_ids"]) == block_size for b in blocks
    )
    flat = [t for b in blocks for t in b["input_ids"]]
    assert flat == stream[: len(flat)]  # never joined without EOS: the stream has EOS after every doc
    assert len(stream) - len(flat) < block_size
    for index, block in enumerate(blocks):
        for pos in range(block_size):
            global_index = index * block_size + pos
            doc_start = global_index in starts
            if doc_start or pos == 0:
                assert block["position_ids"][pos] == 0
                assert block["labels"][pos] == IGNORE_INDEX
            else:
                assert block["position_ids"][pos] == block["position_ids"][pos - 1] + 1
                assert block["labels"][pos] == block["input_ids"][pos]
            if doc_start and global_index > 0:
                assert flat[global_index - 1] == eos


@pytest.mark.parametrize("block_size", [1, 7, 16, 33])
def test_pack_contract(block_size):
    rng = random.Random(block_size)
    docs = [[rng.randint(1, 50) for _ in range(rng.randint(1, 40))] for _ in range(60)]
    docs[5] = docs[5] + [EOS]  # already ends with EOS: not doubled
    blocks = list(pack_documents(docs, block_size, EOS))
    assert blocks
    _check_blocks(blocks, docs, block_size, EOS)


def test_pack_pads_final_block_when_asked():
    blocks = list(pack_documents([[5, 6, 7], [8, 9]], 4, EOS, drop_last=False, pad_token_id=3))
    assert len(blocks) == 2
    assert blocks[0]["input_ids"] == [5, 6, 7, EOS]
    assert blocks[1]["input_ids"] == [8, 9, EOS, 3]
    assert blocks[1]["labels"] == [IGNORE_INDEX, 9, EOS, IGNORE_INDEX]
    assert blocks[1]["position_ids"] == [0, 1, 2, 0]
    assert list(pack_documents([[5, 6, 7], [8, 9]], 4, EOS)) == blocks[:1]  # default drops the tail


def test_packed_position_ids_separate_documents_in_attention():
    """transformers' SDPA path must not attend across documents for our collated batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    a, b = [4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]
    batch = collate_packed(list(pack_documents([a, b, [20] * 10], 13, EOS)))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        alone = model(input_ids=torch.tensor([b + [EOS]]), use_cache=False).logits
    torch.testing.assert_close(packed[0, 6:13], alone[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Replay
# ------------------------------------------------------------------------------------------------
def _token_docs(n, offset, seed):
    rng = random.Random(seed)
    return [[offset + rng.randint(1, 99) for _ in range(rng.randint(5, 60))] for _ in range(n)]


@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5])
def test_replay_fraction_within_one_percent(ratio):
    new = _token_docs(400, 0, 1)  # ~13k tokens
    replay = _token_docs(600, 1000, 2)  # enough not to cycle at ratio 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = list(mix_replay(new, replay, ratio, seed=3))
    total = sum(len(d) for d in out)
    replayed = sum(len(d) for d in out if d[0] >= 1000)
    assert total >= 10_000
    assert abs(replayed / total - ratio) <= 0.01
    assert [d for d in out if d[0] < 1000] == new  # every new doc once, in order


def test_replay_deterministic_and_seed_dependent():
    new, replay = _token_docs(300, 0, 1), _token_docs(300, 1000, 2)
    first = list(mix_replay(new, replay, 0.25, seed=7))
    assert first == list(mix_replay(new, replay, 0.25, seed=7))
    assert first != list(mix_replay(new, replay, 0.25, seed=8))


def test_replay_ratio_zero_leaves_replay_untouched():
    class Untouchable:
        def __iter__(self):
            raise AssertionError("replay corpus was read")

    new = _token_docs(10, 0, 1)
    assert list(mix_replay(new, Untouchable(), 0.0, seed=0)) == new


def test_replay_cycles_with_one_warning():
    new, replay = _token_docs(200, 0, 1), _token_docs(3, 1000, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(mix_replay(new, replay, 0.3, seed=0))
    assert sum(1 for w in caught if "replay corpus ran out" in str(w.message)) == 1
    assert sum(len(d) for d in out if d[0] >= 1000) > 3 * 60


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
def test_text_file_splits(tmp_path):
    path = tmp_path / "a.md"
    path.write_text("one two\nthree\n\n\nfour\n\nfive six\n", encoding="utf-8")
    assert list(iter_documents(path)) == [path.read_text()]
    assert list(iter_documents(path, split="blank_lines")) == ["one two\nthree", "four", "five six"]
    assert list(iter_documents(str(path), split="line")) == ["one two", "three", "four", "five six"]


def test_folder_recursive_sorted_skips_binaries(tmp_path, caplog):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_text("print('z')", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cpt_plugin.data"):
        docs = list(iter_documents(tmp_path))
    assert docs == ["first", "third", "from jsonl", "print('z')"]
    assert "skipped 2 binary or non-UTF-8 file(s)" in caplog.text


def test_jsonl_and_gz(tmp_path):
    rows = [{"content": "a b", "id": 1}, {"content": "c", "id": 2}, {"content": "", "id": 3}]
    plain = tmp_path / "d.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    packed = tmp_path / "d.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows))
    assert list(iter_documents(plain, text_field="content")) == ["a b", "c"]
    assert list(iter_documents(packed, text_field="content")) == ["a b", "c"]
    with pytest.raises(DataSourceError, match=r"no field 'text' \(fields: content, id\).*text_field="):
        list(iter_documents(plain))


def test_datasets_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": ["x y", "z", None], "n": [1, 2, 3]})
    assert list(iter_documents(ds, text_field="body")) == ["x y", "z"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(tmp_path / "saved", text_field="body")) == ["x y", "z"]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert list(iter_documents(tmp_path / "saved_dict", text_field="body")) == ["x y", "z"]
    assert list(iter_documents(ds.to_iterable_dataset(), text_field="body")) == ["x y", "z"]
    with pytest.raises(DataSourceError, match=r"no field 'text' \(fields: body, n\)"):
        list(iter_documents(ds))
    with pytest.raises(DataSourceError, match="no 'train' split"):
        list(iter_documents(datasets.DatasetDict({"test": ds}), text_field="body"))


def test_iterables_and_callables():
    assert list(iter_documents(["a", "", "  ", "b"])) == ["a", "b"]
    assert list(iter_documents(lambda: iter(["a", "b"]))) == ["a", "b"]
    assert list(iter_documents([{"text": "a"}])) == ["a"]


def test_source_errors(tmp_path):
    with pytest.raises(DataSourceError, match=r"'.*nope\.txt' does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"empty\.txt' has no documents"):
        list(iter_documents(tmp_path / "empty.txt"))
    with pytest.raises(DataSourceError, match="has no documents"):
        list(iter_documents([]))
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataSourceError, match=r"latin\.txt' is not UTF-8 text"):
        list(iter_documents(tmp_path / "latin.txt"))
    with pytest.raises(DataSourceError, match="yielded a int"):
        list(iter_documents([1, 2]))


# ------------------------------------------------------------------------------------------------
# CPTDataset
# ------------------------------------------------------------------------------------------------
def _decode_doc_ids(blocks, tokenizer):
    """Doc markers (d<i>) seen at segment starts, in order."""
    first_marker = tokenizer.convert_tokens_to_ids("d0")
    seen = []
    for block in blocks:
        for token in block["input_ids"]:
            token = int(token)
            if first_marker <= token < first_marker + 1000:
                seen.append(token - first_marker)
    return seen


def test_dataset_blocks_and_determinism(tokenizer):
    docs = _docs(200)
    ds = CPTDataset(docs, tokenizer, max_seq_length=32)
    first = list(ds)
    assert first and all(b["input_ids"].shape == (32,) and b["input_ids"].dtype == torch.long for b in first)
    second = list(ds)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(first, second, strict=True) for k in x)
    token_docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    _check_blocks(
        [{k: v.tolist() for k, v in b.items()} for b in first], token_docs, 32, tokenizer.eos_token_id
    )


def test_dataset_replay_mix(tokenizer):
    new = _docs(300, seed=1)
    old = [" ".join(["d999"] + d.split()[1:]) for d in _docs(300, seed=2)]  # replay docs start with d999
    ds = CPTDataset(new, tokenizer, 64, replay_source=old, replay_ratio=0.25, seed=5)
    blocks = [b["input_ids"].tolist() for b in ds]
    assert blocks == [b["input_ids"].tolist() for b in ds]
    markers = _decode_doc_ids([{"input_ids": b} for b in blocks], tokenizer)
    assert 999 in markers and len([m for m in markers if m != 999]) >= 290
    other = [
        b["input_ids"].tolist()
        for b in CPTDataset(new, tokenizer, 64, replay_source=old, replay_ratio=0.25, seed=6)
    ]
    assert other != blocks
    assert count_tokens(ds)["tokens"] > count_tokens(CPTDataset(new, tokenizer, 64))["tokens"]


def test_dataset_streams_without_reading_everything(tokenizer):
    consumed = []

    def endless():
        i = 0
        while True:
            consumed.append(i)
            yield f"d{i % 1000} alpha beta gamma"
            i += 1
            if i > 5000:
                raise AssertionError("the source was read far beyond the first block")

    ds = CPTDataset(endless, tokenizer, max_seq_length=16, tokenize_batch_size=8)
    block = next(iter(ds))
    assert block["input_ids"].shape == (16,)
    assert len(consumed) <= 16


def test_dataset_shuffle_buffer_is_a_seeded_permutation(tokenizer):
    docs = _docs(150)
    plain = [tuple(b["input_ids"].tolist()) for b in CPTDataset(docs, tokenizer, 16)]
    shuffled = [tuple(b["input_ids"].tolist()) for b in CPTDataset(docs, tokenizer, 16, shuffle_buffer=8)]
    again = [tuple(b["input_ids"].tolist()) for b in CPTDataset(docs, tokenizer, 16, shuffle_buffer=8)]
    assert shuffled == again and shuffled != plain and sorted(shuffled) == sorted(plain)


def test_dataset_refuses_one_shot_iterator(tokenizer):
    with pytest.raises(DataSourceError, match="one-shot iterator"):
        CPTDataset(iter(_docs(5)), tokenizer, 16)


def test_dataset_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"no eos_token_id.*tokenizer\.eos_token"):
        CPTDataset(_docs(5), _word_tokenizer(eos=False), 16)
    with pytest.raises(DataSourceError, match="fewer tokens than one block of max_seq_length=4096"):
        list(CPTDataset(_docs(3), tokenizer, 4096))
    with pytest.raises(DataSourceError, match="does not exist"):
        list(CPTDataset(str(tmp_path / "missing"), tokenizer, 16))
    with pytest.raises(ValueError, match="needs a replay_source"):
        CPTDataset(_docs(3), tokenizer, 16, replay_ratio=0.1)


def test_dataset_adds_bos_when_tokenizer_does(tokenizer):
    bos_tok = _word_tokenizer(bos_post_processor=True)
    blocks = list(CPTDataset(["alpha beta", "gamma delta"], bos_tok, 4))
    assert blocks[0]["input_ids"].tolist() == [1, *bos_tok.convert_tokens_to_ids(["alpha", "beta"]), 0]
    no_bos = list(CPTDataset(["alpha beta", "gamma delta"], tokenizer, 3))
    assert no_bos[0]["input_ids"].tolist()[0] != tokenizer.bos_token_id


def test_dataloader_two_workers_each_block_once(tokenizer):
    docs = _docs(120, seed=3)
    ds = CPTDataset(docs, tokenizer, max_seq_length=24)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [tuple(b["input_ids"].tolist()) for b in loader]
    expected = [tuple(b["input_ids"]) for shard in range(2) for b in ds.iter_blocks(shard, 2)]
    assert len(got) == len(set(got)) == len(expected)
    assert sorted(got) == sorted(expected)
    markers = _decode_doc_ids([{"input_ids": b} for b in got], tokenizer)
    assert len(markers) == len(set(markers))  # no document twice
    assert len(markers) >= 110  # only each worker's dropped tail is missing


def test_materialize_collate_count(tokenizer):
    ds = CPTDataset(_docs(100), tokenizer, max_seq_length=20)
    table = materialize(ds, max_blocks=5)
    assert len(table) == 5 and table.column_names == ["input_ids", "labels", "position_ids"]
    batch = collate_packed([table[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 20)
    first = next(iter(ds))
    assert torch.equal(batch["input_ids"][0], first["input_ids"])
    counts = count_tokens(ds, max_blocks=5)
    assert counts["blocks"] == 5 and counts["tokens"] == 100
    assert counts["trained_tokens"] == sum(sum(x != -100 for x in row) for row in table["labels"])
    with pytest.raises(ValueError, match="one length"):
        collate_packed([{"input_ids": [1], "labels": [1], "position_ids": [0]}, table[0]])
