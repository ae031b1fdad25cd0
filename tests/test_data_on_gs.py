"""Training data, held-out data and tokenizers read from a bucket of the local GCS-protocol
server: the same rows, losses and errors as the same files on disk."""

import dataclasses
import json
import pickle
import threading
import time

import numpy as np
import pytest

import storage
from conftest import tiny_config
from input import DataError, data_sources, get_tokenizer, train_dataset, train_iterator
from input.corpus import load_documents
from input.pipeline import PackedRows
from input.prepare import prepare
from input.prepared import RemoteShard, open_prepared
from input.tokenizer import train_bpe
from train import run

DOCS = [f"document {i}: " + "word " * (i * 7 % 40) + "end." for i in range(40)]


def _quiet(*_):
    pass


def _upload(local, url):
    """Every file under the local directory `local` as an object under `url`."""
    for name in storage.files_under(local):
        storage.path(f"{url}/{name}").write_bytes((local / name).read_bytes())


def _jsonl(docs):
    return "".join(json.dumps({"text": d}) + "\n" for d in docs)


def _prepared(tmp_path, bucket, name, docs, tokenizer="bytes"):
    """A dataset prepared in small shards onto disk and straight into the bucket (`--out
    gs://...`): (path, url)."""
    src = tmp_path / f"{name}.jsonl"
    src.write_text(_jsonl(docs))
    local, url = tmp_path / name, f"{bucket}/{name}"
    for out in (local, url):
        prepare([str(src)], out, tokenizer=tokenizer, shard_mb=0.0005, workers=1, report=_quiet)
    return str(local), url


@pytest.fixture
def dataset(tmp_path, bucket):
    return _prepared(tmp_path, bucket, "data", DOCS)


