"""A ControlNet and an IP-Adapter on an A1111 source, through the sd-webui-controlnet extension's own code
(its `UnetHook` on the source's UNet; its `PlugableIPAdapter` on the source's cross-attention modules).
Without that extension they are refused with what to install.

The hook replaces the source UNet's `forward` for the pass and the IP-Adapter its attention modules'; DS
keeps the plain ones in place and swaps the hooked ones in only while the adapted branch runs (`enabled`),
so the base branch stays plain. The hook gets a stand-in process, never `p`: it rewraps `process.sample`
to mark prompts, which would reach the target's sampler. DS marks the source's own negative-prompt rows
instead (`marked`), so the IP-Adapter gives them its zero-image tokens, as it does on the target. The
extension's module globals (`current_model`, `all_hacks`) hold the user's own units: DS sets them only
around its forwards and never leaves its modules there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib_delta import DeltaError, latent, logger

from . import control, files
from .generation import keeping_random_state, temporarily
from .memory import pass_size

MISSING = ("Delta Sampling: a ControlNet or IP-Adapter on the DS source needs the sd-webui-controlnet extension "
           "on A1111 (Extensions > Available > sd-webui-controlnet); DS drives its code.")
ENCODERS = {"H": "clip_h", "bigG": "clip_g"}  # sd-webui-controlnet's CLIP vision preprocessors
MODULES = {"hook": "scripts.hook", "guess": "scripts.controlnet_model_guess",
           "ipadapter": "scripts.ipadapter.plugable_ipadapter", "clip": "scripts.preprocessor.legacy.processor"}


def extension() -> types.SimpleNamespace:
    """sd-webui-controlnet's modules, as that extension registers them when A1111 loads it."""
    found = {key: sys.modules.get(name) for key, name in MODULES.items()}
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


def load_ipadapter(filename: str, source: Any) -> Any:
    """sd-webui-controlnet's IP-Adapter for a file (read by DS), checked against the source."""
    ipadapter = control.read_ipadapter(filename, source.model.model.diffusion_model, source.title)
    flat = {f"{part}.{key}": tensor for part, table in ipadapter.parts.items() for key, tensor in table.items()}
    built = extension().guess.build_model_by_guess(flat, None, filename)
    logger.info("IP-Adapter %s loaded for the source (sd-webui-controlnet)", os.path.basename(filename))
    return types.SimpleNamespace(model=built.model, type=built.type, encoder=ENCODERS[ipadapter.encoder],
                                 encoded={})  # the last reference images' CLIP outputs, by content


