"""Learning-rate policies of the trainers, as handlers in a bundle's ``train#handlers``.

:class:`LinearDecayLR` is pix2pix's ``linear`` policy (Isola et al.; their code's ``lr_policy='linear'``): the
learning rate is constant for the first part of training and falls linearly to zero over the rest (pix2pix: 100
epochs constant + 100 decaying, i.e. the second half). It is computed from ``engine.state.iteration`` alone, so a
resumed run continues on the same curve without a scheduler state in the checkpoint.
"""

from __future__ import annotations

from typing import Sequence

from ignite.engine import Engine, Events

__all__ = ["LinearDecayLR"]


class LinearDecayLR:
    """Constant learning rate, then linear decay to ``end_factor`` x it at ``total_iterations``.

    Args:
        total_iterations: length of the run (a bundle's ``max_iterations``); iterations past it keep the end value.
        decay_start: fraction of ``total_iterations`` after which the decay starts (pix2pix: 0.5).
        optimizers: names of the engine's optimizer attributes to schedule (the generator's and the
            discriminator's of :class:`~common.engines.AdversarialTrainer`); absent or ``None`` ones are skipped.
        end_factor: the last learning rate as a fraction of the initial one.
    """

    def __init__(self, total_iterations: int, decay_start: float = 0.5,
                 optimizers: Sequence[str] = ("optimizer", "d_optimizer"), end_factor: float = 0.0):
        if int(total_iterations) < 1:
            raise ValueError(f"total_iterations must be >= 1, got {total_iterations}")
        if not 0.0 <= float(decay_start) <= 1.0:
            raise ValueError(f"decay_start must be a fraction in [0, 1], got {decay_start}")
        if not 0.0 <= float(end_factor) <= 1.0:
            raise ValueError(f"end_factor must be in [0, 1], got {end_factor}")
        self.total_iterations = int(total_iterations)
        self.decay_start = float(decay_start)
        self.optimizer_names = tuple(optimizers)
        self.end_factor = float(end_factor)
        self._optimizers: list = []

    def factor(self, completed: int) -> float:
        """Multiplier of the initial learning rate after ``completed`` iterations."""
        start = self.decay_start * self.total_iterations
        if completed <= start:
            return 1.0
        span = max(self.total_iterations - start, 1e-12)
        return max(self.end_factor, 1.0 - (1.0 - self.end_factor) * (completed - start) / span)

    def attach(self, engine: Engine) -> None:
        self._optimizers = [opt for name in self.optimizer_names if (opt := getattr(engine, name, None)) is not None]
        if not self._optimizers:
            raise ValueError(f"LinearDecayLR: the engine has none of the optimizers {list(self.optimizer_names)}")
        for opt in self._optimizers:
            for group in opt.param_groups:  # saved with the optimizer's state, so a resume keeps the base value
                group.setdefault("initial_lr", group["lr"])
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        f = self.factor(engine.state.iteration - 1)  # ITERATION_STARTED has already counted this iteration
        for opt in self._optimizers:
            for group in opt.param_groups:  # setdefault again: a checkpoint from before the schedule lacks it
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * f
