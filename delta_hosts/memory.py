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

from lib_delta import latent
from lib_delta.latent import LatentFormat
from lib_delta.spec import DeltaSettings


@dataclass(frozen=True)
class MemoryPolicy:
    low_vram: str = ""  # "", "medvram" or "lowvram": the host's low-VRAM mode (A1111: its hooks serve the source)


def pass_size(p: Any) -> tuple[int, int]:
    """(width, height) of the pass being sampled: the hires target in a hires pass."""
    if getattr(p, "is_hr_pass", False):
        return p.hr_upscale_to_x, p.hr_upscale_to_y
    return p.width, p.height


def activation_shape(p: Any, settings: DeltaSettings, fmt: LatentFormat, batched: bool) -> list[int]:
    """The largest latent batch one source model call runs on at this pass's size: cond + uncond rows
    (cond only with the cond-only delta), both branches' rows when the pair is batched, at the source's
    own size with a native-size source."""
    width, height = pass_size(p)
    size = (height // fmt.downscale, width // fmt.downscale)
    small = latent.native_size(fmt, size) if settings.knob("native_size") else None
    rows = 1 if settings.knob("cond_only") else 2
    if batched:
        rows = rows + 1 if settings.adapter_kind == "prompt" and rows == 2 else 2 * rows  # a shared uncond
    return [rows * int(p.batch_size), fmt.channels, *(small or size)]
