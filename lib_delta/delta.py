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
from .spec import LAMBDA_RANGE, DeltaSettings

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

    def denoise_pair(self, x: torch.Tensor, sigma: torch.Tensor, *, step: int, skip_uncond: bool,
                     batched: bool) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def scale(self) -> float: ...  # the source's CFG scale

    @property
    def shares_uncond(self) -> bool: ...  # base and adapted have equal uncond predictions


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
    source_calls: int = 0  # steps whose delta was computed (not reused)
    reused: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (model call, sigma, delta) last computed
    guidance: torch.Tensor | None = None  # per-image norm of the target's last CFG update

    def __post_init__(self) -> None:
        latent.check_pair(self.pair.latent_format, self.target_format, getattr(self.pair, "title", ""),
                          self.target_title)

    def capture(self, step_input: StepInput) -> None:
        self.pending = step_input

    def apply(self, denoised: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """`denoised`: the target's CFG'd prediction; `uncond`: its uncond prediction where the host has it
        (x0, or eps for timestep samplers), which `auto` strength and `cap` measure against."""
        return apply_updates([self], denoised, uncond)

    def take_step(self, denoised: torch.Tensor) -> StepInput:
        step, self.pending = self.pending, None
        if step is None or step.x.shape != denoised.shape:
            raise DeltaError("Delta Sampling: the sampler's CFG callbacks did not pair up "
                             "(an unsupported sampler or another extension changed the batch).")
        return step

    def update(self, step: StepInput, target: TargetStep) -> torch.Tensor | None:
        """This run's x0-space update lambda(t) * delta at this step, or None where lambda is 0."""
        s = self.settings
        lam = schedules.lambda_at(step.progress, s.strength, s.schedule, s.start, s.end)
        self.last_lambda = lam
        self.history.append(lam)
        if lam == 0.0:
            return None
        sigma, x, x0 = target.sigma, target.x, target.x0
        delta = self.reusable_delta(step, sigma)
        if delta is None:
            delta = self.delta(x, x0, sigma, step)
            self.reused = (step.step, sigma, delta)
        update = self.scaled(lam, delta, x0, target.uncond)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: sigma %.4g, lambda %.4g, mean |delta| %.4g, mean |update| %.4g, mean |x0| %.4g",
                         step.step, float(sigma.max()), lam, float(delta.abs().mean()), float(update.abs().mean()),
                         float(x0.abs().mean()))
        if self.nmask is not None:
            update = update * self.nmask
        self.applied_steps += 1
        return update

    def reusable_delta(self, step: StepInput, sigma: torch.Tensor) -> torch.Tensor | None:
        """The last delta while it is younger than `reuse` model calls (Δ reuse), carried to this sigma as a
        difference of noise predictions: x0 = x - sigma * eps, so dx0 scales with sigma (VP and flow alike)."""
        every = int(self.settings.knob("reuse"))
        if self.reused is None or every <= 1:
            return None
        call, old_sigma, delta = self.reused
        if not (0 <= step.step - call < every and delta.shape == step.x.shape):
            return None
        return delta * _per_image(sigma / old_sigma.clamp_min(1e-12), delta)

    def scaled(self, lam: float, delta: torch.Tensor, x0: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """lambda * delta; `auto` measures lambda in units of the target's CFG update; `cap` bounds the update."""
        s = self.settings
        if s.strength_mode == "fixed" and s.cap == 0.0:
            return lam * delta
        if uncond is not None and bool((x0 != uncond).any()):
            self.guidance = _norms(x0 - uncond)
        if self.guidance is None:
            if s.strength_mode == "auto":
                raise DeltaError("Delta Sampling: auto strength measures the delta against the target's CFG "
                                 "update, and this sampler gave none (CFG scale 1, or the uncond pass skipped "
                                 "from the first step). Raise the CFG scale or use fixed strength.")
            return lam * delta
        size = _norms(delta).clamp_min(1e-12)
        lam_t = lam * self.guidance / size if s.strength_mode == "auto" else torch.full_like(size, lam)
        lam_t = lam_t.clamp(*LAMBDA_RANGE)
        if s.cap > 0.0:
            limit = s.cap * self.guidance / size
            lam_t = torch.where(lam_t.abs() > limit, lam_t.sign() * limit, lam_t)
        self.last_lambda = self.history[-1] = float(lam_t.mean())  # the lambda applied (mean over images)
        return _per_image(lam_t, delta) * delta

    def delta(self, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, step: StepInput) -> torch.Tensor:
        """Delta in the target's latent space, from the source pair run on the target's state."""
        s, src = self.settings, self.pair.latent_format
        size = latent.native_size(src, x.shape[-2:]) if s.knob("native_size") else None
        if size is not None:
            x, x0 = latent.downsample_state(x, x0, sigma, self.target_format.family, size)
        limit = getattr(self.pair, "sigma_max", math.inf)
        x_src, sigma_src = latent.source_state(x, x0, sigma, src, self.target_format, limit)
        cond_only = bool(s.knob("cond_only"))
        base, adapted = self.pair.denoise_pair(x_src, sigma_src, step=step.step,
                                               skip_uncond=step.skip_uncond or cond_only, batched=s.knob("batched"))
        delta = adapted - base
        if cond_only and not step.skip_uncond and self.pair.shares_uncond:
            delta = delta * self.pair.scale  # exact: with one uncond, CFG'd delta = scale * cond delta
        if size is not None:
            delta = latent.upsample(delta, step.x.shape[-2:])
        delta = require_finite(latent.delta_to_target(delta, src, self.target_format)).to(x0.dtype)
        self.source_calls += 1
        return delta


@dataclass
class TargetStep:
    """The target's prediction at one step in k-diffusion terms: state x, sigma, x0 and its uncond x0."""

    x: torch.Tensor
    sigma: torch.Tensor
    x0: torch.Tensor
    uncond: torch.Tensor | None

    @classmethod
    def of(cls, step: StepInput, denoised: torch.Tensor, uncond: torch.Tensor | None,
           alphas_cumprod: torch.Tensor | None) -> TargetStep:
        if alphas_cumprod is None:
            return cls(step.x, step.sigma, denoised, uncond)
        alpha, sigma = timestep_to_sigma(alphas_cumprod, step.sigma)  # eps and timesteps: convert
        a = _per_image(alpha, step.x)
        x0 = (step.x - (1 - a).sqrt() * denoised) / a.sqrt()
        uncond = None if uncond is None else (step.x - (1 - a).sqrt() * uncond) / a.sqrt()
        return cls(step.x / a.sqrt(), sigma, x0, uncond)  # k-diffusion state x0 + sigma * eps


@dataclass
class DeltaUnits:
    """Several DS units on one target, D' = D + sum_i lambda_i(t) * delta_i: what the hosts drive (one unit
    is the plain method, bit for bit). Units whose pairs share a base branch run it once per step."""

    runs: list[DeltaRun]

    @property
    def target_format(self) -> latent.LatentFormat:
        return self.runs[0].target_format

    @property
    def pending(self) -> StepInput | None:
        return self.runs[0].pending

    def sampler_state(self, nmask: torch.Tensor | None, cfg_multiplier: float) -> None:
        """The inpainting mask and the sampler's CFG factor (A1111's CFG++), read before each step."""
        for run in self.runs:
            run.nmask = nmask
            run.pair.cfg_multiplier = cfg_multiplier

    def capture(self, step_input: StepInput) -> None:
        for run in self.runs:
            run.capture(step_input)

    def apply(self, denoised: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        return apply_updates(self.runs, denoised, uncond)


def apply_updates(runs: Sequence[DeltaRun], denoised: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """D' = D + sum of every run's lambda_i(t) * delta_i, each measured on the same target prediction."""
    steps = [run.take_step(denoised) for run in runs]
    alphas = runs[0].alphas_cumprod
    target = TargetStep.of(steps[0], denoised, uncond, alphas)
    updates = [u for run, step in zip(runs, steps, strict=True) if (u := run.update(step, target)) is not None]
    if not updates:
        return denoised
    total = updates[0]
    for u in updates[1:]:
        total = total + u
    if alphas is not None:
        return denoised - total / _per_image(target.sigma, total)  # eps' = eps - dx0 / sigma
    return denoised + total


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Per-image RMS, in float32."""
    return v.float().pow(2).flatten(1).mean(1).sqrt()
