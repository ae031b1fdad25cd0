"""Offline prepare: shards, manifest, resumability, and reading the result back."""

import gzip
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_OVERRIDES, tiny_config
from input import ByteTokenizer, DataError, make_splits, open_prepared, token_stream
from input.prepare import main as prepare_main
from input.prepare import prepare
from input.tokenizer import get_tokenizer, token_dtype, train_bpe
from train import run
from train.__main__ import main as train_main

TOKENIZER = ByteTokenizer()
DOCS = [f"document {i}: " + "word " * (i * 7 % 50) + "\u00e9t\u00e9" for i in range(30)]


def _sources(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    with open(src / "a.jsonl", "w") as f:
        for doc in DOCS[:20]:
            f.write(json.dumps({"text": doc}) + "\n")
    with gzip.open(src / "nested" / "b.jsonl.gz", "wt") as f:
        for doc in DOCS[20:]:
            f.write(json.dumps({"text": doc}) + "\n")
    (src / "c.txt").write_text("a long text file " * 200)
    return src


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _quiet(_):
    pass


def test_prepared_stream_is_the_documents_in_order_with_separators(tmp_path):
    src = _sources(tmp_path)
    manifest = prepare([str(src)], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    expected = token_stream(DOCS[:20] + ["a long text file " * 200] + DOCS[20:], TOKENIZER)
    stream = open_prepared(str(tmp_path / "out"), TOKENIZER)
    np.testing.assert_array_equal(stream[0:len(stream)], expected)
    assert manifest["documents"] == 31 and manifest["tokens"] == len(expected)
    assert manifest["token_dtype"] == "uint16"
    assert len(manifest["shards"]) > 3  # the .txt document was split over several shards
    assert manifest["tokenizer"] == TOKENIZER.identity()


def test_killed_prepare_resumes_and_is_byte_identical(tmp_path):
    src = _sources(tmp_path)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    prepare([str(src)], whole, shard_mb=0.001, workers=2, report=_quiet)
    shutil.copytree(whole, resumed)
    # As if killed: two shards never finished, one mid-write, no manifest yet.
    for name in ("shard-00001", "shard-00004"):
        (resumed / f"{name}.json").unlink()
    (resumed / "shard-00004.tokens.npy").write_bytes(b"partial")
    (resumed / "shard-00002.json").unlink()
    (resumed / "shard-00002.tokens.npy").unlink()
    (resumed / "manifest.json").unlink()
    messages = []
    prepare([str(src)], resumed, shard_mb=0.001, workers=1, report=messages.append)
    shards = len(json.loads((whole / "manifest.json").read_text())["shards"])
    assert messages[0] == f"3 files -> {shards} shards ({shards - 3} already done)"
    assert _snapshot(resumed) == _snapshot(whole)


def test_training_rows_from_a_prepared_dataset_cover_every_token(tmp_path):
    src = _sources(tmp_path)
    prepare([str(src)], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    config = tiny_config(f"data.path={tmp_path / 'out'}", "data.seq_len=16")
    splits = make_splits(config.data, TOKENIZER)
    stream = open_prepared(str(tmp_path / "out"), TOKENIZER)
    cut = len(splits.train.stream)
    assert cut + len(splits.eval.stream) == len(stream)
    for rows, expected in ((splits.train, stream[1:cut]), (splits.eval, stream[cut + 1:])):
        targets = [rows[i]["targets"][rows[i]["weights"] > 0] for i in range(len(rows))]
        np.testing.assert_array_equal(np.concatenate(targets), expected)


def test_tokenizer_mismatch_is_refused_naming_both(tmp_path):
    src = _sources(tmp_path)
    prepare([str(src)], tmp_path / "out", workers=1, report=_quiet)
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"(?s)prepared with tokenizer .*'0000.*configured with"):
        open_prepared(str(tmp_path / "out"), TOKENIZER)


def test_corrupted_and_truncated_shards_are_named(tmp_path):
    src = _sources(tmp_path)
    prepare([str(src)], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    shard = tmp_path / "out" / "shard-00001.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard} fails its CRC32"):
        open_prepared(str(tmp_path / "out"), TOKENIZER)
    shard.write_bytes(bytes(data[:200]))
    with pytest.raises(DataError, match=rf"shard {shard} (is truncated|holds)"):
        open_prepared(str(tmp_path / "out"), TOKENIZER, verify=False)


def test_bad_sources_are_named_and_bad_lines_counted(tmp_path):
    with pytest.raises(DataError, match="matches no"):
        prepare([str(tmp_path / "nothing")], tmp_path / "out", report=_quiet)
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    with pytest.raises(DataError, match="hold no text"):
        prepare([str(src)], tmp_path / "out", workers=1, report=_quiet)
    (src / "x.jsonl").write_bytes(b'{"text": "ok \\u00e9"}\n{"body": "no field"}\n'
                                  b'{"text": "bad \xff byte"}\n')
    messages = []
    manifest = prepare([str(src)], tmp_path / "out2", workers=1, report=messages.append)
    assert manifest["documents"] == 2
    assert any("skipped 1 line(s) without the text field" in m for m in messages)
    assert any("replaced 1 undecodable" in m for m in messages)
    (src / "y.jsonl").write_text('{"text": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"y\.jsonl: line 2"):
        prepare([str(src)], tmp_path / "out3", workers=1, report=_quiet)


@pytest.mark.slow
def test_prepare_cli_reports_progress_and_trains(tmp_path, capsys):
    src = _sources(tmp_path)
    repo = str(pathlib.Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "input.prepare", str(src), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--shard-mb", "0.002"],
                            cwd=repo, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MB/s" in result.stdout and "tokens/s" in result.stdout and "ETA" in result.stdout
    assert "wrote" in result.stdout and "31 documents" in result.stdout
    assert "RuntimeWarning" not in result.stderr
    # The rest through the commands' own functions, in this process.
    assert prepare_main([str(tmp_path / "none"), "--out", str(tmp_path / "o2")]) == 2
    assert "matches no" in capsys.readouterr().err
    assert train_main([*TINY_OVERRIDES, "train.steps=2", f"data.path={tmp_path / 'out'}",
                       f"run_dir={tmp_path / 'run'}"]) == 0
    assert "eval: held-out loss" in capsys.readouterr().out


@pytest.mark.slow
def test_trained_bpe_tokenizer_prepares_resumes_and_trains(tmp_path):
    src = _sources(tmp_path)
    out = tmp_path / "out"
    manifest = prepare([str(src)], out, shard_mb=0.001, workers=1, train_tokenizer=300,
                       report=_quiet)
    tokenizer = get_tokenizer(str(out / "tokenizer.json"))
    assert tokenizer.vocab_size == 300 and manifest["tokenizer"] == tokenizer.identity()
    stream = open_prepared(str(out), tokenizer)
    first = stream[0:len(tokenizer.encode(DOCS[0])) + 1]
    assert first[-1] == tokenizer.eos_id and tokenizer.decode(first[:-1]) == DOCS[0]
    assert len(stream) < manifest["shards"][0]["raw_bytes"] * 10  # it compresses the text

    before = _snapshot(out)
    (out / "manifest.json").unlink()
    messages = []
    prepare([str(src)], out, shard_mb=0.001, workers=1, train_tokenizer=300,
            report=messages.append)
    assert any("using the tokenizer trained earlier" in m for m in messages)
    assert _snapshot(out) == before

    config = tiny_config(f"data.path={out}", f"data.tokenizer={out / 'tokenizer.json'}",
                         "model.vocab_size=320",
                         "train.steps=2", "train.eval_batches=1", f"run_dir={tmp_path / 'run'}")
    assert run(config).final_step == 2
    with pytest.raises(DataError, match=r"(?s)prepared with tokenizer.*hf:tokenizer\.json.*"
                                        r"configured with.*'bytes'"):
        run(tiny_config(f"data.path={out}", f"run_dir={tmp_path / 'run2'}"))


def test_sentencepiece_model_prepares_a_dataset(tmp_path):
    import sentencepiece

    model = tmp_path / "sp.model"
    with open(model, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(DOCS * 3), model_writer=f, vocab_size=60,
            model_type="bpe", pad_id=3)
    tokenizer = get_tokenizer(str(model))
    assert tokenizer.eos_id >= 0 and tokenizer.pad_id == 3
    assert tokenizer.decode(tokenizer.encode("document 3: word")) == "document 3: word"
    src = _sources(tmp_path)
    manifest = prepare([str(src)], tmp_path / "out", tokenizer=str(model), workers=1,
                       report=_quiet)
    assert manifest["tokenizer"]["name"] == "sentencepiece:sp.model"
    assert manifest["token_dtype"] == "uint16"
    assert len(open_prepared(str(tmp_path / "out"), tokenizer)) == manifest["tokens"]


def test_token_dtype_and_unknown_tokenizers():
    assert token_dtype(258) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(DataError, match="neither 'bytes' nor an existing file"):
        get_tokenizer("gpt-17")


def test_training_on_a_mixture_of_prepared_datasets(tmp_path, capsys):
    src = _sources(tmp_path)
    prepare([str(src / "a.jsonl")], tmp_path / "a", workers=1, report=_quiet)
    prepare([str(src / "c.txt")], tmp_path / "c", workers=1, report=_quiet)
    mixture = f'data.mixture=[["{tmp_path / "a"}", 0.5], ["{tmp_path / "c"}", 0.5]]'
    result = run(tiny_config(mixture, "train.steps=2", "train.eval_batches=1",
                             f"run_dir={tmp_path / 'run'}"))
    out = capsys.readouterr().out
    assert result.final_step == 2 and result.eval_loss is not None
    assert f"eval {tmp_path / 'a'}: held-out loss" in out
    assert f"eval {tmp_path / 'c'}: held-out loss" in out
    with pytest.raises(DataError, match="is not a prepared dataset"):
        run(tiny_config(f'data.mixture=[["{src}", 1.0]]', f"run_dir={tmp_path / 'r2'}"))


def test_parquet_column_is_read_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    table = pa.table({"id": list(range(30)), "body": DOCS[:29] + [None]})
    pq.write_table(table, src / "docs.parquet", row_group_size=10)
    messages = []
    manifest = prepare([str(src)], tmp_path / "out", field="body", workers=1,
                       report=messages.append)
    assert len(manifest["shards"]) == 3 and manifest["documents"] == 29
    assert any("skipped 1 line(s)" in m for m in messages)
    stream = open_prepared(str(tmp_path / "out"), TOKENIZER)
    np.testing.assert_array_equal(stream[0:len(stream)], token_stream(DOCS[:29], TOKENIZER))
    with pytest.raises(DataError, match=r"docs\.parquet: no column 'text' \(columns: id, body\)"):
        prepare([str(src)], tmp_path / "out2", workers=1, report=_quiet)


@pytest.mark.slow
def test_prepared_stream_pickles_as_paths_for_worker_processes(tmp_path):
    import pickle

    src = _sources(tmp_path)
    prepare([str(src)], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    stream = open_prepared(str(tmp_path / "out"), TOKENIZER)
    data = pickle.dumps(stream)
    assert len(data) < sum(len(str(path)) + 64 for path in stream.paths)  # no token data
    np.testing.assert_array_equal(pickle.loads(data)[0:len(stream)], stream[0:len(stream)])
    common = ("train.steps=2", "train.eval_batches=0", "train.log_every=1",
              f"data.path={tmp_path / 'out'}")
    threads = run(tiny_config(*common, f"run_dir={tmp_path / 'r1'}"))
    workers = run(tiny_config(*common, "data.workers=2", f"run_dir={tmp_path / 'r2'}"))
    assert workers.losses == threads.losses


@pytest.mark.slow
def test_prepare_killed_mid_run_resumes_byte_identical(tmp_path):
    """A real kill -9 of `python -m input.prepare` after its first finished shard."""
    src = tmp_path / "src"
    src.mkdir()
    for part in range(4):
        with open(src / f"part-{part}.jsonl", "w") as f:
            for i in range(300):
                f.write(json.dumps({"text": f"{part} {i} " + " ".join(DOCS) * 2}) + "\n")
    tokenizer = tmp_path / "tok.json"
    train_bpe(iter(DOCS * 5), 400, tokenizer)
    repo = str(pathlib.Path(__file__).resolve().parent.parent)

    def command(out):
        return [sys.executable, "-m", "input.prepare", str(src), "--out", str(out),
                "--tokenizer", str(tokenizer), "--workers", "2", "--shard-mb", "0.5"]

    subprocess.run(command(tmp_path / "whole"), cwd=repo, check=True, capture_output=True)
    killed = subprocess.Popen(command(tmp_path / "killed"), cwd=repo, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    for line in killed.stdout:
        if line.startswith("files "):
            os.killpg(killed.pid, signal.SIGKILL)  # the whole job, workers included
            break
    killed.wait()
    done = len(list((tmp_path / "killed").glob("shard-*.json")))
    total = len(json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"])
    assert 0 < done < total and not (tmp_path / "killed" / "manifest.json").exists()
    again = subprocess.run(command(tmp_path / "killed"), cwd=repo, check=True,
                           capture_output=True, text=True)
    assert f"({done} already done)" in again.stdout
    finished = {k: v for k, v in _snapshot(tmp_path / "killed").items() if ".tmp" not in k}
    assert finished == _snapshot(tmp_path / "whole")


def test_empty_source_file_is_reported(tmp_path):
    src = _sources(tmp_path)
    (src / "empty.jsonl").write_text("")
    messages = []
    prepare([str(src)], tmp_path / "out", workers=1, report=messages.append)
    assert any(m.endswith("empty.jsonl is empty; it adds no document") for m in messages)
