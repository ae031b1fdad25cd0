"""A run whose run directory is a gs:// URL, on the local GCS-protocol server."""

import json
import pathlib

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import storage
from checkpoint import checkpoint_dir, complete_steps
from checkpoint.inspect import main as inspect_main
from conftest import SAVED_RUN, TINY_OVERRIDES, tiny_config
from generate.__main__ import main as generate_main
from generate.loading import load
from observe import metrics_log, report, tensorboard_log
from train import run


def _scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_run_in_a_bucket_stops_resumes_and_ends_as_the_same_run_on_disk(
        bucket, saved_run, tmp_path, capsys):
    run_dir = f"{bucket}/run"
    first = run(tiny_config(*SAVED_RUN, f"run_dir={run_dir}", "train.stop_after=4"))
    assert first.final_step == 4
    assert complete_steps(checkpoint_dir(run_dir)) == [2, 4]
    resumed = run(tiny_config(*SAVED_RUN, f"run_dir={run_dir}"))
    assert resumed.start_step == 4 and resumed.final_step == 6
    out = capsys.readouterr().out
    assert "checkpoint step 6: committed" in out

    on_disk = run(tiny_config(*SAVED_RUN, f"run_dir={saved_run}"))  # the same run, local
    for a, b in zip(jax.tree.leaves(on_disk.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed.losses == on_disk.losses

    root = storage.path(run_dir)
    assert [r["step"] for r in metrics_log.read(run_dir) if "loss" in r] == [
        r["step"] for r in metrics_log.read(saved_run) if "loss" in r]
    assert json.loads((root / "goodput.json").read_text())
    local_copy = tmp_path / "copy"  # TensorBoard's reader, on the event files as they are
    local_copy.mkdir()
    for name in storage.files_under(root / tensorboard_log.DIRNAME):
        (local_copy / name).write_bytes((root / tensorboard_log.DIRNAME / name).read_bytes())
    in_bucket = _scalars(local_copy)
    on_disk_events = _scalars(storage.path(saved_run) / tensorboard_log.DIRNAME)
    assert in_bucket.keys() == on_disk_events.keys()
    assert in_bucket["train/loss"] == on_disk_events["train/loss"]  # timings differ, not these
    assert report.plot(run_dir) == root / "report.png" and (root / "report.png").exists()
    assert not (root / "run.0.lock").exists()  # released

    loaded = load(run_dir)  # what `python -m generate gs://...` samples from
    assert loaded.step == 6
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(resumed.state.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    assert inspect_main([run_dir, *TINY_OVERRIDES, *SAVED_RUN, "--verify"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()
              if line.strip()[:1].isdigit()]
    assert [(row[0], row[3], row[4]) for row in listed] == [
        ("2", "complete", "ok"), ("4", "complete", "ok"), ("6", "complete", "ok")]

    # The command-line tools take the bucket's paths as they take local ones.
    assert report.main([run_dir, "--out", f"{bucket}/plots/loss.png"]) == 0
    assert storage.path(f"{bucket}/plots/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    storage.path(f"{bucket}/prompts.txt").write_text("The cat\n\nA dog\n")
    capsys.readouterr()
    assert generate_main([run_dir, "--prompt-file", f"{bucket}/prompts.txt",
                          "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- 'The cat'" in out and "--- 'A dog'" in out


def test_a_run_copied_from_disk_into_a_bucket_resumes_there(bucket, saved_run):
    """A laptop's run uploaded as it is (`gcloud storage cp -r`) goes on in the bucket: its
    steps' CRC32s are checked by reading, the new steps get the bucket's CRC32Cs."""
    remote = storage.path(f"{bucket}/run")
    for file in sorted(pathlib.Path(saved_run).rglob("*")):
        if file.is_file() and not file.name.endswith(".lock"):
            (remote / file.relative_to(saved_run).as_posix()).write_bytes(file.read_bytes())
    resumed = run(tiny_config(*SAVED_RUN, f"run_dir={remote}"))
    assert resumed.start_step == 4 and resumed.final_step == 6
    local = run(tiny_config(*SAVED_RUN, f"run_dir={saved_run}"))
    for a, b in zip(jax.tree.leaves(local.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manifests = {step: json.loads((checkpoint_dir(remote) / str(step) / "checksums.json")
                                  .read_text()) for step in (4, 6)}
    assert all(set(entry) == {"size", "crc32"} for entry in manifests[4].values())  # disk's
    assert all(set(entry) == {"size", "crc32c"} for entry in manifests[6].values())
