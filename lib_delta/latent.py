"""Latent formats, parameterizations, and the source-input / delta mappings between two models.

A model's latent z relates to the unscaled VAE latent u by u = z / scale + shift (ComfyUI's
process_latent_out). DS forms the delta in u-space and maps it back, like the official node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import DeltaError


@dataclass(frozen=True)
class LatentFormat:
    name: str
    channels: int
    scale: float
    shift: float = 0.0
    family: str = "vp"  # noise schedule: "vp" (eps / v: x = x0 + sigma * eps) or "flow" (x = (1-s) x0 + s * eps)
    vae: str = "sd"  # the latent space; formats of one VAE differ at most by scale and shift

    def to_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift

    def from_unscaled(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.shift) * self.scale

    def as_flow(self) -> LatentFormat:
        """The same latent under a rectified-flow schedule (e.g. rectified-flow SDXL)."""
        return replace(self, name=f"{self.name} (rectified flow)", family="flow")


SD1 = LatentFormat("SD1", 4, 0.18215)
SD2 = LatentFormat("SD2", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609, family="flow", vae="sd3")
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159, family="flow", vae="flux")  # also Chroma, Z-Image, Lumina 2
FLUX2 = LatentFormat("Flux.2", 128, 1.0, family="flow", vae="flux2")
WAN21 = LatentFormat("Wan 2.1 VAE", 16, 1.0, family="flow", vae="wan21")  # Qwen-Image, Anima (per-channel norm)
WAN_VIDEO = LatentFormat("Wan 2.1 video", 16, 1.0, family="flow", vae="wan21-video")  # 5-D latents
FORMATS = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX, FLUX2, WAN21, WAN_VIDEO)}


def same_space(a: LatentFormat, b: LatentFormat) -> bool:
    return a.vae == b.vae and a.channels == b.channels and a.scale == b.scale and a.shift == b.shift


def check_pair(source: LatentFormat, target: LatentFormat, source_name: str = "", target_name: str = "") -> None:
    """Refuse pairs the core cannot map, with a message that names both models."""
    src = f"the {source.name} source{f' {source_name!r}' if source_name else ''}"
    tgt = f"the {target.name} target{f' {target_name!r}' if target_name else ''}"
    if source.channels != target.channels:
        raise DeltaError(f"Delta Sampling cannot pair {src} ({source.channels}-channel latents) with {tgt} "
                         f"({target.channels}-channel latents): cross-family latent bridging is not supported. "
                         "Pick a source of the same latent family as the active checkpoint.")
    if source.vae != target.vae:
        raise DeltaError(f"Delta Sampling cannot pair {src} with {tgt}: they use different VAEs, so their "
                         "latents do not describe the same images. Pick a source of the same model family.")


def sigma_as_vp(sigma: torch.Tensor, family: str) -> torch.Tensor:
    """A noise level as the VP sigma of the same signal-to-noise ratio (flow s -> s / (1 - s))."""
    return sigma if family == "vp" else sigma / (1 - sigma)


def _coefficients(sigma: torch.Tensor, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with x = a * x0 + b * eps for a noise level in `family`'s own units."""
    return (torch.ones_like(sigma), sigma) if family == "vp" else (1 - sigma, sigma)


def source_state(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, source: LatentFormat,
                 target: LatentFormat, source_sigma_max: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """The source's view of the target state: (x_src, sigma_src) in the source's latent and schedule.

    Same noise and same signal-to-noise ratio, x0 mapped through the unscaled latent. Above the source's
    own sigma_max (a zero-terminal-SNR or flow target at its first steps) the state is re-noised down to
    sigma_max with the same noise direction: a model asked about noise levels it never saw extrapolates,
    and an eps model's x0 error grows with sigma. Exactly `x, sigma` for a same-space pair in range.
    """
    limit = source_sigma_max if source.family == "vp" else math.inf
    sigma_vp = sigma_as_vp(sigma.to(torch.float64), target.family)
    in_range = bool((sigma_vp <= limit).all())
    if same_space(source, target) and source.family == target.family and in_range:
        return x, sigma
    x0_src = x0 if same_space(source, target) else source.from_unscaled(target.to_unscaled(x0))
    if source.family == target.family == "vp" and in_range:
        return x0_src + (x - x0), sigma
    a_t, b_t = (_shape(c, x) for c in _coefficients(sigma.to(x.dtype), target.family))
    noise = torch.where(b_t > 0, (x - a_t * x0) / b_t.clamp_min(1e-12), torch.zeros_like(x))
    sigma_src = sigma_vp.clamp(max=limit)
    if source.family == "flow":
        sigma_src = sigma_src / (1 + sigma_src)
    sigma_src = sigma_src.to(sigma.dtype)
    a_s, b_s = (_shape(c, x) for c in _coefficients(sigma_src.to(x.dtype), source.family))
    return a_s * x0_src + b_s * noise, sigma_src


def _shape(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def delta_to_target(delta_source: torch.Tensor, source: LatentFormat, target: LatentFormat) -> torch.Tensor:
    """Map a source-latent x0 difference into the target's latent (shift cancels: factor s_t / s_s)."""
    if same_space(source, target):
        return delta_source
    return delta_source * (target.scale / source.scale)
