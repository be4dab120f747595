"""A ControlNet and an IP-Adapter on a Forge / Forge Neo source: the host's own code on a clone of the
source's UNet patcher (`apply_controlnet_advanced`; the built-in IP-Adapter's `apply_ipadapter`, which
adds attention patches to the clone's model options), driven by DS because the host's sampler only drives
the target.

The adapted branch's forward runs through the clone (`enabled`): its conds carry the ControlNet, as the
host's `sampling_function` does for the target, and its model options the IP-Adapter's patches, so both
see the source's sigma and prompts; the base branch runs the plain patcher. DS does what the host's
`sampling_prepare` / `sampling_cleanup` do for the target: `pre_run` maps the ControlNet's start and end to
the source's noise levels at each pass, `cleanup` drops the hint afterwards. The target's patcher and the
user's own ControlNet / IP-Adapter units are never touched.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from backend import memory_management
from backend.patcher.controlnet import apply_controlnet_advanced

from lib_delta import DeltaError, logger

from . import control, files
from .generation import forget_modules, temporarily

ENCODERS = {"H": "CLIP-ViT-H (IPAdapter)", "bigG": "CLIP-ViT-bigG (IPAdapter)"}  # the built-in's preprocessors
MISSING_IPADAPTER = ("Delta Sampling: an IP-Adapter on the DS source needs this WebUI's built-in IP-Adapter "
                     "extension (sd_forge_ipadapter), which is disabled or missing.")


@dataclass
class ForgeControl:
    source: Any  # forge_models.SourceModel
    unet: Any  # the clone of the source's UNet patcher carrying the ControlNet

    def patchers(self) -> list[Any]:
        """The ControlNet's weights, loaded by the host's memory manager with the target and the source."""
        linked = self.unet.controlnet_linked_list
        return [] if linked is None else list(linked.get_models())

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


def load_ipadapter(filename: str, source: Any) -> control.IPAdapterFile:
    """An IP-Adapter file checked against the source; the built-in IP-Adapter builds its modules from it at
    each generation."""
    ipadapter = control.read_ipadapter(filename, source.unet.model.diffusion_model, source.title)
    logger.info("IP-Adapter %s loaded for the source %s", os.path.basename(filename), source.title)
    return ipadapter


def attach(source: Any, request: control.ControlRequest, controlnet: Any,
           ipadapter: control.IPAdapterFile | None) -> ForgeControl:
    """A clone of the source's UNet patcher with the ControlNet and its hint (the host resizes the hint to
    whatever size the source runs at) and the IP-Adapter's patches, through the host's own calls."""
    unet = source.unet
    if controlnet is not None:
        unet = apply_controlnet_advanced(unet=unet, controlnet=controlnet, image_bchw=request.hint,
                                         strength=request.weight, start_percent=request.start,
                                         end_percent=request.end)
    if ipadapter is not None:
        unet = apply_ipadapter(unet, ipadapter, request.reference, request.ip_weight)
    return ForgeControl(source, unet)


def apply_ipadapter(unet: Any, ipadapter: control.IPAdapterFile, image: np.ndarray, weight: float) -> Any:
    """The built-in IP-Adapter on a clone of `unet`, its reference image encoded by the host's CLIP vision
    preprocessor (shared with the user's own IP-Adapter units); the encoder leaves the GPU afterwards."""
    module = sys.modules.get("lib_ipadapter.IPAdapterPlus")
    if module is None:
        try:
            module = importlib.import_module("lib_ipadapter.IPAdapterPlus")
        except ImportError as e:
            raise DeltaError(MISSING_IPADAPTER) from e
    encoder = _clip_vision(ipadapter.encoder)
    pixels = torch.from_numpy(image.astype(np.float32) / 255.0)[None]  # B,H,W,C in [0, 1], as the host gives it
    try:  # Script.process runs outside the host's inference mode: no autograd graph of the encoder here
        with torch.no_grad(), _class_state_kept(module.IPAdapterApply):  # Neo keeps its last adapter on the class
            patched = module.IPAdapterApply().apply_ipadapter(
                ipadapter=ipadapter.parts, model=unet, weight=weight, clip_vision=encoder, image=pixels, weight_type="original",
                noise=0.0, embeds=None, attn_mask=None, start_at=0.0, end_at=1.0, unfold_batch=False)
    finally:
        forget_modules(memory_management.current_loaded_models, [encoder.model], lambda entry: entry.model_unload())
    return patched[0] if isinstance(patched, tuple) else patched  # Forge: a 1-tuple; Neo: the clone


def _clip_vision(kind: str) -> Any:
    try:
        from modules_forge.shared import supported_preprocessors
    except ImportError as e:
        raise DeltaError(MISSING_IPADAPTER) from e
    preprocessor = supported_preprocessors.get(ENCODERS[kind])
    if preprocessor is None:
        raise DeltaError(MISSING_IPADAPTER)
    try:
        return preprocessor.load_clipvision()
    except Exception as e:
        from modules_forge import shared as forge_shared

        where = getattr(forge_shared, "preprocessor_dir", "models/ControlNetPreprocessor")
        raise DeltaError(f"Delta Sampling: the IP-Adapter's image encoder could not be loaded by the WebUI "
                         f"({preprocessor.filename}, kept in {where}): {type(e).__name__}: {e}") from e


@contextlib.contextmanager
def _class_state_kept(cls: type) -> Iterator[None]:
    """The class attributes `cls` has now, and no others, after the block."""
    saved = dict(vars(cls))
    try:
        yield
    finally:
        for name in [n for n in vars(cls) if n not in saved]:
            delattr(cls, name)
        for name, value in saved.items():
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)
