"""`input.prepare --ray`: the same work units as tasks of a Ray cluster of this machine (two
CPUs, no dashboard, no usage report), with sources and output in a bucket of the local GCS
server; every result is compared with a local prepare of the same sources."""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray would otherwise report to the internet

import gzip
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import ray
from test_prepare_on_gs import DOCS, SOURCES, _jsonl, _put, _quiet, _snapshot

import storage
from input import DataError
from input.prepare import main as prepare_main
from input.prepare import prepare

REPO = pathlib.Path(__file__).resolve().parent.parent
TASK = "ray::_tokenize_task"  # the process title of a worker running a unit


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (its start is most of a test's time); its address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _many_units(bucket, lines=6000):
    """A source of ~150 units of 4 KB, in a bucket: long enough to be interrupted."""
    docs = [f"line {i} " + "word " * (i % 40) for i in range(lines)]
    return _put(f"{bucket}/src", {"big.jsonl": _jsonl(docs),
                                  "b.jsonl.gz": gzip.compress(_jsonl(docs[:100]))})


def test_ray_prepare_of_a_bucket_is_byte_identical_to_a_local_one(cluster, bucket, tmp_path):
    src = _put(f"{bucket}/src", SOURCES)
    local = prepare([src], tmp_path / "out", shard_mb=0.001, workers=1, report=_quiet)
    messages = []
    remote = prepare([src], f"{bucket}/data", shard_mb=0.001, report=messages.append, ray="auto")
    assert _snapshot(f"{bucket}/data") == _snapshot(tmp_path / "out")
    assert remote == local and len(remote["shards"]) == 8
    progress = [m for m in messages if m.startswith("files ")]
    assert "shards" in progress[-1] and "MB/s" in progress[-1] and "tokens/s" in progress[-1]
    assert "(1 whole .jsonl.gz files: gzip cannot be cut)" in progress[-1]
    assert f"warning: {src}/empty.jsonl is empty; it adds no document" in messages


def test_ray_trained_tokenizer_is_the_local_one(cluster, bucket, tmp_path):
    src = _put(f"{bucket}/src", {k: SOURCES[k] for k in ("a.jsonl", "nested/b.jsonl.gz")})
    prepare([src], tmp_path / "out", shard_mb=0.0005, workers=1, train_tokenizer=300,
            report=_quiet)
    assert prepare_main([src, "--out", f"{bucket}/data", "--shard-mb", "0.0005",
                         "--train-tokenizer", "300", "--ray"]) == 0
    remote = _snapshot(f"{bucket}/data")
    assert remote == _snapshot(tmp_path / "out") and b"\"vocab\"" in remote["tokenizer.json"]


def _worker_running_a_unit() -> int | None:
    for entry in pathlib.Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(TASK.encode()):
                return int(entry.name)
        except OSError:  # gone meanwhile
            continue
    return None


@pytest.mark.slow
def test_worker_killed_mid_job_is_retried_byte_identical(cluster, bucket, tmp_path):
    src = _many_units(bucket)
    finished = []
    job = threading.Thread(target=lambda: finished.append(prepare(
        [src], f"{bucket}/data", shard_mb=0.004, report=_quiet, ray="auto")))
    job.start()
    deadline, killed = time.monotonic() + 60, None
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        if (pid := _worker_running_a_unit()) is not None:
            os.kill(pid, 9)
            killed = pid
        time.sleep(0.01)
    assert killed is not None and job.is_alive()  # killed while the job ran
    job.join(timeout=120)
    assert finished and finished[0]["documents"] == 6000 + 100
    prepare([src], tmp_path / "out", shard_mb=0.004, workers=1, report=_quiet)
    assert _snapshot(f"{bucket}/data") == _snapshot(tmp_path / "out")


def _markers(url) -> dict[str, int]:
    """The done markers under `url` by name -> the generation of the object."""
    found = storage.paths.gcs().find(url.removeprefix("gs://"), detail=True)
    return {name.rsplit("/", 1)[1]: int(info["generation"]) for name, info in found.items()
            if name.rsplit("/", 1)[1].startswith("shard-") and name.endswith(".json")}


@pytest.mark.slow
def test_driver_killed_and_restarted_redoes_only_unfinished_units(cluster, bucket, tmp_path):
    src, out = _many_units(bucket), f"{bucket}/data"
    driver = subprocess.Popen(
        [sys.executable, "-m", "input.prepare", src, "--out", out, "--shard-mb", "0.004",
         "--ray", cluster], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_markers(out)) < 5 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    before = _markers(out)
    while (time.sleep(1.0) or _markers(out)) != before:  # the dead driver's last tasks end
        before = _markers(out)
    messages = []
    manifest = prepare([src], out, shard_mb=0.004, report=messages.append, ray="auto")
    units = len(manifest["shards"])
    assert 5 <= len(before) < units  # killed mid-job
    assert messages[0] == f"2 files -> {units} shards ({len(before)} already done)"
    after = _markers(out)
    assert {name: after[name] for name in before} == before  # finished units: not redone
    assert len(after) == units
    prepare([src], tmp_path / "out", shard_mb=0.004, workers=1, report=_quiet)
    assert _snapshot(out) == _snapshot(tmp_path / "out")


def _error(**kwargs) -> tuple[type, str]:
    with pytest.raises(Exception) as caught:
        prepare(report=_quiet, **kwargs)
    return type(caught.value), str(caught.value)


def test_bad_input_gets_the_local_runners_named_errors(cluster, bucket, tmp_path):
    src = _put(f"{bucket}/src", {
        "bad.jsonl.gz": b"not gzip at all\n", "broken.jsonl": b'{"text": "a"}\n{broken\n',
        "untexted.jsonl": b'{"body": "a"}\n', "mixed.jsonl": _jsonl(DOCS[:2]) + b'{"id": 1}\n',
        "damaged.parquet": b"PAR1 nothing more"})
    cases = {
        "missing bucket": dict(sources=[f"{src}/mixed.jsonl"], out="gs://no-such-bucket-x1/d"),
        "missing source bucket": dict(sources=["gs://no-such-bucket-x1/a.jsonl"], out=bucket),
        "unreadable gzip": dict(sources=[f"{src}/bad.jsonl.gz"], out=f"{bucket}/o1"),
        "damaged parquet": dict(sources=[f"{src}/damaged.parquet"], out=f"{bucket}/o2"),
        "broken line": dict(sources=[f"{src}/broken.jsonl"], out=f"{bucket}/o3"),
        "no text field": dict(sources=[f"{src}/untexted.jsonl"], out=f"{bucket}/o4"),
    }
    for case, kwargs in cases.items():
        local = _error(workers=1, **kwargs)
        assert _error(ray="auto", **kwargs) == local, case
        assert local[0] is DataError, (case, local)
    assert "broken.jsonl: line 2" in _error(ray="auto", **cases["broken line"])[1]
    assert (f"{src}/bad.jsonl.gz: not a readable gzip file"
            in _error(ray="auto", **cases["unreadable gzip"])[1])
    # A line without the field is skipped and counted, as locally.
    messages = []
    prepare([f"{src}/mixed.jsonl"], f"{bucket}/o5", report=messages.append, ray="auto")
    assert any("skipped 1 line(s) without the text field" in m for m in messages)


def test_default_install_and_training_never_import_ray(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl(DOCS[:3]))
    check = f"""
import runpy, sys
from input.prepare import main
assert main([{str(tmp_path / 'a.jsonl')!r}, '--out', {str(tmp_path / 'out')!r}]) == 0
sys.argv = ['train', '--help']
try:
    runpy.run_module('train', run_name='__main__')
except SystemExit:
    pass
assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'
sys.modules['ray'] = None  # as if not installed: --ray says what to install
assert main([{str(tmp_path / 'a.jsonl')!r}, '--out', {str(tmp_path / 'o2')!r}, '--ray']) == 2
"""
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error: --ray needs Ray: pip install 'io-first-lm[ray]'" in done.stderr


@pytest.mark.parametrize("first", ["a.jsonl", "gs://bucket/raw/", "raw/*.jsonl"])
def test_a_source_after_ray_is_not_taken_for_its_address(tmp_path, monkeypatch, capsys, first):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_bytes(_jsonl(DOCS[:3]))
    with pytest.raises(SystemExit) as exit_:
        prepare_main(["--ray", first, "b.jsonl", "--out", "out"])
    assert exit_.value.code == 2
    assert (f"--ray took '{first}', a source, as the cluster's address: put --ray after the "
            "sources, or write --ray=ADDRESS") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
