"""Delta math and the per-step engine: D' = D_target + lambda(t) * (CFG(D_adapted) - CFG(D_base)).

k-diffusion samplers hand over x0 predictions and real sigmas. Timestep samplers (DDIM, PLMS, UniPC)
hand over eps and integer timesteps; those are converted with the target's alphas_cumprod.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import DeltaError, latent, logger, schedules
from .spec import DeltaSettings

CondsList = Sequence[Sequence[tuple[int, float]]]  # per image: (row, weight) of each AND sub-prompt


def combine_cfg(out: torch.Tensor, conds_list: CondsList, scale: float) -> torch.Tensor:
    """A1111's combine_denoised: rows of `out` are [all cond rows..., one uncond row per image]."""
    batch = len(conds_list)
    uncond = out[-batch:]
    denoised = torch.clone(uncond)
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            denoised[i] += (out[row] - uncond[i]) * (weight * scale)
    return denoised


def require_finite(delta: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(delta).all():
        raise DeltaError("Delta Sampling: the source pair produced a non-finite delta (NaN/inf), usually fp16 "
                         "overflow. Try the WebUI's upcast options first (A1111: Settings > Optimizations > "
                         "'Upcast cross attention layer to float32', or --upcast-sampling; Forge: "
                         "--force-upcast-attention or --unet-in-bf16), then another source or adapter; full "
                         "precision (--no-half) is the last resort: it doubles the memory of every model.")
    return delta


def timestep_to_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, k-diffusion sigma) for integer DDPM timesteps, as A1111's get_pred_x0 indexes them."""
    alpha = alphas_cumprod.to(timesteps.device)[timesteps.to(dtype=torch.long)].to(torch.float32)
    return alpha, ((1 - alpha) / alpha).sqrt()


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class SourcePair(Protocol):
    """A base/adapted source pair. `denoise` returns CFG-combined x0 (source latent) for each image.
    `sigma_max`: the highest noise level the source was trained on (VP sigma; inf for flow sources)."""

    latent_format: latent.LatentFormat
    sigma_max: float
    title: str

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, *, adapted: bool, step: int,
                skip_uncond: bool) -> torch.Tensor: ...


@dataclass
class StepInput:
    x: torch.Tensor  # (B, C, H, W): the sampler's state (DDPM-scaled for timestep samplers)
    sigma: torch.Tensor  # (B,): k-diffusion sigma, or timestep for timestep samplers
    step: int  # model-call index, drives prompt editing
    progress: float
    skip_uncond: bool = False


@dataclass
class DeltaRun:
    """Per-generation engine. The host calls `capture` before the model call and `apply` after CFG."""

    settings: DeltaSettings
    pair: SourcePair
    target_format: latent.LatentFormat
    target_title: str = ""
    alphas_cumprod: torch.Tensor | None = None  # set for timestep (eps) samplers
    nmask: torch.Tensor | None = None  # inpainting: 1 where the image may change
    pending: StepInput | None = None
    applied_steps: int = 0
    last_lambda: float = 0.0
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        latent.check_pair(self.pair.latent_format, self.target_format, getattr(self.pair, "title", ""),
                          self.target_title)

    def capture(self, step_input: StepInput) -> None:
        self.pending = step_input

    def apply(self, denoised: torch.Tensor) -> torch.Tensor:
        step, self.pending = self.pending, None
        if step is None or step.x.shape != denoised.shape:
            raise DeltaError("Delta Sampling: the sampler's CFG callbacks did not pair up "
                             "(an unsupported sampler or another extension changed the batch).")
        s = self.settings
        lam = schedules.lambda_at(step.progress, s.strength, s.schedule, s.start, s.end)
        self.last_lambda = lam
        self.history.append(lam)
        if lam == 0.0:
            return denoised
        if self.alphas_cumprod is not None:
            alpha, sigma = timestep_to_sigma(self.alphas_cumprod, step.sigma)
            a = _per_image(alpha, step.x)
            x = step.x / a.sqrt()  # k-diffusion state x0 + sigma * eps
            x0 = (step.x - (1 - a).sqrt() * denoised) / a.sqrt()
        else:
            sigma, x, x0 = step.sigma, step.x, denoised
        delta = self.delta(x, x0, sigma, step)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: sigma %.4g, lambda %.4g, mean |delta| %.4g, mean |x0| %.4g", step.step,
                         float(sigma.max()), lam, float(delta.abs().mean()), float(x0.abs().mean()))
        if self.nmask is not None:
            delta = delta * self.nmask
        self.applied_steps += 1
        if self.alphas_cumprod is not None:
            return denoised - lam * delta / _per_image(sigma, delta)  # eps' = eps - lambda * dx0 / sigma
        return denoised + lam * delta

    def delta(self, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, step: StepInput) -> torch.Tensor:
        """Delta in the target's latent space, from the source pair run on the target's state."""
        src = self.pair.latent_format
        limit = getattr(self.pair, "sigma_max", math.inf)
        x_src, sigma_src = latent.source_state(x, x0, sigma, src, self.target_format, limit)
        kw = {"step": step.step, "skip_uncond": step.skip_uncond}
        base = self.pair.denoise(x_src, sigma_src, adapted=False, **kw)
        adapted = self.pair.denoise(x_src, sigma_src, adapted=True, **kw)
        delta = latent.delta_to_target(adapted - base, src, self.target_format)
        return require_finite(delta).to(x0.dtype)