@dataclass
class A1111Control:
    source: Any  # a1111_models.SourceModel
    request: control.ControlRequest
    controlnet: Any = None  # sd-webui-controlnet's ControlModel(model, type)
    ipadapter: Any = None  # its PlugableIPAdapter (.model), with the encoder it takes
    hook: Any = None
    hooked: Any = None  # the hooked UNet forward, swapped in by `enabled`
    attention: dict[Any, tuple[Any, list]] = field(default_factory=dict)  # IP-Adapter: module -> (forward, hacks)
    encoded: Any = None  # the reference image's CLIP output, once per generation

    @property
    def unet(self) -> torch.nn.Module:
        return self.source.model.model.diffusion_model

    def patchers(self) -> list[Any]:
        return []

    def begin_pass(self, p: Any) -> None:
        """Hook the source UNet and its attention for this pass, then put the plain ones back until `enabled`."""
        ext = extension()
        width, height = pass_size(p)
        if self.controlnet is not None:
            self._hook_controlnet(ext, width, height)
        if self.ipadapter is not None:
            self._hook_ipadapter(ext, width, height)

    def _hook_controlnet(self, ext: types.SimpleNamespace, width: int, height: int) -> None:
        r, device = self.request, next(self.unet.parameters()).device
        hint = _resized(r.hint, (height, width)).to(device)
        small = latent.native_size(self.source.latent_format, (height // 8, width // 8)) if r.native else None
        param = ext.hook.ControlParams(
            control_model=self.controlnet.model, preprocessor={"name": "none", "preprocessor_resolution": 512,
                                                               "threshold_a": 100, "threshold_b": 200},
            hint_cond=hint, weight=r.weight, guidance_stopped=False, start_guidance_percent=r.start,
            stop_guidance_percent=r.end, advanced_weighting=None, control_model_type=self.controlnet.type,
            hr_hint_cond=None if small is None else _resized(r.hint, (small[0] * 8, small[1] * 8)).to(device),
            global_average_pooling=False, soft_injection=False, cfg_injection=False)
        self.hook = ext.hook.UnetHook(lowvram=False)
        self.hook.hook(model=self.unet, sd_ldm=self.source.model, control_params=[param],
                       process=types.SimpleNamespace(sample=None))
        self.hooked, self.unet.forward = self.unet.forward, self.unet._original_forward

    def _hook_ipadapter(self, ext: types.SimpleNamespace, width: int, height: int) -> None:
        if self.encoded is None:
            with keeping_random_state():  # the encoder is built with random init first
                self.encoded = _encoded(ext, self.ipadapter, self.request.reference)
        globals_ = ext.ipadapter
        previous, before = globals_.current_model, set(globals_.all_hacks)
        try:
            self.ipadapter.model.hook(model=self.unet, preprocessor_outputs=self.encoded, weight=self.request.ip_weight,
                                      start=0.0, end=1.0, latent_width=width // 8, latent_height=height // 8,
                                      effective_region_mask=None, dtype=torch.float32)
        finally:
            globals_.current_model = previous
            for module in [m for m in globals_.all_hacks if m not in before]:
                del globals_.all_hacks[module]
                self.attention[module] = (module.__dict__.pop("forward"), module.__dict__.pop("ipadapter_hacks"))

    def end_pass(self) -> None:
        if self.hook is not None:
            self.hook.restore()
        self.hook = self.hooked = None
        self.unet.__dict__.pop("forward", None)  # the class's forward, as before the pass
        self.attention.clear()
        if self.ipadapter is not None:
            self.ipadapter.model.cache = {}

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """The hooked forwards for the adapted branch; the plain ones again after."""
        if (self.controlnet is not None and self.hooked is None) or (self.ipadapter is not None and not self.attention):
            raise DeltaError("Delta Sampling: the source's ControlNet / IP-Adapter was not set up for this pass.")
        with contextlib.ExitStack() as stack:
            if self.hooked is not None:
                stack.enter_context(temporarily(self.unet, forward=self.hooked))
            if self.attention:
                stack.enter_context(temporarily(extension().ipadapter, current_model=self.unet))
                stack.callback(self._plain_attention)
                for module, (forward, hacks) in self.attention.items():
                    module.forward, module.ipadapter_hacks = forward, hacks
            with temporarily(self.source, control=self):
                yield

    def _plain_attention(self) -> None:
        for module in self.attention:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("ipadapter_hacks", None)
        self.unet.__dict__.pop("cond_mark", None)

    def marked(self, cond: dict, rows: int, uncond_rows: int) -> dict:
        """The IP-Adapter's cond marks for one forward: the last `uncond_rows` rows are negative-prompt rows.
        With the ControlNet hook, as the extension marks prompts: a +-1024 token before each row's context."""
        if self.ipadapter is None:
            return cond
        self.ipadapter.model.cache = {}  # its key/value cache follows the rows of one call
        mark = torch.ones(rows, 1, 1, 1)
        mark[rows - uncond_rows :] = 0.0
        if self.hooked is None:
            self.unet.cond_mark = mark.to(next(self.unet.parameters()).device)
            return cond
        context = cond["c_crossattn"][0]
        token = extension().hook.POSITIVE_MARK_TOKEN * (mark[:, :, 0, :] * 2 - 1)
        return {**cond, "c_crossattn": [torch.cat([token.to(context).expand(-1, 1, context.shape[2]), context], 1)]}


ENCODED_KEPT = 2  # reference images whose CLIP output an IP-Adapter keeps (an X/Y/Z grid reuses one)


def _encoded(ext: types.SimpleNamespace, ipadapter: Any, image: np.ndarray) -> dict[str, Any]:
    """The reference's CLIP output, encoded once per image content (loading the encoder costs seconds)."""
    key = hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()
    if key not in ipadapter.encoded:
        while len(ipadapter.encoded) >= ENCODED_KEPT:
            ipadapter.encoded.pop(next(iter(ipadapter.encoded)))
        ipadapter.encoded[key] = _encode(ext, image, ipadapter.encoder)
    return ipadapter.encoded[key]


def _encode(ext: types.SimpleNamespace, image: np.ndarray, config: str) -> dict[str, Any]:
    """The reference image through the extension's CLIP vision preprocessor; an encoder DS loaded is
    unloaded again (one the user's units loaded stays). Only what the IP-Adapter reads is kept, on the CPU."""
    loaded = ext.clip.clip_encoder.get(config) is not None
    try:
        out, _ = ext.clip.clip(image, config=config)
    except Exception as e:
        folder = getattr(sys.modules.get("annotator.annotator_path"), "models_path", None)
        where = os.path.join(folder, "clip_vision") if folder else "its annotator/downloads/clip_vision folder"
        raise DeltaError(f"Delta Sampling: the IP-Adapter's image encoder could not be loaded by sd-webui-controlnet "
                         f"({config}.pth, kept in {where}): {type(e).__name__}: {e}") from e
    finally:
        if not loaded:
            ext.clip.unload_clip(config)
    hidden = out["hidden_states"]
    return {"image_embeds": out["image_embeds"].cpu(), "hidden_states": [h.cpu() for h in hidden[-2:]]}


def _resized(hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return hint if tuple(hint.shape[2:]) == size else torch.nn.functional.interpolate(hint, size=size, mode="nearest-exact")