@pytest.mark.slow
def test_run_from_a_bucket_has_the_losses_of_the_same_data_on_disk(tmp_path, bucket):
    """Mixture, eval_path and tokenizer all from the bucket: the same losses to the bit."""
    train_bpe(iter(DOCS), 262, tmp_path / "tokenizer.json")
    storage.path(f"{bucket}/tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    tok = str(tmp_path / "tokenizer.json")
    a = _prepared(tmp_path, bucket, "a", DOCS[:25], tok)
    b = _prepared(tmp_path, bucket, "b", DOCS[25:], tok)
    held = _prepared(tmp_path, bucket, "held", DOCS[::3], tok)

    def losses(where, tokenizer, run_dir):
        result = run(tiny_config(
            f"data.mixture={json.dumps([[a[where], 0.6], [b[where], 0.4]])}",
            f"data.eval_path={held[where]}",
            f"data.tokenizer={tokenizer}", "train.steps=3", "checkpoint.every=0",
            f"run_dir={tmp_path / run_dir}"))
        return result.losses, result.eval_loss

    on_disk = losses(0, tok, "local")
    assert on_disk == losses(1, f"{bucket}/tokenizer.json", "remote")
    assert len(on_disk[0]) >= 2 and on_disk[1] is not None


def test_tokenizer_from_a_bucket_has_the_identity_of_the_file_on_disk(tmp_path, bucket):
    local = train_bpe(iter(DOCS), 262, tmp_path / "tokenizer.json")
    url = f"{bucket}/tokenizer.json"
    storage.path(url).write_bytes((tmp_path / "tokenizer.json").read_bytes())
    remote = get_tokenizer(url)
    assert remote.identity() == local.identity()
    assert remote.encode(DOCS[3]).tolist() == local.encode(DOCS[3]).tolist()
    with pytest.raises(DataError, match="neither 'bytes' nor an existing file"):
        get_tokenizer(f"{bucket}/missing.json")


def test_raw_jsonl_prefix_and_object_in_a_bucket_read_as_on_disk(tmp_path, bucket):
    (tmp_path / "raw" / "sub").mkdir(parents=True)
    (tmp_path / "raw" / "one.jsonl").write_text(_jsonl(DOCS[:5]))
    (tmp_path / "raw" / "sub" / "two.txt").write_text("plain text")
    (tmp_path / "raw" / "skip.csv").write_text("not read")
    _upload(tmp_path / "raw", f"{bucket}/raw")
    assert load_documents(f"{bucket}/raw") == load_documents(str(tmp_path / "raw")) \
        == DOCS[:5] + ["plain text"]
    assert load_documents(f"{bucket}/raw/one.jsonl") == DOCS[:5]
    with pytest.raises(DataError, match=f"data.path '{bucket}/nothing' does not exist"):
        load_documents(f"{bucket}/nothing")


def test_prepared_stream_in_a_bucket_pickles_without_its_data(dataset):
    local, url = dataset
    tokenizer = get_tokenizer()
    remote = open_prepared(url, tokenizer)
    assert all(isinstance(s, RemoteShard) for s in remote.shards) and len(remote.shards) > 1
    whole = open_prepared(local, tokenizer)
    assert len(remote) == len(whole)
    assert np.array_equal(remote[0:len(remote)], whole[0:len(whole)])
    assert np.array_equal(remote[17:611], whole[17:611])  # across shard boundaries
    payload = pickle.dumps(remote)
    assert len(payload) < 2000 and np.array_equal(pickle.loads(payload)[5:300], whole[5:300])


@pytest.mark.slow
def test_grain_worker_process_reads_the_bucket_as_the_disk(dataset):
    tokenizer = get_tokenizer()

    def batches(path, workers):
        cfg = dataclasses.replace(tiny_config(f"data.path={path}").data, workers=workers)
        ds = train_dataset(data_sources(cfg, tokenizer).train[0].rows, seed=1, global_batch=4)
        iterator = train_iterator(ds, cfg)
        return [next(iterator)["inputs"] for _ in range(3)]

    local, url = dataset
    for mine, theirs in zip(batches(url, 1), batches(local, 0), strict=True):
        assert np.array_equal(mine, theirs)


def _flip_a_byte(url):
    data = bytearray(storage.path(url).read_bytes())
    data[-1] ^= 1
    storage.path(url).write_bytes(bytes(data))


def test_corrupted_and_missing_shard_objects_are_named(dataset):
    _, url = dataset
    tokenizer = get_tokenizer()
    manifest = json.loads(storage.path(f"{url}/manifest.json").read_text())
    first, second = (f"{url}/{r['name']}.tokens.npy" for r in manifest["shards"][:2])
    _flip_a_byte(first)
    with pytest.raises(DataError, match=f"shard {first} fails its CRC32C checksum"):
        open_prepared(url, tokenizer)
    assert len(open_prepared(url, tokenizer, verify=False)) == manifest["tokens"]
    storage.path(second).unlink()
    with pytest.raises(DataError, match=f"shard {second} is missing"):
        open_prepared(url, tokenizer, verify=False)


def test_manifest_without_crc32c_streams_each_shard_through_crc32(dataset):
    _, url = dataset
    tokenizer = get_tokenizer()
    manifest = json.loads(storage.path(f"{url}/manifest.json").read_text())
    for record in manifest["shards"]:
        del record["crc32c"]
    storage.path(f"{url}/manifest.json").write_text(json.dumps(manifest))
    assert len(open_prepared(url, tokenizer)) == manifest["tokens"]
    last = f"{url}/{manifest['shards'][-1]['name']}.tokens.npy"
    _flip_a_byte(last)
    with pytest.raises(DataError, match=f"shard {last} fails its CRC32 checksum"):
        open_prepared(url, tokenizer)


def test_a_shard_object_of_the_wrong_size_is_named(dataset):
    _, url = dataset
    manifest = json.loads(storage.path(f"{url}/manifest.json").read_text())
    first = f"{url}/{manifest['shards'][0]['name']}.tokens.npy"
    storage.path(first).write_bytes(storage.path(first).read_bytes()[:-4])
    with pytest.raises(DataError, match=f"shard {first} is truncated or not a token shard"):
        open_prepared(url, get_tokenizer(), verify=False)


class _SlowRemoteStream:
    """A token stream whose every slice is a 50 ms round trip, counting those in flight."""

    remote = True

    def __init__(self, tokens):
        self.tokens, self.in_flight, self.most_in_flight = tokens, 0, 0
        self.lock = threading.Lock()

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        return self.tokens[index]


def test_the_rows_of_a_batch_from_a_bucket_are_requested_together():
    """A shuffled row in a bucket is a round trip of its own: a batch waits for one round
    trip, not one per row, and holds the rows it would hold on disk."""
    tokens = np.arange(2000, dtype=np.int32) % 250
    slow = _SlowRemoteStream(tokens)
    remote_rows = PackedRows(slow, seq_len=16, pad_id=0, eos_id=257)
    local_rows = PackedRows(tokens, seq_len=16, pad_id=0, eos_id=257)
    remote = train_dataset(remote_rows, seed=3, global_batch=8)
    local = train_dataset(local_rows, seed=3, global_batch=8)
    for step in (0, 5):
        for name, values in local[step].items():
            np.testing.assert_array_equal(remote[step][name], values)
    assert slow.most_in_flight == 8
