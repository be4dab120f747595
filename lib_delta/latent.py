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
    native_side: int = 512  # the side, in pixels, models of this format were mostly trained at
    downscale: int = 8  # pixels per latent pixel

    def to_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift

    def from_unscaled(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.shift) * self.scale

    def as_flow(self) -> LatentFormat:
        """The same latent under a rectified-flow schedule (e.g. rectified-flow SDXL)."""
        return replace(self, name=f"{self.name} (rectified flow)", family="flow")


SD1 = LatentFormat("SD1", 4, 0.18215)
SD2 = LatentFormat("SD2", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025, native_side=1024)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609, family="flow", vae="sd3", native_side=1024)
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159, family="flow", vae="flux", native_side=1024)  # Chroma, Z-Image, Lumina 2
FLUX2 = LatentFormat("Flux.2", 128, 1.0, family="flow", vae="flux2", native_side=1024, downscale=16)
WAN21 = LatentFormat("Wan 2.1 VAE", 16, 1.0, family="flow", vae="wan21", native_side=1024)  # Qwen-Image, Anima
WAN_VIDEO = LatentFormat("Wan 2.1 video", 16, 1.0, family="flow", vae="wan21-video", native_side=832)  # 5-D
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

    Same noise and the same sigma, x0 mapped through the unscaled latent: each format's scale normalizes its
    latents to about unit variance, so the same sigma is the same signal-to-noise ratio in each model's own
    units (the official node's rule; a toy whose scales do not normalize would see another SNR). Above the source's
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


# -- native-size source: run the source at its trained resolution, scale the delta up ----------------
NATIVE_MARGIN = 1.25  # downsample only when the target has this many times the source's trained area


def native_size(source: LatentFormat, size: torch.Size | tuple[int, int]) -> tuple[int, int] | None:
    """The latent (h, w) near the source's trained area with the target's aspect ratio (multiples of 8),
    or None when the target is not clearly larger."""
    h, w = int(size[0]), int(size[1])
    native = (source.native_side / source.downscale) ** 2
    if h * w <= NATIVE_MARGIN * native:
        return None
    factor = math.sqrt(native / (h * w))
    return max(8, round(h * factor / 8) * 8), max(8, round(w * factor / 8) * 8)


def downsample_state(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, family: str,
                     size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x0) at `size`: x0 area-averaged; the noise (x - a x0) / b area-averaged and rescaled to unit
    variance per pixel (an average of n pixels has 1/n of the variance), so sigma stays the noise level."""
    a, b = (_shape(c, x) for c in _coefficients(sigma.to(x.dtype), family))
    noise = torch.where(b > 0, (x - a * x0) / b.clamp_min(1e-12), torch.zeros_like(x))
    x0_small = area(x0, size)
    noise_small = area(noise, size) * _block_counts(x.shape[-2:], size, x).sqrt()
    return a * x0_small + b * noise_small, x0_small


def area(v: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Averages over the input pixels each output pixel covers (exact for a constant field)."""
    return torch.nn.functional.adaptive_avg_pool2d(v.float(), size).to(v.dtype)


def upsample(delta: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear: exact for a constant field, never overshoots, and the closest to exact DS of bilinear,
    bicubic and nearest in bench/toy.py (README, Evidence)."""
    if tuple(delta.shape[-2:]) == tuple(size):
        return delta
    up = torch.nn.functional.interpolate(delta.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up.to(delta.dtype)


def _block_counts(big: torch.Size, small: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """How many input pixels adaptive_avg_pool2d averages into each output pixel, as an (h, w) tensor."""
    def spans(n_in: int, n_out: int) -> torch.Tensor:
        return torch.tensor([math.ceil((i + 1) * n_in / n_out) - (i * n_in) // n_out for i in range(n_out)],
                            dtype=like.dtype, device=like.device)

    return spans(big[0], small[0])[:, None] * spans(big[1], small[1])[None, :]
