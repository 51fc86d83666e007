"""Resolving `dataset=` (files, directories, splits, cards) and reading a split, bad inputs included."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ft.data import available_splits, read_examples, read_prompts, resolve_dataset
from ft.errors import DataError

GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
ROW = {"src": "hello ", "tgt": "world"}


def test_single_file(write_jsonl, tok):
    path = write_jsonl("d.jsonl", [ROW, {"question": "q?", "answer": "a"}])
    examples = read_examples(path, tok)
    assert len(examples) == 2 and examples.stats.num_rows == 2
    assert examples.stats.num_target_tokens == sum(e.num_target_tokens for e in examples)
    assert examples.source.description == f"dataset {path} split 'train'"
    with pytest.raises(DataError, match="single file, so it has no 'valid' split"):
        resolve_dataset(path, "valid")
    assert resolve_dataset(path, None).files == (path,)


def test_directory_with_split_subfolders(write_jsonl, tmp_path):
    a = write_jsonl("ds/train/a.jsonl", [ROW])
    b = write_jsonl("ds/train/part2/b.jsonl", [ROW])
    v = write_jsonl("ds/validation/v.jsonl", [ROW])
    (tmp_path / "ds" / "README.md").write_text("not data")
    assert resolve_dataset(tmp_path / "ds", "train").files == (a, b)
    assert resolve_dataset(tmp_path / "ds", "valid").files == (v,)  # valid == validation
    assert available_splits(tmp_path / "ds") == ["train", "validation"]
    with pytest.raises(DataError, match=r"no 'test' split; it has: train, validation"):
        resolve_dataset(tmp_path / "ds", "test")
    with pytest.raises(DataError, match="several splits"):
        resolve_dataset(tmp_path / "ds", None)


def test_flat_directory_is_the_train_split(write_jsonl, tmp_path):
    a = write_jsonl("ds/a.jsonl", [ROW])
    b = write_jsonl("ds/b.jsonl", [ROW])
    assert resolve_dataset(tmp_path / "ds", "train").files == (a, b)
    with pytest.raises(DataError, match="no 'valid' split; it has: train"):
        resolve_dataset(tmp_path / "ds", "valid")


def test_split_named_files(write_jsonl, tmp_path):
    train = write_jsonl("ds/train.jsonl", [ROW])
    test = write_jsonl("ds/test-00000.jsonl", [ROW])
    assert resolve_dataset(tmp_path / "ds", "train").files == (train,)
    assert resolve_dataset(tmp_path / "ds", "test").files == (test,)
    write_jsonl("ds/extra.jsonl", [ROW])
    with pytest.raises(DataError, match="extra.jsonl, which belongs to no split"):
        resolve_dataset(tmp_path / "ds", "train")


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=f"dataset path {tmp_path / 'nope.jsonl'} does not exist"):
        read_examples(tmp_path / "nope.jsonl", None)
    with pytest.raises(DataError, match="does not exist"):
        resolve_dataset(str(tmp_path / "nope"))


def test_empty_file_and_empty_directory(write_jsonl, tmp_path, tok):
    path = write_jsonl("empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match=f"is empty: no rows in {path}"):
        read_examples(path, tok)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl files"):
        read_examples(tmp_path / "emptydir", tok)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ('{"src": "a", "tgt": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object per line, got a JSON array"),
        ('{"text": "x"}', "no recognised fields"),
        ('{"src": "a", "tgt": 5}', "field 'tgt' must be a string, got int"),
    ],
)
def test_malformed_line_names_file_and_line(write_jsonl, tok, bad, reason):
    import json

    path = write_jsonl("d.jsonl", [json.dumps(ROW), "", bad, json.dumps(ROW)])  # blank line 2 still counts
    with pytest.raises(DataError, match=f"{path}:3: {reason}.*skip_malformed_lines=true") as info:
        read_examples(path, tok)
    assert str(path) in str(info.value)


def test_skip_malformed_counts(write_jsonl, tok):
    path = write_jsonl("d.jsonl", [ROW, "not json", ROW, {"text": 1}, ROW])
    examples = read_examples(path, tok, skip_malformed=True)
    assert len(examples) == 3
    assert examples.stats.num_malformed == 2
    assert examples.stats.malformed[0].startswith(f"{path}:2: not valid JSON")
    assert examples.stats.malformed[1].startswith(f"{path}:4: no recognised fields")
    assert "2 malformed lines skipped" in examples.stats.summary()


def test_too_long_drop_vs_truncate(write_jsonl, tok):
    short = {"src": "a", "tgt": "b"}  # BOS a b EOS = 4 tokens
    long = {"src": "a", "tgt": "b" * 20}  # 23 tokens
    prompt_too_long = {"src": "x" * 30, "tgt": "y"}  # truncation leaves no target
    path = write_jsonl("d.jsonl", [short, long, prompt_too_long])

    dropped = read_examples(path, tok, max_seq_len=10, on_too_long="drop")
    assert [len(e) for e in dropped] == [4]
    s = dropped.stats
    assert (s.num_too_long, s.num_dropped_too_long, s.num_truncated, s.num_no_target) == (2, 2, 0, 0)

    truncated = read_examples(path, tok, max_seq_len=10, on_too_long="truncate")
    assert [len(e) for e in truncated] == [4, 10]
    assert truncated[1].tokens == tok.encode_prompt("a") + tok.encode("b" * 8)  # keeps the start, loses EOS
    s = truncated.stats
    assert (s.num_too_long, s.num_dropped_too_long, s.num_truncated, s.num_no_target) == (2, 0, 2, 1)
    assert s.num_examples == 2 and s.num_tokens == 14

    with pytest.raises(DataError, match="no usable examples: 3 rows, 3 longer than max_seq_len=3"):
        read_examples(path, tok, max_seq_len=3)


def test_rows_without_targets_are_dropped_and_counted(write_jsonl, tok):
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    path = write_jsonl("d.jsonl", [ROW, no_assistant, {"src": "a", "tgt": ""}])
    examples = read_examples(path, tok)
    # An empty tgt still has EOS to learn; a chat without assistant turns has nothing.
    assert len(examples) == 2 and examples.stats.num_no_target == 1


def test_forced_format(write_jsonl, tok):
    path = write_jsonl("d.jsonl", [{"instruction": "i", "output": "o", "src": "s", "tgt": "t"}])
    (auto,) = read_examples(path, tok)
    (alpaca,) = read_examples(path, tok, format="alpaca")
    assert tok.decode(auto.tokens).startswith("s") and "### Instruction:\ni" in tok.decode(alpaca.tokens)


def test_asset_card(write_jsonl, tmp_path, monkeypatch, tok):
    write_jsonl("data/mine/train/a.jsonl", [{"instruction": "i", "output": "o", "src": "s", "tgt": "t"}])
    write_jsonl("data/mine/valid/a.jsonl", [ROW])
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "datasets.yaml").write_text(
        f"name: my_sft\ndataset_family: alpaca\ndata: {tmp_path / 'data' / 'mine'}\n"
        "---\nname: broken_sft\ndata: /no/such/dir\n"
    )
    monkeypatch.setenv("FT_USER_ASSET_DIR", str(cards))
    source = resolve_dataset("my_sft", "valid")
    assert source.format == "alpaca" and source.files == (tmp_path / "data/mine/valid/a.jsonl",)
    (ex,) = read_examples("my_sft", tok)
    assert "### Instruction:\ni" in tok.decode(ex.tokens)  # the card's dataset_family wins over detection
    with pytest.raises(DataError, match="'my_sfd' is neither an existing file or directory nor a known asset card"):
        resolve_dataset("my_sfd")
    with pytest.raises(Exception, match="/no/such/dir does not exist"):
        resolve_dataset("broken_sft")


def test_read_prompts(write_jsonl, tok):
    path = write_jsonl(
        "test.jsonl",
        [{"src": "a"}, "", {"question": "q?", "answer": "#### 1"}, {"messages": [{"role": "user", "content": "x"}]}],
    )
    prompts = read_prompts(path, tok)
    assert [p.id for p in prompts] == ["0", "1", "2"]
    assert [p.reference for p in prompts] == [None, "#### 1", None]
    bad = write_jsonl("bad.jsonl", [{"src": "a"}, {"nothing": 1}])
    with pytest.raises(DataError, match=f"{bad}:2: no recognised fields"):
        read_prompts(bad, tok)
    assert len(read_prompts(bad, tok, skip_malformed=True)) == 1


@pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(), reason="GSM8K not in ../shared/data")
def test_gsm8k_real_data(tok):
    start = time.perf_counter()
    examples = read_examples(GSM8K, tok, split="train", max_seq_len=2048, on_too_long="drop")
    elapsed = time.perf_counter() - start
    assert examples.stats.num_rows == 7473 and examples.stats.num_malformed == 0
    assert len(examples) + examples.stats.num_dropped_too_long == 7473
    assert len(examples) > 7450  # byte-level ids: only a few rows exceed 2048
    assert elapsed < 10, f"reading GSM8K train took {elapsed:.1f}s"
    first = examples[0]
    prompt_len = first.target_mask.index(True)
    assert tok.decode(first.tokens[:prompt_len]).startswith("Natalia sold clips")
    assert tok.decode(first.tokens[prompt_len:]).endswith("#### 72")
    prompts = read_prompts(GSM8K, tok, split="test")
    assert len(prompts) == 1319 and all(p.reference and "####" in p.reference for p in prompts)


def test_tokenizer_chat_errors_name_the_line(write_jsonl, tok, monkeypatch):
    def strict_chat(messages, add_generation_prompt=False):
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise DataError("chat message 0 has role 'robot'; expected one of system, user, assistant")
        return type(tok).encode_chat(tok, messages, add_generation_prompt)

    monkeypatch.setattr(tok, "encode_chat", strict_chat)
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl("chat.jsonl", [good, {"messages": [{"role": "robot", "content": "a"}]}])
    with pytest.raises(DataError, match=f"{path}:2: chat message 0 has role 'robot'"):
        read_examples(path, tok)
    assert len(read_examples(path, tok, skip_malformed=True)) == 1
