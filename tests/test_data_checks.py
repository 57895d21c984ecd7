"""Pre-flight validation of data sources, and the same errors (file, line, byte, fix) while streaming."""

from __future__ import annotations

import json

import pytest

from cpt_plugin.data import CPTDataset, DataSourceError, iter_documents
from cpt_plugin.data import checks as data_checks
from cpt_plugin.data.checks import validate_source
from tests.test_data import _word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def _jsonl(path, rows: list[str]) -> list[int]:
    """Writes raw lines; returns the byte offset of each."""
    offsets, offset = [], 0
    with open(path, "wb") as handle:
        for row in rows:
            raw = row.encode("utf-8") + b"\n"
            offsets.append(offset)
            handle.write(raw)
            offset += len(raw)
    return offsets


def _rows(n: int) -> list[str]:
    return [json.dumps({"text": f"d{i % 1000} alpha beta gamma", "id": i}) for i in range(n)]


def test_bad_jsonl_line_fails_at_construction(tmp_path, tokenizer):
    """Was: a bad line 900 of 1200 ended the run at the step that reached it."""
    rows = _rows(1200)
    rows[899] = '{"text": "alpha beta", "id": 899'  # truncated
    path = tmp_path / "corpus.jsonl"
    offsets = _jsonl(path, rows)
    message = rf"corpus\.jsonl' line 900 \(byte {offsets[899]}\) is not valid JSON .*Fix or delete that line"
    with pytest.raises(DataSourceError, match=message):
        CPTDataset(path, tokenizer, 16)
    with pytest.raises(DataSourceError, match=message):
        validate_source(path)


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path):
    """Was: a raw UnicodeDecodeError without file or line."""
    path = tmp_path / "latin.jsonl"
    offsets = _jsonl(path, _rows(5))
    raw = path.read_bytes().split(b"\n")
    raw[3] = b'{"text": "caf\xe9"}'
    path.write_bytes(b"\n".join(raw))
    byte = offsets[3] + raw[3].index(b"\xe9")
    message = rf"latin\.jsonl' line 4 \(byte {offsets[3]}\) is not UTF-8: .* at byte {byte}\. Re-encode"
    with pytest.raises(DataSourceError, match=message):
        validate_source(path)
    with pytest.raises(DataSourceError, match=message):
        list(iter_documents(path))


@pytest.mark.parametrize("split", ["line", "blank_lines", "file"])
def test_non_utf8_text_reports_the_true_byte_offset(tmp_path, split):
    """Was (split="line"): the offset inside the decoder's 8 KiB buffer, not in the file."""
    good = "alpha beta gamma\n" * 1000  # 17,000 bytes
    path = tmp_path / "notes.txt"
    path.write_bytes(good.encode() + b"caf\xe9 au lait\n")
    message = (
        rf"notes\.txt' is not UTF-8 text: .* at byte {len(good) + 3} \(line 1001\)\. Convert it to UTF-8"
    )
    with pytest.raises(DataSourceError, match=message):
        validate_source(path, split=split)
    with pytest.raises(DataSourceError, match=message):
        list(iter_documents(path, split=split))


def test_errors_past_the_checked_head_come_while_streaming(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data_checks, "CHECK_BYTES", 2000)
    rows = _rows(400)
    rows[350] = json.dumps({"body": "no text field"})
    path = tmp_path / "big.jsonl"
    offsets = _jsonl(path, rows)
    dataset = CPTDataset(path, tokenizer, 16)  # the first 2000 bytes are fine
    blocks = dataset.iter_blocks()
    assert next(blocks)["input_ids"]
    with pytest.raises(DataSourceError, match=rf"line 351 \(byte {offsets[350]}\) has no field 'text'"):
        list(blocks)


def test_field_type_folder_and_missing_path_checked_up_front(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    _jsonl(path, [json.dumps({"text": "alpha"}), json.dumps({"text": ["alpha"]})])
    with pytest.raises(
        DataSourceError, match=r"line 2 \(byte 18\): field 'text' holds a list, expected text"
    ):
        validate_source(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta", encoding="utf-8")
    (folder / "b.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"b\.jsonl' line 1 \(byte 0\): expected a JSON object"):
        CPTDataset(folder, tokenizer, 16)
    with pytest.raises(DataSourceError, match=r"'.*nowhere\.txt' does not exist"):
        CPTDataset(tmp_path / "nowhere.txt", tokenizer, 16)
    with pytest.raises(DataSourceError, match="does not exist"):
        CPTDataset(["alpha beta"] * 20, tokenizer, 4, replay_source=tmp_path / "gone", replay_ratio=0.1)
    validate_source(["in-memory sources are checked as they are read"])


def test_saved_dataset_without_the_field(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["alpha beta"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataSourceError, match=r"no field 'text' \(fields: body\)"):
        CPTDataset(tmp_path / "saved", tokenizer, 16)
