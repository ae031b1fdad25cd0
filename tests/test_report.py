"""`python -m observe.report`: a PNG of the curves in metrics.jsonl, and its input errors."""

import json

import pytest
from PIL import Image

from observe import report


def _train(step, loss, tokens_per_s=1000.0, data_wait_pct=1.0):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": tokens_per_s,
            "step_ms": 100.0, "data_wait_ms": 1.0, "data_wait_pct": data_wait_pct,
            "checkpoint_blocked_ms": 0.0, "time": 1.0}


def _eval(step, dataset, loss):
    return {"step": step, "dataset": dataset, "eval_loss": loss, "eval_perplexity": 2.0,
            "eval_tokens": 512.0, "time": 2.0}


def _write(run_dir, records):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def resumed_run(tmp_path):
    """Steps 1, 10, 20 logged, a crash, then a resume from step 10 that re-does step 20."""
    _write(tmp_path, [
        _train(1, 5.0), _train(10, 4.0), _train(20, 3.5, tokens_per_s=900.0),
        _eval(20, "web", 3.6), _eval(20, "code", 3.9),
        _train(20, 3.0, tokens_per_s=1200.0, data_wait_pct=2.5),  # the resumed run
        _train(30, 2.5), _eval(30, "web", 2.8), _eval(30, "code", 3.1),
    ])
    return tmp_path


def _lines(fig):
    """{label: (x, y)} of every plotted line, over all panels."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in fig.axes for line in ax.get_lines()}


def test_each_step_is_plotted_once_with_its_latest_record(resumed_run):
    lines = _lines(report.figure(resumed_run))
    assert lines["train"] == ([1, 10, 20, 30], [5.0, 4.0, 3.0, 2.5])
    assert lines["tokens/s"] == ([1, 10, 20, 30], [1000.0, 1000.0, 1200.0, 1000.0])
    assert lines["data wait %"] == ([1, 10, 20, 30], [1.0, 1.0, 2.5, 1.0])
    assert lines["eval: web"] == ([20, 30], [3.6, 2.8])
    assert lines["eval: code"] == ([20, 30], [3.9, 3.1])


def test_writes_a_png_into_the_run_dir_by_default(resumed_run):
    path = report.plot(resumed_run)
    assert path == resumed_run / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (800, 900)
        assert len(image.getcolors(maxcolors=1 << 20)) > 10  # something was drawn


def test_command_line_writes_out_file(resumed_run, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "curves.png"
    assert report.main([str(resumed_run), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out


def test_fields_missing_from_old_files_are_skipped(tmp_path):
    old = _train(2, 4.0)
    del old["data_wait_pct"]
    _write(tmp_path, [_train(1, 5.0), old])
    lines = _lines(report.figure(tmp_path))
    assert lines["train"][0] == [1, 2]
    assert lines["data wait %"][0] == [1]


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl not found"),
    ("", "metrics.jsonl is empty"),
    ("\n  \n", "metrics.jsonl is empty"),
    ('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n', "metrics.jsonl line 2 is not valid JSON"),
    ('{"step": 1, "loss": 5.0}\n\n[1, 2]\n', "metrics.jsonl line 3 is not a metrics record"),
    ('{"step": "one", "loss": 5.0}\n', "line 1 is not a metrics record: 'step' is 'one'"),
    ('{"step": 1, "loss": "high"}\n', "line 1 is not a metrics record: 'loss' is 'high'"),
    ('{"step": 1, "eval_loss": 2.0}\n', "line 1 is not a metrics record: an eval record"),
    ('{"step": 1, "dataset": "web", "eval_loss": 2.0}\n', "has no train records"),
])
def test_bad_metrics_file_exits_2_naming_the_file(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert report.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'metrics.jsonl'}")
    assert message in err
    assert not (tmp_path / "report.png").exists()
