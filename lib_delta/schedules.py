"""lambda schedules: pure functions of sampling progress (0 = first model call, 1 = last)."""

from __future__ import annotations

import math
from collections.abc import Callable

# Each shape maps u in [0, 1] (position inside the active window) to a weight; all start at 1.
SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda u: 1.0,
    "linear": lambda u: 1.0 - u,
    "cosine": lambda u: 0.5 * (1.0 + math.cos(math.pi * u)),
    "exponential": lambda u: math.exp(-5.0 * u),
    # a logistic step centred on the window's middle, normalised to 1 at u=0 and 0 at u=1
    "sigmoid": lambda u: (_logistic(u) - _logistic(1.0)) / (_logistic(0.0) - _logistic(1.0)),
}


def _logistic(u: float, steepness: float = 10.0) -> float:
    return 1.0 / (1.0 + math.exp(steepness * (u - 0.5)))


def lambda_at(progress: float, strength: float, schedule: str, start: float = 0.0, end: float = 1.0) -> float:
    """The lambda to use at `progress`; 0 outside the [start, end] window."""
    if not start <= progress <= end or strength == 0.0:
        return 0.0
    u = (progress - start) / (end - start) if end > start else 0.0
    return strength * SHAPES[schedule](u)


def progress_from_calls(calls: int, total_calls: int) -> float:
    """Progress from the denoiser's model-call count (A1111's `denoiser.step` / `denoiser.total_steps`).

    `state.sampling_step` lags one step behind the model call, so it is not used.
    """
    if total_calls <= 1:
        return 0.0
    return min(max(calls / (total_calls - 1), 0.0), 1.0)

