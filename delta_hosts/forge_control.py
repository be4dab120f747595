"""A ControlNet on a Forge / Forge Neo source: the host's own ControlNet (`apply_controlnet_advanced` on a
clone of the source's UNet patcher), driven by DS because the host's sampler only drives the target.

The adapted branch's forward runs through the clone (`enabled`): its conds carry the ControlNet, as the
host's `sampling_function` does for the target, so the ControlNet sees the source's sigma and prompts. DS
does what the host's `sampling_prepare` / `sampling_cleanup` do for the target: `pre_run` maps the start
and end to the source's noise levels at each pass, `cleanup` drops the hint afterwards. The target's
patcher and the user's own ControlNet units are never touched.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from backend.patcher.controlnet import apply_controlnet_advanced

from lib_delta import DeltaError, logger

from . import files
from .generation import temporarily


@dataclass
class ForgeControl:
    source: Any  # forge_models.SourceModel
    unet: Any  # the clone of the source's UNet patcher carrying the ControlNet

    def patchers(self) -> list[Any]:
        """The ControlNet's weights, loaded by the host's memory manager with the target and the source."""
        return list(self.unet.controlnet_linked_list.get_models())

    def begin_pass(self, p: Any) -> None:
        model = self.unet.model
        for cnet in self.unet.list_controlnets():
            cnet.pre_run(model, lambda percent: model.predictor.percent_to_sigma(percent))

    def end_pass(self) -> None:
        for cnet in self.unet.list_controlnets():
            cnet.cleanup()

    def enabled(self) -> contextlib.AbstractContextManager[None]:
        """The source's forward runs through this clone (its ControlNet, its model options) inside."""
        return temporarily(self.source, control_unet=self.unet)


def load_controlnet(filename: str, source_title: str) -> Any:
    """The host's ControlNet object for a file, read by DS first (safetensors, or a weights-only pickle)."""
    from modules_forge.supported_controlnet import ControlNetPatcher

    state_dict = files.read_weights(filename, "ControlNet")
    patcher = ControlNetPatcher.try_build_from_state_dict(dict(state_dict), filename)
    if patcher is None:
        raise DeltaError(f"Delta Sampling: '{os.path.basename(filename)}' is not a ControlNet this WebUI can load.")
    logger.info("ControlNet %s loaded for the source %s", os.path.basename(filename), source_title)
    return patcher.model_patcher


def attach(source: Any, controlnet: Any, hint: torch.Tensor, weight: float, start: float, end: float,
           native: bool = False) -> ForgeControl:
    """A clone of the source's UNet patcher with the ControlNet and its hint (the host's own call; it resizes
    the hint to whatever size the source runs at, so `native` needs nothing here)."""
    clone = apply_controlnet_advanced(unet=source.unet, controlnet=controlnet, image_bchw=hint, strength=weight,
                                      start_percent=start, end_percent=end)
    return ForgeControl(source, clone)
