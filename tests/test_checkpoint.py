import ast
import pathlib
import re

import jax
import numpy as np
import pytest

import configs
import storage
from checkpoint import (
    Checkpointer,
    CheckpointError,
    checkpoint_dir,
    complete_steps,
    config_diff,
    integrity,
    latest_complete_step,
    reader,
    restore_params,
    saved_config,
)
from checkpoint.inspect import main as inspect_main
from conftest import TINY_OVERRIDES, corrupt_largest_state_file, tiny_config
from sharding import make_mesh, with_shardings
from train import run
from train.optimizer import make_optimizer
from train.state import abstract_state, init_state, state_shardings


def _state(config, devices=None):
    mesh = make_mesh(config.mesh, devices)
    tx = make_optimizer(config.optim, config.train.steps)
    shardings = state_shardings(config, mesh, tx)
    state = jax.jit(lambda: init_state(config, tx), out_shardings=shardings)()
    return state, tx, shardings


@pytest.mark.slow
def test_state_written_on_fsdp8_restores_onto_other_meshes(tmp_path):
    written = tiny_config("mesh.data=1", "mesh.fsdp=8", "model.embed_dim=64")
    state, tx, _ = _state(written)
    ckpt = Checkpointer(tmp_path, written.checkpoint)
    ckpt.save(7, state, {"next_index": 7}, configs.to_dict(written))
    ckpt.wait()
    for layout, devices in [(("mesh.data=2", "mesh.tensor=2"), jax.devices()[:4]),
                            (("mesh.data=1",), jax.devices()[:1])]:
        target_cfg = tiny_config("model.embed_dim=64", *layout)
        _, tx, shardings = _state(target_cfg, devices)
        target = with_shardings(abstract_state(target_cfg, tx), shardings)
        restored = ckpt.restore(ckpt.latest_step(), target)
        assert restored.step == 7 and restored.data_position == {"next_index": 7}
        assert restored.config["model"]["embed_dim"] == 64
        for a, b, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state),
                                  jax.tree.leaves(shardings), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert b.sharding == sharding
    ckpt.close()


def test_config_diff_names_each_differing_field():
    saved = configs.to_dict(tiny_config())
    current = configs.to_dict(tiny_config("model.num_layers=3", "train.steps=9"))
    assert config_diff(saved, current) == [
        "model.num_layers: checkpoint 2, config 3", "train.steps: checkpoint 6, config 9"]


def test_resume_with_a_different_model_is_refused_naming_fields(saved_run):
    changed = tiny_config(f"run_dir={saved_run}", "model.mlp_dim=96")
    expected = r"(?s)step 4.*model\.mlp_dim: checkpoint 64, config 96"
    with pytest.raises(CheckpointError, match=expected):
        run(changed)
    assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == ["2", "4"]


def test_compute_settings_and_fields_added_later_do_not_block_a_restore():
    from checkpoint import model_mismatch
    saved = configs.to_dict(tiny_config("model.dtype=float32"))
    current = configs.to_dict(tiny_config("model.dtype=bfloat16", "model.remat=full",
                                          "model.attention=xla", "model.loss_chunk_tokens=0"))
    assert model_mismatch(saved, current) == []
    legacy = {**saved, "model": {k: v for k, v in saved["model"].items()
                                 if k not in ("family", "tie_embeddings", "scan_layers")}}
    assert model_mismatch(legacy, current) == []
    scanned = configs.to_dict(tiny_config("model.scan_layers=true"))
    assert model_mismatch(saved, scanned) == ["model.scan_layers: checkpoint False, config True"]


@pytest.mark.parametrize("enabled", [True, False])
def test_a_restore_leaves_the_collector_as_it_found_it_even_when_it_fails(tmp_path, enabled):
    import gc

    from checkpoint.reader import verified_restore

    def restore(fail: bool):
        if fail:
            raise OSError("unreadable chunk")
        return "state"

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert verified_restore(tmp_path, 3, print, lambda: restore(False)) == "state"
        assert gc.isenabled() is enabled
        with pytest.raises(CheckpointError, match="step 3.*unreadable chunk"):
            verified_restore(tmp_path, 3, print, lambda: restore(True))
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_a_failed_restore_or_save_leaves_no_tracebacks_behind_but_other_errors_show(
        tmp_path, monkeypatch):
    import asyncio
    import logging
    import sys
    import types

    from checkpoint import aftermath
    from checkpoint.reader import verified_restore

    shown = []

    def hook(unraisable):
        shown.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", hook)
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    absl_log = logging.getLogger("absl")
    monkeypatch.setattr(absl_log, "filters", [])
    directory = tmp_path / "checkpoints"

    def failing_read():
        raise ValueError("DATA_LOSS: b-tree node")

    with pytest.raises(CheckpointError, match="step 4"):
        verified_restore(directory, 4, print, failing_read)
    assert sys.unraisablehook is hook and not asyncio_log.filters  # only commands install
    for _ in range(2):  # the hook and the filters are installed once
        aftermath.install()
    assert len(asyncio_log.filters) == len(absl_log.filters) == 1

    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError) as closed:  # what TensorStore's late reads run into
        loop.call_soon_threadsafe(print)

    @types.coroutine
    def pending():
        yield

    async def read(path):  # raises as Orbax's reads do when closed unfinished
        try:
            await pending()
        except GeneratorExit as e:
            raise Exception(f"Encountered error while reading {path}") from e

    def closed_unfinished(path):
        coroutine = read(path)
        coroutine.send(None)
        with pytest.raises(Exception, match="Encountered") as raised:
            coroutine.close()
        return raised.value

    other = RuntimeError("a real problem")
    read_elsewhere = closed_unfinished("/data/other/file")
    for error in (closed.value, closed_unfinished(f"{directory}/4/state/d/0a1b"), other,
                  read_elsewhere):
        sys.unraisablehook(types.SimpleNamespace(  # the fields of Python's UnraisableHookArgs
            exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__,
            err_msg=None, object=None))
    assert shown == [other, read_elsewhere]

    def logged(message, error, logger=asyncio_log):
        record = logging.LogRecord(logger.name, logging.ERROR, __file__, 1, message, None,
                                   (type(error), error, None))
        return record if logger.filter(record) else None

    ours = ValueError(f"DATA_LOSS: Error reading {directory}/4/state/d/0a1b")
    elsewhere = ValueError("DATA_LOSS: Error reading /data/other/file")
    assert not logged("Future exception was never retrieved", ours)
    assert not logged("Task exception was never retrieved", ours)
    assert not logged("_GatheringFuture exception was never retrieved", ours)  # a failed write
    assert logged("Future exception was never retrieved", elsewhere)
    assert logged("Unclosed event loop", ours)
    failed_here = logged("Save Finalize thread failed.", ours, absl_log)  # Orbax's own log
    failed_elsewhere = logged("Save Finalize thread failed.", elsewhere, absl_log)
    assert failed_here.exc_info is None and failed_elsewhere.exc_info[1] is elsewhere


