"""Held-out data: no split (data.eval_fraction=0), or rows of their own (data.eval_path)."""

import json
import math

import numpy as np
import pytest

from conftest import tiny_config
from input import ByteTokenizer, DataError, data_sources, open_prepared, token_stream
from input.prepare import prepare
from input.tokenizer import train_bpe
from observe import metrics_log
from train import run

TOKENIZER = ByteTokenizer()
TRAIN_DOCS = [f"train document {i}: " + "word " * (i % 7 + 1) for i in range(12)]
EVAL_DOCS = [f"held-out text {i} " * 3 for i in range(4)]


def _quiet(_):
    pass


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def _sources(*overrides):
    return data_sources(tiny_config(*overrides).data, TOKENIZER)


def _tokens(rows):
    return rows.stream[0:len(rows.stream)]


def _eval_data(tmp_path, kind):
    """EVAL_DOCS as a .jsonl file, a directory of .txt files, or a prepared dataset."""
    if kind == "file":
        return _write_jsonl(tmp_path / "eval.jsonl", EVAL_DOCS)
    directory = tmp_path / "eval"
    directory.mkdir()
    for i, doc in enumerate(EVAL_DOCS):
        (directory / f"{i}.txt").write_text(doc)
    if kind == "directory":
        return directory
    prepare([str(directory)], tmp_path / "eval_prepared", workers=1, report=_quiet)
    return tmp_path / "eval_prepared"


def test_eval_fraction_zero_trains_on_every_document(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", TRAIN_DOCS)
    sources = _sources(f"data.path={train}", "data.eval_fraction=0")
    assert len(sources.train) == 1 and sources.heldout == ()
    np.testing.assert_array_equal(_tokens(sources.train[0].rows),
                                  token_stream(TRAIN_DOCS, TOKENIZER))

    prepare([str(train)], tmp_path / "prepared", workers=1, report=_quiet)
    prepared = _sources(f"data.path={tmp_path / 'prepared'}", "data.eval_fraction=0")
    whole = open_prepared(str(tmp_path / "prepared"), TOKENIZER)
    assert prepared.heldout == () and len(prepared.train[0].rows.stream) == len(whole)
    assert len(prepared.train[0].rows) == math.ceil((len(whole) - 1) / 32)


@pytest.mark.parametrize("kind", ["file", "directory", "prepared"])
def test_eval_path_holds_out_exactly_its_data_and_trains_on_all_of_data_path(tmp_path, kind):
    train = _write_jsonl(tmp_path / "train.jsonl", TRAIN_DOCS)
    eval_path = _eval_data(tmp_path, kind)
    # eval_fraction is not used with eval_path: nothing of data.path is held out.
    sources = _sources(f"data.path={train}", f"data.eval_path={eval_path}",
                       "data.eval_fraction=0.5")
    np.testing.assert_array_equal(_tokens(sources.train[0].rows),
                                  token_stream(TRAIN_DOCS, TOKENIZER))
    [heldout] = sources.heldout
    assert heldout.name == str(eval_path) and heldout.weight == 1.0
    np.testing.assert_array_equal(_tokens(heldout.rows), token_stream(EVAL_DOCS, TOKENIZER))


def test_mixture_is_trained_whole_with_eval_path_and_split_per_dataset_without(tmp_path):
    for name, docs in (("a", TRAIN_DOCS[:6]), ("b", TRAIN_DOCS[6:])):
        prepare([str(_write_jsonl(tmp_path / f"{name}.jsonl", docs))], tmp_path / name,
                workers=1, report=_quiet)
    mixture = f'data.mixture=[["{tmp_path / "a"}", 0.25], ["{tmp_path / "b"}", 0.75]]'
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", EVAL_DOCS)
    whole = _sources(mixture, f"data.eval_path={eval_path}")
    assert [len(s.rows.stream) for s in whole.train] == [
        len(token_stream(TRAIN_DOCS[:6], TOKENIZER)), len(token_stream(TRAIN_DOCS[6:], TOKENIZER))]
    assert [(s.name, s.weight) for s in whole.heldout] == [(str(eval_path), 1.0)]

    split = _sources(mixture)
    assert [(s.name, s.weight) for s in split.heldout] == [(str(tmp_path / "a"), 0.25),
                                                           (str(tmp_path / "b"), 0.75)]
    for train, heldout in zip(split.train, split.heldout, strict=True):
        assert len(train.rows.stream) + len(heldout.rows.stream) == len(
            open_prepared(train.name, TOKENIZER))


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing.txt", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no .txt or .jsonl files"),
])
def test_bad_eval_path_is_named(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=rf"data\.eval_path '{path}' {message}"):
        _sources(f"data.eval_path={path}")


def test_prepared_eval_path_from_another_tokenizer_is_refused(tmp_path):
    eval_txt = tmp_path / "eval.txt"
    eval_txt.write_text(" ".join(EVAL_DOCS))
    tokenizer = tmp_path / "bpe.json"
    train_bpe(iter(EVAL_DOCS * 5), 300, tokenizer)
    prepare([str(eval_txt)], tmp_path / "bpe", tokenizer=str(tokenizer), workers=1,
            report=_quiet)
    with pytest.raises(DataError, match=rf"(?s)data\.eval_path '{tmp_path / 'bpe'}': .*"
                                        r"prepared with tokenizer .*bpe\.json.*configured with"):
        _sources(f"data.eval_path={tmp_path / 'bpe'}")


def test_prepared_eval_path_checksums_follow_verify_checksums(tmp_path):
    eval_path = _eval_data(tmp_path, "prepared")
    shard = next(eval_path.glob("shard-*.tokens.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"data\.eval_path .*shard {shard} fails its CRC32"):
        _sources(f"data.eval_path={eval_path}")
    unchecked = _sources(f"data.eval_path={eval_path}", "data.verify_checksums=false")
    assert len(unchecked.heldout[0].rows.stream) == len(token_stream(EVAL_DOCS, TOKENIZER))


@pytest.mark.slow
def test_run_evaluates_every_row_of_eval_path(tmp_path, capsys):
    eval_txt = tmp_path / "eval.txt"
    text = "held-out text of its own. " * 20
    eval_txt.write_text(text)
    result = run(tiny_config("checkpoint.every=0", "train.eval_batches=-1",
                             f"data.eval_path={eval_txt}", f"run_dir={tmp_path / 'run'}"))
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    [record] = [r for r in metrics_log.read(tmp_path / "run") if "eval_loss" in r]
    # Every token of the file and its end-of-document id is a target once, but the first.
    assert record["eval_tokens"] == len(text.encode())
    assert record["dataset"] == str(eval_txt) and record["eval_loss"] == result.eval_loss
    out = capsys.readouterr().out
    rows = math.ceil(len(text.encode()) / 32)
    assert f"data.eval_path {eval_txt}: {rows} held-out rows of 32 tokens" in out
    assert "data default corpus (weight 1): " in out and " train rows, no held-out rows" in out
    assert f"eval: held-out loss {result.eval_loss:.4f}" in out
