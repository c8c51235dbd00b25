"""The examples run: a shortened training run of examples/train_digits.py must learn."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_digits_loss_falls():
    pytest.importorskip("sklearn")
    train_digits = _load("train_digits")
    _, history = train_digits.train(epochs=3, progress=None)
    losses = [h["loss"] for h in history]
    assert losses[0] < 2.30  # below chance level, ln(10)
    assert losses[2] < losses[1] < losses[0]
    assert losses[2] < 0.5 * losses[0]
    assert history[-1]["test_accuracy"] > 0.85