def _two_saved_steps(run_dir):
    """Steps 1 and 2 of the tiny config, checksummed, in `run_dir`'s checkpoint directory."""
    config = tiny_config(f"run_dir={run_dir}")
    state, tx, shardings = _state(config)
    ckpt = Checkpointer(checkpoint_dir(run_dir), config.checkpoint, report=lambda _: None)
    for step in (1, 2):
        ckpt.save(step, state, {"next_index": step}, configs.to_dict(config))
    ckpt.wait()
    ckpt.close()
    return config, with_shardings(abstract_state(config, tx), shardings)


def _record_checksummed_files(monkeypatch):
    """The files whose checksum is checked from here on (computed from the bytes on disk,
    looked up in a bucket's listing), in a list that grows."""
    checked, checksum = [], integrity._checksum
    monkeypatch.setattr(integrity, "_checksum",
                        lambda path, *how: checked.append(path) or checksum(path, *how))
    return checked


def _items(directory, paths):
    """The item (state, config, data) each file of a step belongs to."""
    return {path.relative_to(directory).parts[1] for path in paths}


@pytest.fixture(params=["local", "gs"])
def run_place(request, tmp_path):
    """A run directory on disk, or in a new bucket of the local GCS-protocol server."""
    return tmp_path if request.param == "local" else request.getfixturevalue("bucket") + "/run"


def test_latest_step_and_its_config_are_found_without_reading_array_files(
        run_place, monkeypatch):
    config, target = _two_saved_steps(run_place)
    directory = checkpoint_dir(run_place)
    damaged = {step: corrupt_largest_state_file(directory / str(step))
               for step in (1, 2)}
    if storage.is_remote(directory):  # written in place; complete once its commit file is
        (directory / "3" / "state").mkdir(parents=True)
        (directory / "3" / "state" / "_METADATA").write_text("{}")
    else:  # written under a temporary name, renamed when complete
        (directory / "3.orbax-checkpoint-tmp-7").mkdir()
    checked = _record_checksummed_files(monkeypatch)

    assert [(s.step, s.complete) for s in reader.step_dirs(directory)] == [
        (1, True), (2, True), (3, False)]
    assert complete_steps(directory) == [1, 2]
    assert latest_complete_step(directory) == 2 and latest_complete_step(directory, 1) == 1
    with pytest.raises(CheckpointError, match=re.escape(
            f"no complete checkpoint step 3 in {directory}; complete steps: [1, 2]")):
        latest_complete_step(directory, 3)
    assert saved_config(directory, 2) == configs.to_dict(config)
    ckpt = Checkpointer(directory, config.checkpoint, report=lambda _: None)
    assert ckpt.read_config(1) == configs.to_dict(config)
    ckpt.close()
    assert checked and _items(directory, checked) == {"config"}  # a few kB, never the arrays

    kind = "CRC32C" if storage.is_remote(directory) else "CRC32"  # the bucket's own
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint step 2: file {damaged[2]} fails its {kind} checksum (corrupted)")):
        restore_params(directory, 2, target.params)
    assert "state" in _items(directory, checked)


def test_inspect_checksums_every_file_only_with_verify(tmp_path, monkeypatch, capsys):
    _two_saved_steps(tmp_path)
    directory = checkpoint_dir(tmp_path)
    damaged = corrupt_largest_state_file(directory / "1")
    checked = _record_checksummed_files(monkeypatch)

    def rows(*args):
        assert inspect_main([str(tmp_path), *args, *TINY_OVERRIDES]) == 0
        out = capsys.readouterr().out
        return out, [(r[0], r[3], " ".join(r[4:])) for r in map(str.split, out.splitlines())
                     if r and r[0].isdigit()]

    _, listed = rows()
    assert listed == [("1", "complete", "recorded"), ("2", "complete", "recorded")]
    assert _items(directory, checked) == {"config"}  # the latest step's, for the diff
    out, listed = rows("--verify")
    assert listed[1] == ("2", "complete", "ok")
    assert (f"DAMAGED: checkpoint step 1: file {damaged} fails its CRC32 checksum "
            "(corrupted)") in out
    assert {"config", "state", "data"} <= _items(directory, checked)


def test_checkpoint_imports_no_package_that_uses_it():
    """checkpoint/ sits below train/, generate/ and hf/, which read and write through it
    (STYLE.md: a package does not import the package that uses it)."""
    package = pathlib.Path(__file__).parent.parent / "checkpoint"
    above = {"train", "hf", "generate"}
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in above]
    assert not found
