"""A run's logs in a gs:// run directory, on the local GCS-protocol server, without training:
metrics.jsonl across a restart, TensorBoard events, goodput.json, the report and a profile."""

import gzip
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import storage
from configs.schema import ProfileConfig
from observe import goodput, metrics_log, profiling, report, tensorboard_log

FIRST = [{"step": 1, "loss": 5.5, "lr": 1e-3, "tokens_per_s": 1000.0, "data_wait_pct": 1.5},
         {"step": 2, "loss": 4.25, "lr": 2e-3, "tokens_per_s": 1100.0, "data_wait_pct": 0.5},
         {"step": 2, "dataset": "web", "eval_loss": 4.5, "eval_perplexity": 90.0}]
RESTARTED = [{"step": 3, "loss": 3.75, "lr": 3e-3, "tokens_per_s": 1200.0, "data_wait_pct": 2.0}]


def _log(run_dir, records):
    log = metrics_log.MetricsLog(run_dir)
    for record in records:
        log.write(record)
    return log


def test_metrics_and_events_in_a_bucket_hold_every_record_across_a_restart(bucket, tmp_path):
    run_dir = f"{bucket}/run"
    root = storage.path(run_dir)
    first = _log(run_dir, FIRST)
    # Buffered for up to FLUSH_SECONDS (the test writes within them), then sent on close.
    assert not (root / metrics_log.FILENAME).exists()
    first.close()
    assert [r["step"] for r in metrics_log.read(run_dir)] == [1, 2, 2]
    with _log(run_dir, RESTARTED):  # a restart appends to the same object
        pass

    records = metrics_log.read(run_dir)
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == FIRST + RESTARTED
    assert all(isinstance(r["time"], float) for r in records)
    assert records == [json.loads(line) for line in
                       (root / metrics_log.FILENAME).read_text().splitlines()]

    # TensorBoard's own reader, on the two event files (one per writer) as they are.
    events_dir = root / tensorboard_log.DIRNAME
    names = sorted(storage.files_under(events_dir))
    assert len(names) == 2 and all(n.startswith("events.out.tfevents.") for n in names)
    local = tmp_path / "events"
    local.mkdir()
    for name in names:
        (local / name).write_bytes((events_dir / name).read_bytes())
    accumulator = EventAccumulator(str(local))
    accumulator.Reload()
    scalars = {tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    expected: dict[str, list] = {}
    for record in records:
        for tag, value in tensorboard_log.scalars(record).items():
            expected.setdefault(tag, []).append(
                (record["step"], float(np.float32(value)), record["time"]))
    assert scalars == expected
    assert [(s, v) for s, v, _ in scalars["train/loss"]] == [(1, 5.5), (2, 4.25), (3, 3.75)]
    assert [(s, v) for s, v, _ in scalars["eval/web/eval_loss"]] == [(2, 4.5)]


def test_goodput_json_is_written_into_the_bucket(bucket):
    run_dir = f"{bucket}/run"
    meter = goodput.Goodput()
    meter.attribute("productive steps", 2.0)
    said = []
    figures = meter.save_and_print(run_dir, said.append)
    saved = json.loads((storage.path(run_dir) / goodput.FILENAME).read_text())
    assert saved == figures
    assert saved["productive steps"] == 2.0 and set(saved) == {"total", *goodput.CATEGORIES}
    assert said and said[0].startswith("goodput: ")


def test_report_reads_and_plots_a_run_in_a_bucket(bucket, capsys):
    run_dir = f"{bucket}/run"
    _log(run_dir, FIRST + RESTARTED).close()
    history = report.read(run_dir)
    assert [(r["step"], r["loss"]) for r in history.train] == [(1, 5.5), (2, 4.25), (3, 3.75)]
    assert [(r["step"], r["eval_loss"]) for r in history.evals["web"]] == [(2, 4.5)]

    assert report.main([run_dir]) == 0
    png = storage.path(run_dir) / report.DEFAULT_OUT
    size = len(png.read_bytes())
    assert capsys.readouterr().out.strip() == f"wrote {run_dir}/report.png ({size:,} bytes)"
    assert report.main([run_dir, "--out", f"{bucket}/plots/curves.png"]) == 0
    for path in (png, storage.path(f"{bucket}/plots/curves.png")):
        with path.open("rb") as f, Image.open(f) as image:
            assert image.format == "PNG" and image.size == (800, 900)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert report.main([f"{bucket}/nothing"]) == 2
    assert f"{bucket}/nothing/metrics.jsonl not found" in capsys.readouterr().err


def test_a_profile_of_a_run_in_a_bucket_is_copied_up_with_its_layout(bucket, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local trace goes
    run_dir = f"{bucket}/run"
    said = []
    step = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((4, 4))
    with profiling.StepProfiler(ProfileConfig(start_step=1, steps=1), run_dir, 0, 2,
                                said.append) as profiler:
        for number in (1, 2):
            profiler.before_step(number, x)
            assert len(list(tmp_path.iterdir())) == (number == 1)  # the local trace folder
            x = step(x)
            profiler.after_step(number, x)
        assert not profiler.tracing
    assert float(x[0, 0]) == 7.0
    assert list(tmp_path.iterdir()) == []  # copied up, then removed

    files = storage.files_under(storage.path(run_dir) / profiling.DIRNAME)
    traces = {name.split("/")[2] for name in files}
    assert len(traces) == 1 and all(name.startswith("plugins/profile/") for name in files)
    (trace,) = traces
    names = {name.rsplit("/", 1)[1] for name in files}
    assert "perfetto_trace.json.gz" in names
    assert any(name.endswith(".xplane.pb") for name in names)
    assert all(size > 0 for size in files.values())
    perfetto = storage.path(run_dir) / profiling.DIRNAME / "plugins/profile" / trace
    assert json.loads(gzip.decompress((perfetto / "perfetto_trace.json.gz").read_bytes()))[
        "traceEvents"]
    assert said[0] == f"profile: tracing steps 1-1 into {run_dir}/profile"
    assert said[1].startswith(f"profile: trace written to {perfetto} ")
