"""The storage seam on a local directory and on a bucket of the local GCS-protocol server."""

import os

import pytest

import storage


@pytest.fixture(params=["local", "gs"])
def place(request, tmp_path):
    """A directory: local, or a prefix in a new bucket."""
    if request.param == "local":
        return str(tmp_path / "place")
    return request.getfixturevalue("bucket") + "/place"


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(storage.path("gs://b/run")) == "gs://b/run"
    assert os.fspath(storage.path("runs/a")) == str(tmp_path / "runs" / "a")
    assert storage.is_remote("gs://b/x") and not storage.is_remote(tmp_path)


def test_files_under_lists_nested_files_with_sizes(place):
    root = storage.path(place)
    (root / "a" / "b").mkdir(parents=True, exist_ok=True)
    (root / "a" / "b" / "deep.bin").write_bytes(b"12345")
    (root / "top.txt").write_text("xy")
    assert storage.files_under(root) == {os.path.join("a", "b", "deep.bin"): 5, "top.txt": 2}


def test_write_atomically_replaces_the_whole_file(place):
    target = storage.path(place) / "config.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomically(target, "first")
    storage.write_atomically(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["config.json"]  # no temporary left


def test_appends_reach_the_file_in_order_and_close_flushes(place):
    target = storage.path(place) / "log.jsonl"
    log = storage.AppendableFile(target, flush_seconds=3600)
    log.append(b"one\n")
    log.flush()
    log.append(b"two\n")
    log.append(b"three\n")
    if storage.is_remote(target):  # held back until the interval or close
        assert target.read_bytes() == b"one\n"
    log.close()
    assert target.read_bytes() == b"one\ntwo\nthree\n"
    again = storage.AppendableFile(target, flush_seconds=0)  # a restarted run appends
    again.append(b"four\n")
    assert target.read_bytes() == b"one\ntwo\nthree\nfour\n"
    again.close()
    assert [p.name for p in target.parent.iterdir()] == ["log.jsonl"]  # no parts left


def test_every_client_gives_up_on_a_dead_bucket_after_the_same_tries():
    """TensorStore's own default (32 tries, backoff to 32 s) would hold a failed save for a
    quarter of an hour; Orbax's contexts get the tries gcsfs has."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    import checkpoint.manager  # noqa: F401 (bounds TensorStore's tries when imported)

    for use_ocdbt in (True, False):
        spec = tensorstore_utils.get_ts_context(use_ocdbt=use_ocdbt).spec.to_json()
        assert spec["gcs_request_retries"]["max_retries"] == storage.paths.gcs_tries()
