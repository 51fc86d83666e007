"""Preference rows: the formats, the shared prompt, loss on the responses only, bad rows."""

import json

import pytest
import torch

from ft.data.packing import IGNORE_INDEX
from ft.errors import DataError
from ft.preference.data import CHOSEN, REJECTED, PairPlanner, pair_reader, read_pairs
from ft.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("ft_tiny")


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_fairseq2_and_hf_string_rows_tokenize_alike(tmp_path, tok):
    f = write(tmp_path / "a.jsonl", [{"src": "Q: hi\n", "tgt_chosen": "hello", "tgt_rejected": "bye"},
                                     {"prompt": "Q: hi\n", "chosen": "hello", "rejected": "bye"}])
    a, b = read_pairs(f, tok, max_seq_len=64)
    assert a == b
    assert a.prompt == tok.encode_prompt("Q: hi\n")
    assert a.chosen == tok.encode_response("hello") and a.rejected == tok.encode_response("bye")


def test_chat_rows_share_the_prompt_and_train_on_the_final_turn_only(tmp_path, tok):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "colour?"}]
    f = write(tmp_path / "c.jsonl", [
        {"prompt": history, "chosen": [{"role": "assistant", "content": "red"}],
         "rejected": [{"role": "assistant", "content": "I do not know"}]},
        {"chosen": history + [{"role": "assistant", "content": "red"}],
         "rejected": history + [{"role": "assistant", "content": "I do not know"}]},
        {"prompt": history, "chosen": "red", "rejected": "I do not know"},
    ])
    pairs = read_pairs(f, tok, max_seq_len=256)
    assert pairs[0] == pairs[1] == pairs[2]
    ids, mask = tok.encode_chat(history + [{"role": "assistant", "content": "red"}])
    assert pairs[0].prompt + pairs[0].chosen == ids
    # The earlier assistant turn ("hello") is prompt: only the final turn is a response.
    assert len(pairs[0].chosen) < sum(mask)


def test_batches_put_labels_on_responses_only(tmp_path, tok):
    f = write(tmp_path / "a.jsonl", [{"src": f"Q{i}\n", "tgt_chosen": "yes" * (i + 1), "tgt_rejected": "no"}
                                     for i in range(4)])
    pairs = read_pairs(f, tok, max_seq_len=32)
    planner = PairPlanner(pairs, max_seq_len=32, max_num_tokens=64, packing=True, pad_id=0)
    for plan in planner.plan(range(4)):
        batch = planner.collate(plan)
        labelled = batch.labels_BT != IGNORE_INDEX
        assert batch.num_target_tokens == int(labelled.sum())
        for k, i in enumerate(batch.pair_index_P.tolist()):
            for which, response in ((CHOSEN, pairs[i].chosen), (REJECTED, pairs[i].rejected)):
                at = labelled & (batch.sequence_ids_BT == 2 * k + which)
                assert batch.labels_BT[at].tolist() == response


def test_reader_state_continues_exactly(tmp_path, tok):
    f = write(tmp_path / "a.jsonl", [{"src": f"Q{i}\n", "tgt_chosen": "a" * (i % 5 + 1), "tgt_rejected": "b"}
                                     for i in range(20)])
    pairs = read_pairs(f, tok, max_seq_len=16)

    def reader():
        return pair_reader(pairs, max_seq_len=16, max_num_tokens=48, seed=3, packing=True, max_num_data_epochs=None,
                           dp_size=1, dp_rank=0, gradient_accumulation=2, pad_id=0)

    a = reader()
    for _ in range(3):
        a.next_step_batches()
    b = reader()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(6):  # past an epoch boundary
        for x, y in zip(a.next_step_batches(), b.next_step_batches()):
            assert torch.equal(x.tokens_BT, y.tokens_BT) and torch.equal(x.pair_index_P, y.pair_index_P)


@pytest.mark.parametrize("row, message", [
    ({"src": "q", "tgt_chosen": "same", "tgt_rejected": "same"}, "identical"),
    ({"src": "q", "tgt_chosen": "a"}, "missing field 'tgt_rejected'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ({"question": "q", "answer": "a"}, "no preference fields"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "differ before"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": "y"}, "must end with an assistant turn"),
    ('{"src": "q", ', "not valid JSON"),
])
def test_bad_rows_are_errors_with_file_and_line(tmp_path, tok, row, message):
    good = {"src": "q", "tgt_chosen": "a", "tgt_rejected": "b"}
    f = write(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(DataError) as err:
        read_pairs(f, tok, max_seq_len=64)
    assert f"{f}:2: " in str(err.value) and message in str(err.value)
    assert "skip_malformed_lines=true" in str(err.value)
    pairs = read_pairs(f, tok, max_seq_len=64, skip_malformed=True)
    assert len(pairs) == 2 and pairs.stats.num_malformed + pairs.stats.num_identical == 1
    assert f"{f}:2: " in pairs.stats.summary()


def test_too_long_pairs_are_dropped_or_truncated(tmp_path, tok):
    f = write(tmp_path / "a.jsonl", [{"src": "q", "tgt_chosen": "a " * 40, "tgt_rejected": "b"},
                                     {"src": "q", "tgt_chosen": "a", "tgt_rejected": "b"}])
    dropped = read_pairs(f, tok, max_seq_len=16)
    assert len(dropped) == 1 and dropped.stats.num_dropped_too_long == 1
    truncated = read_pairs(f, tok, max_seq_len=16, on_too_long="truncate")
    assert len(truncated) == 2 and truncated[0].length(CHOSEN) == 16
    with pytest.raises(DataError, match="no usable preference pairs"):
        read_pairs(write(tmp_path / "b.jsonl", [{"src": "q", "tgt_chosen": "a " * 40, "tgt_rejected": "b " * 40}]),
                   tok, max_seq_len=16)
