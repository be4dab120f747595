"""A ControlNet on an A1111 source, through the sd-webui-controlnet extension's own code (its `UnetHook` on
the source's UNet). Without that extension a ControlNet on the source is refused with what to install.

The hook replaces the source UNet's `forward` for the pass; DS keeps the original one in place and swaps
the hooked one in only while the adapted branch runs (`enabled`), so the base branch stays plain. It is
given a stand-in process, never `p`: the hook rewraps `process.sample` to mark prompts, which would reach
the target's sampler. The ControlNet sees the source's own input: its latent, timesteps and prompts.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch

from lib_delta import DeltaError, latent, logger

from . import files
from .generation import temporarily
from .memory import pass_size

NO_IPADAPTER = ("Delta Sampling: an IP-Adapter on the DS source runs on Forge and Forge Neo; on A1111 it is not "
                "supported yet (a ControlNet on the source is).")
MISSING = ("Delta Sampling: a ControlNet on the DS source needs the sd-webui-controlnet extension on A1111 "
           "(Extensions > Available > sd-webui-controlnet); DS drives its ControlNet code.")


def extension() -> types.SimpleNamespace:
    """sd-webui-controlnet's modules, as that extension registers them when A1111 loads it."""
    names = {"hook": "scripts.hook", "guess": "scripts.controlnet_model_guess"}
    found = {key: sys.modules.get(name) for key, name in names.items()}
    if any(module is None for module in found.values()):
        raise DeltaError(MISSING)
    return types.SimpleNamespace(**found)


def load_controlnet(filename: str, unet: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Any:
    ext = extension()
    state_dict = files.read_weights(filename, "ControlNet")
    try:
        built = ext.guess.build_model_by_guess(state_dict, unet, filename)
    except Exception as e:
        raise DeltaError(f"Delta Sampling: '{os.path.basename(filename)}' is not a ControlNet sd-webui-controlnet "
                         f"can load: {e}") from e
    built.model.to(device, dtype)
    logger.info("ControlNet %s loaded for the source (sd-webui-controlnet)", os.path.basename(filename))
    return built


@dataclass
class A1111Control:
    source: Any  # a1111_models.SourceModel
    built: Any  # sd-webui-controlnet's ControlModel(model, type)
    hint: torch.Tensor  # (1, 3, H, W) in [0, 1]
    weight: float
    start: float
    end: float
    native: bool = False  # the source runs at its native size: a second hint at that size
    hook: Any = None
    hooked: Any = None  # the hooked forward, swapped in by `enabled`

    @property
    def unet(self) -> torch.nn.Module:
        return self.source.model.model.diffusion_model

    def patchers(self) -> list[Any]:
        return []

    def begin_pass(self, p: Any) -> None:
        """Hook the source UNet for this pass with the hint at the pass's size (and at the native size the
        source runs at, where it does), then put the plain forward back until `enabled`."""
        ext = extension()
        width, height = pass_size(p)
        device = next(self.unet.parameters()).device
        hint = _resized(self.hint, (height, width)).to(device)
        small = latent.native_size(self.source.latent_format, (height // 8, width // 8)) if self.native else None
        param = ext.hook.ControlParams(
            control_model=self.built.model, preprocessor={"name": "none", "preprocessor_resolution": 512,
                                                          "threshold_a": 100, "threshold_b": 200},
            hint_cond=hint, weight=self.weight, guidance_stopped=False, start_guidance_percent=self.start,
            stop_guidance_percent=self.end, advanced_weighting=None, control_model_type=self.built.type,
            hr_hint_cond=None if small is None else _resized(self.hint, (small[0] * 8, small[1] * 8)).to(device),
            global_average_pooling=False, soft_injection=False, cfg_injection=False)
        self.hook = ext.hook.UnetHook(lowvram=False)
        self.hook.hook(model=self.unet, sd_ldm=self.source.model, control_params=[param],
                       process=types.SimpleNamespace(sample=None))
        self.hooked, self.unet.forward = self.unet.forward, self.unet._original_forward

    def end_pass(self) -> None:
        if self.hook is not None:
            self.hook.restore()
        self.hook = self.hooked = None
        self.unet.__dict__.pop("forward", None)  # the class's forward, as before the pass

    def enabled(self) -> contextlib.AbstractContextManager[None]:
        """The hooked forward for the adapted branch; the plain one (`_original_forward`) again after."""
        if self.hooked is None:
            raise DeltaError("Delta Sampling: the source's ControlNet was not set up for this pass.")
        return temporarily(self.unet, forward=self.hooked)


def _resized(hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return hint if tuple(hint.shape[2:]) == size else torch.nn.functional.interpolate(hint, size=size, mode="nearest-exact")
