"""Validation-based stopping in the shared training loop (toolchain/train/trainer.py)."""

from __future__ import annotations

import json

import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.train.trainer import TrainConfig, Trainer


class _Interrupt(Exception):
    pass


def _problem(tmp_path, name, scores_seen, interrupt_at=None):
    """A 1-parameter fit whose validation score rises to step 6 and falls after: the best step is known."""
    w = torch.nn.Parameter(torch.zeros(()))

    def loss_fn(step, batch):
        return (w - batch) ** 2, {}

    def batch_fn(step):
        return torch.tensor(1.0)

    calls = {"n": 0}

    def validate():
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at:
            raise _Interrupt()
        step = trainer.step
        score = -abs(step - 6)  # best at step 6, then strictly worse
        scores_seen.append((step, score))
        return float(score)

    cfg = TrainConfig(steps=40, lr=0.05, checkpoint_every=1000, eval_every=2, patience=3, min_delta=0.0, grad_clip=None, amp="off")
    trainer = Trainer({"w": w}, loss_fn, batch_fn, tmp_path / name, cfg, validate=validate)
    return trainer, w


def test_stops_after_patience_and_restores_the_best_parameters(tmp_path):
    seen = []
    trainer, w = _problem(tmp_path, "a", seen)
    trainer.run()
    # scores at steps 2,4,6 (best),8,10,12 → three in a row without gain after step 6: stop at 12
    assert [s for s, _ in seen] == [2, 4, 6, 8, 10, 12]
    assert trainer.step == 12 and trainer.stopped_early
    w_at_12 = w.item()
    # the reference: the same loss run plainly for 6 Adam steps (no validation) gives the best parameters
    w6 = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([w6], lr=0.05)
    for _ in range(6):
        opt.zero_grad()
        ((w6 - 1.0) ** 2).backward()
        opt.step()
    assert trainer.restore_best() == 6
    assert w.item() == pytest.approx(w6.item(), abs=1e-7) and w.item() != pytest.approx(w_at_12)
    hist = json.loads((tmp_path / "a" / "val_history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4, 6, 8, 10, 12]


def test_an_interrupted_run_resumes_to_the_same_stop_and_best(tmp_path):
    seen = []
    trainer, _ = _problem(tmp_path, "b", seen, interrupt_at=5)  # dies while scoring step 10
    with pytest.raises(_Interrupt):
        trainer.run()
    seen2 = []
    trainer2, w2 = _problem(tmp_path, "b", seen2)
    trainer2.run()
    assert [s for s, _ in seen2] == [10, 12]  # steps 2..8 were scored before and not again
    assert trainer2.step == 12 and trainer2.restore_best() == 6
    clean, wc = _problem(tmp_path, "c", [])
    clean.run()
    clean.restore_best()
    assert w2.item() == wc.item()
    # a third run of a finished (plateaued) workdir trains no further
    trainer3, _ = _problem(tmp_path, "b", [])
    trainer3.run()
    assert trainer3.step == 12


def test_a_wall_clock_stop_between_validations_scores_the_last_weights(tmp_path):
    """Stopped by max_seconds at a step that is no multiple of eval_every, the run still scores the weights it
    ends with, so they are kept when they are the best (not the weights of the last scheduled validation)."""
    seen = []
    trainer, w = _problem(tmp_path, "t", seen)
    trainer.cfg.max_seconds = 0.0  # out of time after the first step; eval_every is 2
    trainer.run()
    assert trainer.step == 1 and [s for s, _ in seen] == [1]
    assert trainer.restore_best() == 1


def test_eval_every_without_a_validate_function_is_refused(tmp_path):
    w = torch.nn.Parameter(torch.zeros(()))
    with pytest.raises(ConfigError, match="validate"):
        Trainer({"w": w}, lambda s, b: (w.sum(), {}), lambda s: None, tmp_path, TrainConfig(eval_every=5))
