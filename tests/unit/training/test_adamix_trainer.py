"""AdaMix trainer pieces that need no process group: the cross-rank route check names the step."""

import pytest

from adamix_ds import distributed
from adamix_ds.training.adamix_trainer import AdaMixTrainer


def test_route_divergence_names_the_step(monkeypatch):
    trainer = AdaMixTrainer.__new__(AdaMixTrainer)
    trainer.step = 17
    trainer.router = type("R", (), {"record": [(17, 0, 0, 0, 1)]})()
    monkeypatch.setattr(distributed, "all_gather_ints", lambda value: [value, value + 1])
    with pytest.raises(RuntimeError, match="routes diverged between ranks at step 17"):
        trainer._check_routes()
    monkeypatch.setattr(distributed, "all_gather_ints", lambda value: [value, value])
    trainer._check_routes()
