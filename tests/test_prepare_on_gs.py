"""`input.prepare` with sources and --out in a bucket of the local GCS-protocol server."""

import gzip
import io
import json
import re
import uuid

import pytest

import storage
from input import DataError
from input.prepare import main as prepare_main
from input.prepare import plan_units, prepare
from input.tokenizer import train_bpe

DOCS = [f"document {i}: " + "word " * (i * 7 % 50) + "\u00e9t\u00e9" for i in range(30)]


def _jsonl(docs):
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def _parquet(docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": docs}), buffer, row_group_size=3)
    return buffer.getvalue()


SOURCES = {  # what a small corpus holds: every input type, nested, and an empty file
    "a.jsonl": _jsonl(DOCS[:20]),
    "nested/b.jsonl.gz": gzip.compress(_jsonl(DOCS[20:])),
    "c.txt": ("a long text file " * 200).encode(),
    "d.parquet": _parquet(DOCS[:6]),
    "empty.jsonl": b"",
}


def _put(root, files):
    for name, data in files.items():
        storage.write_atomically(storage.path(f"{root}/{name}"), data)
    return root


def _snapshot(root):
    """Every file under `root` (a directory or a bucket prefix) by name -> its bytes."""
    names = sorted(storage.files_under(root))
    return dict(zip(names, storage.paths.read_files([storage.path(root) / n for n in names]),
                    strict=True))


def _quiet(_):
    pass


def test_bucket_sources_prepared_to_a_bucket_match_a_local_prepare(bucket, tmp_path):
    src = _put(f"{bucket}/src", SOURCES)
    local = prepare([src], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    messages = []
    remote = prepare([src], f"{bucket}/data", shard_mb=0.001, workers=2, report=messages.append)
    assert _snapshot(f"{bucket}/data") == _snapshot(tmp_path / "out")
    assert remote == local and remote["documents"] == 30 + 1 + 6
    assert f"warning: {src}/empty.jsonl is empty; it adds no document" in messages
    gz_units = [r for r in remote["shards"] if r["source"] == f"{src}/nested/b.jsonl.gz"]
    assert [(r["start"], r["end"]) for r in gz_units] == [(0, -1)]  # one unit, never split
    assert len([r for r in remote["shards"] if r["source"] == f"{src}/a.jsonl"]) > 2
    # Each record's CRC32C is the one the bucket keeps: a reader checks it without a download.
    stored = storage.objects_under(f"{bucket}/data")
    for record in remote["shards"]:
        for kind in ("tokens", "docs"):
            assert record["crc32c"][kind] == stored[f"{record['name']}.{kind}.npy"].crc32c


def test_local_sources_prepared_to_a_bucket_match_a_local_prepare(bucket, tmp_path):
    src = tmp_path / "src"
    for name, data in SOURCES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    local = prepare([str(src / "*.jsonl"), str(src / "c.txt")], tmp_path / "out",
                    shard_mb=0.002, workers=1, report=_quiet)
    assert prepare_main([str(src / "*.jsonl"), str(src / "c.txt"), "--out", f"{bucket}/data",
                         "--shard-mb", "0.002", "--workers", "1"]) == 0
    assert _snapshot(f"{bucket}/data") == _snapshot(tmp_path / "out")
    assert local["sources"] == [str(src / n) for n in ("a.jsonl", "c.txt", "empty.jsonl")]
    assert all(set(r["crc32c"]) == {"tokens", "docs"} for r in local["shards"])


def test_tokenizer_in_a_bucket_prepares_as_its_local_file(bucket, tmp_path):
    tokenizer = tmp_path / "tok.json"
    train_bpe(iter(DOCS), 300, tokenizer)
    _put(bucket, {"tok.json": tokenizer.read_bytes(), "a.jsonl": SOURCES["a.jsonl"]})
    local = prepare([f"{bucket}/a.jsonl"], tmp_path / "out", tokenizer=str(tokenizer),
                    workers=1, report=_quiet)
    remote = prepare([f"{bucket}/a.jsonl"], f"{bucket}/data", tokenizer=f"{bucket}/tok.json",
                     workers=1, report=_quiet)
    assert remote["tokenizer"] == local["tokenizer"] and remote["tokenizer"]["vocab_size"] == 300
    assert _snapshot(f"{bucket}/data") == _snapshot(tmp_path / "out")


def test_killed_prepare_into_a_bucket_redoes_only_unfinished_shards(bucket):
    src = _put(f"{bucket}/src", {k: SOURCES[k] for k in ("a.jsonl", "c.txt")})
    whole, resumed = f"{bucket}/whole", f"{bucket}/resumed"
    prepare([f"{src}/*"], whole, shard_mb=0.0005, workers=1, train_tokenizer=300, report=_quiet)
    finished = _snapshot(whole)
    _put(resumed, finished)
    # As if killed: two shards never finished, one mid-upload (its marker not yet written),
    # no manifest.
    for name in ("shard-00001.json", "shard-00004.json", "shard-00002.json",
                 "shard-00002.tokens.npy", "manifest.json"):
        storage.path(f"{resumed}/{name}").unlink()
    storage.path(f"{resumed}/shard-00004.tokens.npy").write_bytes(b"partial")
    messages = []
    prepare([f"{src}/*"], resumed, shard_mb=0.0005, workers=1, train_tokenizer=300,
            report=messages.append)
    shards = len(json.loads(finished["manifest.json"])["shards"])
    assert messages[0] == f"using the tokenizer trained earlier: {resumed}/tokenizer.json"
    assert messages[1] == f"2 files -> {shards} shards ({shards - 3} already done)"
    assert _snapshot(resumed) == finished


def test_cutting_an_object_reads_only_near_the_cuts(bucket, tmp_path, monkeypatch):
    lines = b"".join(b"%06d " % i + b"x" * (i % 190) + b"\n" for i in range(20_000))
    src = _put(f"{bucket}/src", {"big.jsonl": lines})
    (tmp_path / "big.jsonl").write_bytes(lines)
    read = []
    original = storage.paths.read_range
    monkeypatch.setattr("input.prepare.read_range",
                        lambda *a: read.append(len(data := original(*a))) or data)
    remote = plan_units([f"{src}/big.jsonl"], 200_000)
    assert len(read) == len(remote) - 1 and max(read) <= 8192  # one read of 8 KB per cut
    local = plan_units([str(tmp_path / "big.jsonl")], 200_000)
    assert [(u.start, u.end) for u in remote] == [(u.start, u.end) for u in local]
    assert all(lines[u.end - 1:u.end] == b"\n" for u in remote) and remote[-1].end == len(lines)
    assert len(remote) == 11


def test_bad_sources_and_outputs_in_buckets_are_named(bucket, capsys):
    missing_bucket = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
    src = _put(f"{bucket}/src", {"x.csv": b"a,b\n", "bad/y.jsonl": b'{"text": "a"}\n{broken\n',
                                 "ok.jsonl": _jsonl(DOCS[:2])})
    for source in (f"{missing_bucket}/a.jsonl", f"{src}/missing.jsonl", f"{src}/none/*.jsonl",
                   f"{missing_bucket}/dir/*.jsonl"):
        with pytest.raises(DataError, match=re.escape(f"source '{source}' matches no .txt/")):
            prepare([source], f"{bucket}/out", workers=1, report=_quiet)
    with pytest.raises(DataError, match=rf"{src}/x\.csv: unsupported file type"):
        prepare([f"{src}/x.csv"], f"{bucket}/out", workers=1, report=_quiet)
    with pytest.raises(DataError, match=rf"{src}/bad/y\.jsonl: line 2"):
        prepare([f"{src}/bad"], f"{bucket}/out", workers=1, report=_quiet)
    assert prepare_main([f"{src}/ok.jsonl", "--out", f"{missing_bucket}/data"]) == 2
    assert f"bucket {missing_bucket} does not exist" in capsys.readouterr().err
    assert not storage.paths.bucket_exists(missing_bucket)  # and it was not created
