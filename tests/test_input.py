import collections
import json

import numpy as np
import pytest

from conftest import tiny_config
from input import (
    ByteTokenizer,
    DataError,
    PackedRows,
    eval_batches,
    load_documents,
    make_splits,
    token_stream,
    train_dataset,
)

TOKENIZER = ByteTokenizer()


def _rows(seq_len=16):
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    return PackedRows(token_stream(docs, TOKENIZER), seq_len, TOKENIZER.pad_id, TOKENIZER.eos_id)


def _batches(rows, seed, count, global_batch=8, **kwargs):
    ds = train_dataset(rows, seed=seed, global_batch=global_batch, **kwargs)
    return [ds[k] for k in range(count)]


def test_same_seed_gives_same_batches_and_different_seeds_differ():
    rows = _rows()
    first, again, other = (_batches(rows, s, 5) for s in (3, 3, 4))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any(not np.array_equal(a["inputs"], c["inputs"])
               for a, c in zip(first, other, strict=True))


def test_rows_are_seq_len_long_and_targets_are_inputs_shifted():
    rows = _rows(seq_len=16)
    for batch in _batches(rows, 0, 4):
        assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_every_token_appears_once_per_epoch():
    rows = _rows(seq_len=16)
    targets = collections.Counter()
    for batch in _batches(rows, 7, len(rows), global_batch=1):  # one shuffled epoch
        targets.update(batch["targets"][batch["weights"] > 0].tolist())
    # Every token but the first is predicted exactly once per epoch; the first is an input.
    assert targets == collections.Counter(rows.stream[1:].tolist())
    assert rows[0]["inputs"][0] == rows.stream[0]


def test_shuffled_epoch_is_a_permutation_of_the_rows():
    rows = _rows(seq_len=16)
    n = len(rows) - len(rows) % 8
    ds = train_dataset(rows, seed=1, global_batch=1)
    order = [tuple(ds[k]["inputs"][0]) for k in range(len(rows))]
    assert sorted(order) == sorted(tuple(rows[i]["inputs"]) for i in range(len(rows)))
    assert order[:n] != [tuple(rows[i]["inputs"]) for i in range(n)]


def test_process_shares_concatenate_to_the_global_batch():
    rows = _rows()
    whole = _batches(rows, 5, 6, global_batch=8)
    for processes in (2, 4):
        shares = [_batches(rows, 5, 6, global_batch=8, process_index=p, process_count=processes)
                  for p in range(processes)]
        for k in range(6):
            joined = np.concatenate([share[k]["inputs"] for share in shares])
            np.testing.assert_array_equal(joined, whole[k]["inputs"])


def test_last_row_is_padded_with_zero_weight():
    rows = PackedRows(np.arange(20, dtype=np.int32), 8, pad_id=99, eos_id=98)
    assert len(rows) == 3
    last = rows[2]
    np.testing.assert_array_equal(last["inputs"], [16, 17, 18, 19, 99, 99, 99, 99])
    np.testing.assert_array_equal(last["targets"], [17, 18, 19, 99, 99, 99, 99, 99])
    np.testing.assert_array_equal(last["weights"], [1, 1, 1, 0, 0, 0, 0, 0])


def test_eval_batches_fill_with_zero_weight_rows():
    rows = PackedRows(np.arange(50, dtype=np.int32), 8, pad_id=99, eos_id=98)
    batches = list(eval_batches(rows, batch_size=4, max_batches=5))
    assert len(batches) == 2
    assert batches[1]["weights"][3].sum() == 0 and batches[1]["weights"][0].sum() > 0


def test_eval_batches_minus_one_covers_every_held_out_token():
    rows = PackedRows(np.arange(50, dtype=np.int32), 8, pad_id=99, eos_id=98)  # 7 rows
    every = list(eval_batches(rows, batch_size=2, max_batches=-1))
    assert len(every) == 4
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in every])
    np.testing.assert_array_equal(targets, np.arange(1, 50))  # each token but the first
    first = list(eval_batches(rows, batch_size=2, max_batches=1))
    assert sum(b["weights"].sum() for b in first) == 16


def test_eval_fraction_zero_holds_nothing_out_of_the_default_corpus():
    splits = make_splits(tiny_config("data.eval_fraction=0").data, TOKENIZER)
    whole = token_stream(load_documents(""), TOKENIZER)
    assert splits.eval is None
    np.testing.assert_array_equal(splits.train.stream, whole)


def test_default_corpus_splits_into_train_and_held_out():
    splits = make_splits(tiny_config().data, TOKENIZER)
    assert len(splits.train) > 1000 and len(splits.eval) > 10


def test_user_directory_of_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    lines = [json.dumps({"text": "second"}), "", json.dumps({"body": "no text"}),
             json.dumps({"text": "third"})]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(lines))
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_documents(str(tmp_path)) == ["first document", "second", "third"]


def test_undecodable_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe ok")
    assert load_documents(str(tmp_path)) == ["ok \ufffd\ufffd ok"]
    assert "bad.txt: replaced 2 undecodable" in caplog.text


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "holds no .txt or .jsonl files"),
    (lambda p: (p / "e.txt").write_text("") and p or p, "every document is empty"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a"}\n{broken') and p or p, r"x\.jsonl:2"),
])
def test_bad_data_paths_are_named(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_documents(str(path))


def test_segment_ids_and_positions_restart_after_each_document():
    eos, pad = TOKENIZER.eos_id, TOKENIZER.pad_id
    stream = np.array([5, 6, 7, eos, 8, 9, eos, 4, eos], dtype=np.int32)
    rows = PackedRows(stream, seq_len=6, pad_id=pad, eos_id=eos)
    first, last = rows[0], rows[1]
    np.testing.assert_array_equal(first["inputs"], [5, 6, 7, eos, 8, 9])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 0, 1])
    # The row starts with the end of a document cut by the row boundary.
    np.testing.assert_array_equal(last["inputs"], [eos, 4, eos, pad, pad, pad])
    np.testing.assert_array_equal(last["segment_ids"], [1, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(last["positions"][:2], [0, 0])
    np.testing.assert_array_equal(last["weights"], [1, 1, 0, 0, 0, 0])


def test_mixture_draws_rows_in_proportion_to_the_weights_deterministically():
    low = PackedRows(np.arange(1, 100, dtype=np.int32).repeat(20), 16, 999, 998)
    high = PackedRows(np.arange(500, 600, dtype=np.int32).repeat(20), 16, 999, 998)
    mixture = [(low, 3.0), (high, 1.0)]
    batches = _batches(mixture, 4, 50)
    from_low = sum(int((b["inputs"][:, 0] < 100).sum()) for b in batches)
    assert from_low == 300  # 3 of every 4 rows over 400 rows
    again = _batches(mixture, 4, 50)
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    shares = [_batches(mixture, 4, 50, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([shares[0][7]["inputs"], shares[1][7]["inputs"]]), batches[7]["inputs"])
