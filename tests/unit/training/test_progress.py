"""Rank 0's progress: a tqdm bar with step, loss, tokens/s and ETA on a terminal, log lines elsewhere."""

import io
import logging

from adamix_ds.training import monitoring


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _drive(monkeypatch, stream, caplog):
    monkeypatch.setattr(monitoring.sys, "stdout", stream)
    monitor = monitoring.Monitor({"tensorboard": {"enabled": False}}, output_dir=None, total_steps=4)
    monitor.resumed_at(1)
    with caplog.at_level(logging.INFO, logger="adamix_ds"):
        for step in (2, 3, 4):
            metrics = {"train/loss": 1.0 / step, "perf/tokens_per_s": 100.0 * step}
            monitor.step_done(step, metrics)
            if step % 2 == 0:
                monitor.log(step, metrics)
    monitor.close()
    return monitor


def test_bar_on_a_terminal(monkeypatch, caplog):
    screen = Terminal()
    monitor = _drive(monkeypatch, screen, caplog)
    text = screen.getvalue()
    assert monitor.bar is not None
    assert "training: 100%" in text and "4/4" in text and "loss=0.2500" in text and "tok_s=400" in text
    assert "step 2/4 eta=" in text and "step 4/4 eta=0s" in text  # metric lines printed above the bar
    assert not caplog.records


def test_log_lines_when_not_a_terminal(monkeypatch, caplog):
    pipe = io.StringIO()
    monitor = _drive(monkeypatch, pipe, caplog)
    assert monitor.bar is None and pipe.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" eta=")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert "train/loss=0.5" in lines[0]
