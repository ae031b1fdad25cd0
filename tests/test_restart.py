"""What makes a restart fast: the saved executable of the step, and the paused collector."""

import functools
import gc
import os
import shutil
import weakref

import jax
import numpy as np
import pytest

import configs
from conftest import resolved, tiny_config
from sharding import batch_sharding, make_mesh, shardings_of
from train import run
from train.compile import executables
from train.compile.step import compile_train_step
from train.optimizer import make_optimizer
from train.process.collector import StartUp
from train.state import init_state, state_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile(config, saved, reports):
    config = resolved(config)
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, config.train.steps)
    target = state_target(config, mesh, tx)
    state = jax.jit(functools.partial(init_state, config, tx),
                    out_shardings=shardings_of(target))()
    step = compile_train_step(config, mesh, tx, target, saved, report=reports.append)
    return step, state, mesh


def _batch(config, mesh):
    rows, length = config.train.batch_size, config.data.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (rows, length + 1), dtype=np.int32)
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((rows, length), np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}
    return jax.device_put(host, batch_sharding(mesh, config.mesh.rules))


# Each test compiles a model shape of its own: XLA's cache (on for this process once any
# run enabled it) must not have it, or the step would not be saved (see the test below).
@pytest.mark.slow
def test_a_saved_step_computes_what_the_compiled_one_does(tmp_path):
    config, reports = tiny_config("model.mlp_dim=40"), []
    compiled, state, mesh = _compile(config, tmp_path, reports)
    loaded, same_state, _ = _compile(config, tmp_path, reports)
    assert compiled.source in ("compiled", "compilation cache")
    assert loaded.source == "saved executable"
    assert loaded.memory == compiled.memory and reports == []
    batch = _batch(config, mesh)
    expected = compiled.fn(state, batch)
    got = loaded.fn(same_state, batch)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(same_state))  # still donated
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert float(got[1]["loss"]) > 0


def test_the_key_changes_with_what_builds_the_step_and_only_that(monkeypatch):
    base = configs.to_dict(tiny_config())
    devices = jax.devices()
    key = executables.key(base, devices)
    assert key == executables.key(configs.to_dict(tiny_config()), devices)
    for override in ("train.log_every=7", "train.stop_after=1", "checkpoint.every=9",
                     "data.prefetch_batches=1", "run_dir=elsewhere"):
        assert executables.key(configs.to_dict(tiny_config(override)), devices) == key
    for override in ("model.num_layers=3", "optim.learning_rate=0.01", "train.steps=7",
                     "train.batch_size=16", "data.seq_len=64", "mesh.fsdp=2", "seed=1"):
        changed = configs.to_dict(tiny_config(override))
        assert executables.key(changed, devices) != key, override
    assert executables.key(base, devices[:4]) != key
    assert executables.key(base, devices[::-1]) != key
    monkeypatch.setenv("XLA_FLAGS", os.environ["XLA_FLAGS"] + " --xla_cpu_enable_fast_math=true")
    assert executables.key(base, devices) != key


def test_any_change_to_the_step_code_changes_the_source_digest(tmp_path):
    for package in executables.STEP_PACKAGES:
        shutil.copytree(os.path.join(REPO, package), tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert executables.source_digest(root=tmp_path) == executables.source_digest()
    loss = tmp_path / "model" / "loss.py"
    loss.write_text(loss.read_text() + "\n# a comment is a change too\n")
    assert executables.source_digest(root=tmp_path) != executables.source_digest()


@pytest.mark.slow
def test_a_step_from_the_compilation_cache_is_not_saved(tmp_path):
    # On XLA:CPU such an executable serializes without its kernels and fails when run.
    config, reports = tiny_config("model.mlp_dim=48"), []
    first, _, _ = _compile(config, None, reports)  # into the session's compilation cache
    again, _, _ = _compile(config, tmp_path, reports)
    assert first.source == "compiled" and again.source == "compilation cache"
    assert list(tmp_path.iterdir()) == [] and reports == []


@pytest.mark.slow
def test_a_damaged_saved_step_is_reported_and_compiled_again(tmp_path):
    config, reports = tiny_config("model.mlp_dim=44"), []
    _compile(config, tmp_path, reports)
    (entry,) = tmp_path.glob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short, as by a full disk
    again, _, _ = _compile(config, tmp_path, reports)
    assert again.source != "saved executable"
    assert len(reports) == 1 and str(entry) in reports[0] and "compiling it again" in reports[0]


def test_only_the_most_recently_used_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(executables, "KEEP", 2)
    compiled = jax.jit(lambda x: x + 1).lower(1.0).compile()
    devices, reports = jax.devices()[:1], []  # where jit put it
    executables.save(tmp_path, "a", compiled, reports.append)
    executables.save(tmp_path, "b", compiled, reports.append)
    os.utime(tmp_path / "a.pkl", (1, 1))
    os.utime(tmp_path / "b.pkl", (2, 2))
    assert executables.load(tmp_path, "a", devices, reports.append) is not None  # used now
    executables.save(tmp_path, "c", compiled, reports.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pkl", "c.pkl"]
    assert float(executables.load(tmp_path, "c", devices, reports.append)(1.0)) == 2.0
    assert executables.load(tmp_path, "b", devices, reports.append) is None
    assert reports == []


def test_a_run_leaves_the_collector_as_it_found_it_and_keeps_nothing_collectable(tmp_path):
    class Node:
        pass

    alive_through_the_run = Node()
    alive_through_the_run.itself = alive_through_the_run  # only the collector frees a cycle
    freed = weakref.ref(alive_through_the_run)
    with pytest.raises(configs.ConfigError):
        run(tiny_config("train.batch_size=12", f"run_dir={tmp_path}"))
    assert gc.isenabled()
    result = run(tiny_config("train.eval_batches=0", f"run_dir={tmp_path}"))
    assert result.final_step == 6 and gc.isenabled()
    del alive_through_the_run  # frozen while the run trained: a notebook would leak it
    gc.collect()
    assert freed() is None
    gc.disable()  # a caller who turned the collector off keeps it off
    try:
        with StartUp() as startup:
            startup.done()
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
