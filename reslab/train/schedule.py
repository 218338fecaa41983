"""Learning-rate schedules as plain functions of the step, plus He et al.'s warm-up.

``LRSchedule.lr(step)`` is the learning rate of optimizer step ``step`` (0-based). The
engine writes it into every parameter group before the step, so the schedule is easy to
read, to plot (:func:`lr_curve`) and to resume (its only state is the He warm-up's).

Shapes:
  * ``multistep``: lr x gamma^k after the k-th milestone (He 2015: /10 at 32k and 48k steps);
  * ``cosine``: from lr to ``min_lr`` over the run;
  * ``onecycle``: linear rise from lr/div_factor to lr over ``pct_start`` of the run, then
    (linear or cosine) decay to lr/(div_factor*final_div_factor);
  * ``constant``.
Warm-ups (multiply/replace the first steps):
  * ``linear``: factor from ``warmup_start_factor`` to 1 over the warm-up, times the shape;
  * ``he``: He et al. 2015 for ResNet-110 — a constant ``warmup_lr`` (0.01) until the
    training error is below ``warmup_until_error`` (80%, "about 400 iterations"), then the
    shape; He et al. 2016 use a fixed 400 iterations (``warmup_steps``). With both set,
    whichever comes first ends it. The running error is the mean over the last 20 steps.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

from reslab.train.config import ScheduleConfig

ERROR_WINDOW = 20


class LRSchedule:
    """The learning rate of every step of one run."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float, total_steps: int, steps_per_epoch: int):
        assert total_steps >= 1 and steps_per_epoch >= 1
        self.cfg, self.base_lr = cfg, base_lr
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        scale = steps_per_epoch if cfg.unit == "epoch" else 1
        self.milestones = [int(round(m * scale)) for m in cfg.milestones]
        if cfg.warmup == "linear":
            n = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_epochs * steps_per_epoch
            self.warmup_len = max(1, int(round(n)))
        else:
            self.warmup_len = 0
        self.he_done_at: int | None = None  # step at which the He warm-up ended
        self._errors: deque[float] = deque(maxlen=ERROR_WINDOW)

    # -- the shape -------------------------------------------------------------------------
    def _shape(self, step: int) -> float:
        c, base, total = self.cfg, self.base_lr, self.total_steps
        if c.name == "constant":
            return base
        if c.name == "multistep":
            return base * c.gamma ** sum(step >= m for m in self.milestones)
        if c.name == "cosine":
            t = min(step / total, 1.0)
            return c.min_lr + (base - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        assert c.name == "onecycle", c.name
        start = base / c.div_factor
        end = start / c.final_div_factor
        rise = max(1, int(round(c.pct_start * total)))
        if step < rise:
            return start + (base - start) * step / rise
        t = min((step - rise) / max(1, total - 1 - rise), 1.0)
        if c.anneal == "cos":
            return end + (base - end) * 0.5 * (1 + math.cos(math.pi * t))
        return base + (end - base) * t

    # -- warm-ups --------------------------------------------------------------------------
    @property
    def in_he_warmup(self) -> bool:
        return self.cfg.warmup == "he" and self.he_done_at is None

    def _he_active(self, step: int) -> bool:
        if self.cfg.warmup != "he":
            return False
        if self.he_done_at is not None:
            return step < self.he_done_at
        return self.cfg.warmup_steps is None or step < self.cfg.warmup_steps

    def lr(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if self._he_active(step):
            return self.cfg.warmup_lr
        lr = self._shape(step)
        if step < self.warmup_len:
            f0 = self.cfg.warmup_start_factor
            lr *= f0 + (1 - f0) * step / self.warmup_len
        return lr

    def observe(self, step: int, train_error: float) -> None:
        """Report the training error (in [0, 1]) of step ``step``; ends the He warm-up when due."""
        if not self.in_he_warmup:
            return
        self._errors.append(float(train_error))
        c = self.cfg
        if c.warmup_steps is not None and step + 1 >= c.warmup_steps:
            self.he_done_at = c.warmup_steps
        elif c.warmup_until_error is not None and len(self._errors) == ERROR_WINDOW \
                and sum(self._errors) / ERROR_WINDOW < c.warmup_until_error:
            self.he_done_at = step + 1

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"he_done_at": self.he_done_at, "errors": list(self._errors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.he_done_at = state.get("he_done_at")
        self._errors = deque((float(e) for e in state.get("errors", [])), maxlen=ERROR_WINDOW)


def lr_curve(cfg: ScheduleConfig, base_lr: float, total_steps: int, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step (the He warm-up is shown at its ``warmup_steps`` cap or not at all)."""
    s = LRSchedule(cfg, base_lr, total_steps, steps_per_epoch)
    return [s.lr(i) for i in range(total_steps)]
