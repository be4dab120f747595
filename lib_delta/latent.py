"""Latent formats, parameterizations, and the source-input / delta mappings between two models.

A model's latent z relates to the unscaled VAE latent u by u = z / scale + shift (ComfyUI's
process_latent_out). DS forms the delta in u-space and maps it back, like the official node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import DeltaError


@dataclass(frozen=True)
class LatentFormat:
    name: str
    channels: int
    scale: float
    shift: float = 0.0
    family: str = "vp"  # noise schedule family: "vp" (eps / v, discrete DDPM) or "flow" (rectified flow)

    def to_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift

    def from_unscaled(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.shift) * self.scale


SD1 = LatentFormat("SD1", 4, 0.18215)
SD2 = LatentFormat("SD2", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609, family="flow")
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159, family="flow")
FORMATS = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}


def same_space(a: LatentFormat, b: LatentFormat) -> bool:
    return a.channels == b.channels and a.scale == b.scale and a.shift == b.shift


def check_pair(source: LatentFormat, target: LatentFormat) -> None:
    """Refuse pairs the core cannot map, with a clear message."""
    if source.channels != target.channels:
        raise DeltaError(
            f"Delta Sampling cannot pair a {source.name} source ({source.channels}-channel latents) with a "
            f"{target.name} target ({target.channels}-channel latents): cross-family latent bridging is not "
            "supported yet. Pick a source of the same latent family as the active checkpoint."
        )
    if source.family != target.family:
        raise DeltaError(
            f"Delta Sampling cannot pair a {source.name} source ({source.family}) with a {target.name} target "
            f"({target.family}): their noise schedules differ."
        )
    if source.family == "flow" and not same_space(source, target):
        raise DeltaError(
            f"Delta Sampling cannot pair a {source.name} source with a {target.name} target yet: "
            "flow models with different latent scales need a bridge that is not implemented."
        )


def to_source_input(x: torch.Tensor, denoised: torch.Tensor, source: LatentFormat, target: LatentFormat) -> torch.Tensor:
    """The source's view of the target state, with the same noise: to_src(x0) + (x - x0).

    Equal to `x` (the same tensor) when both models share a latent space.
    """
    if same_space(source, target):
        return x
    return source.from_unscaled(target.to_unscaled(denoised)) + (x - denoised)


def delta_to_target(delta_source: torch.Tensor, source: LatentFormat, target: LatentFormat) -> torch.Tensor:
    """Map a source-latent x0 difference into the target's latent (shift cancels: factor s_t / s_s)."""
    if same_space(source, target):
        return delta_source
    return delta_source * (target.scale / source.scale)
