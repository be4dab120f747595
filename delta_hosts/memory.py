"""One memory policy for every host: where a source's parts live and when they move.

- Text encoders are on the device only while they encode, then go back to the CPU.
- The UNet runs beside the target while DS is on. A1111: on the device for the generation; under
  --medvram / --lowvram, A1111's own low-VRAM hooks put it (or each of its blocks) on the device only while
  it runs. Forge family: loaded with the target by the host's memory manager (its low-VRAM modes apply),
  which also reserves the source's activations.
- A generation with DS off moves sources off the device and keeps them in RAM (generation.rest_sources);
  Free, a switch beyond the cache size and low system RAM release them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENT_DOWNSCALE = 8  # every supported VAE: pixels per latent cell


@dataclass(frozen=True)
class MemoryPolicy:
    low_vram: str = ""  # "", "medvram" or "lowvram": the host's low-VRAM mode (A1111: its hooks serve the source)


def pass_size(p: Any) -> tuple[int, int]:
    """(width, height) of the pass being sampled: the hires target in a hires pass."""
    if getattr(p, "is_hr_pass", False):
        return p.hr_upscale_to_x, p.hr_upscale_to_y
    return p.width, p.height


def activation_shape(p: Any, channels: int) -> list[int]:
    """The latent batch one source branch runs on (cond + uncond rows) at this pass's size."""
    width, height = pass_size(p)
    return [2 * int(p.batch_size), channels, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE]
