"""The `backend/` Forges (Forge, and Forge Neo's ComfyUI-style backend): independent source engines from
`forge_loader`, prompts through each engine's own `get_learned_conditioning`, LoRAs through the host's
own loader as online patches.

LoRA choice ("online LoRA per forward"): the adapted branch is a clone of the source's UNet and CLIP
patchers carrying `online_mode=True` patches, which the host merges per layer inside each forward and
never writes into the weights, so one module serves both branches (half the memory of two engines; in
fp32 exactly the host's offline merge). Forge attaches them with `refresh_loras()` (ForgeLora below);
Neo's patchers have no such call, so neo_lora.NeoLora wires Neo's own LowVramPatch weight functions.

The two backends differ in a few more places, decided by what the objects offer (never by version):
Neo's `forge_loader` resets and rewrites the global `backend.args.dynamic_args` (saved and restored
around every source load, encode and forward) and `model_unload` lost `avoid_model_moving`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import math
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from backend import loader, memory_management
from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.sampling.condition import compile_conditions
from backend.sampling.sampling_function import calc_cond_uncond_batch
from backend.utils import nested_move_to_device
from modules import shared

from lib_delta import DeltaError, latent, logger
from lib_delta.lora import check_host_patches
from lib_delta.source import slice_conds

from . import files
from .a1111_models import flag_format
from .generation import (
    encode_prompts,
    forget_modules,
    keep_files,
    keep_only,
    loading_source,
    lora_key,
    trim_heap,
)

KNOWN_LATENTS = {"SD15": latent.SD1, "SDXL": latent.SDXL, "SD3": latent.SD3, "Flux": latent.FLUX,
                 "Flux2": latent.FLUX2, "Wan21": latent.WAN21}  # huggingface_guess latent classes
VIDEO_ENGINES = {"Wan": latent.WAN_VIDEO}  # 5-D latents: paired only with their own kind


def target_format(engine: Any) -> latent.LatentFormat:
    """Latent format and noise schedule of a Forge engine (the active one or a source), from its model
    config's latent class and its predictor; the is_sd* flags where an engine has no config."""
    name = type(engine).__name__
    config_latent = getattr(getattr(engine, "model_config", None), "latent_format", None)
    if name in VIDEO_ENGINES:
        fmt = VIDEO_ENGINES[name]
    elif config_latent is not None:
        fmt = _config_format(config_latent)
    elif name in ("Flux", "Chroma"):  # Forge sets no flag for these
        fmt = latent.FLUX
    else:
        fmt = flag_format(engine)
        if fmt is None:
            raise DeltaError(f"Delta Sampling does not know the latent format of a {name} model.")
    flow = getattr(_predictor(engine), "prediction_type", None) == "const"
    return fmt.as_flow() if flow and fmt.family != "flow" else fmt


def _config_format(config_latent: Any) -> latent.LatentFormat:
    """A huggingface_guess latent class (or instance): ours where known, else its own space."""
    kind = config_latent if isinstance(config_latent, type) else type(config_latent)
    known = KNOWN_LATENTS.get(kind.__name__)
    if known is not None:
        return known
    return latent.LatentFormat(kind.__name__, int(getattr(config_latent, "latent_channels", 4)),
                               float(getattr(config_latent, "scale_factor", 1.0)),
                               float(getattr(config_latent, "shift_factor", None) or 0.0), vae=kind.__name__)


def _predictor(engine: Any) -> Any:
    return getattr(engine.forge_objects.unet.model, "predictor", None)


def source_sigma_max(engine: Any, fmt: latent.LatentFormat) -> float:
    """The highest noise level a source was trained on (VP sigma). Zero-terminal-SNR and flow models
    have seen pure noise."""
    predictor = _predictor(engine)
    if fmt.family == "flow" or getattr(getattr(engine, "model_config", None), "ztsnr", False) or predictor is None:
        return math.inf
    return float(getattr(predictor, "sigma_max", math.inf))


@contextlib.contextmanager
def host_globals() -> Iterator[None]:
    """Save and restore the backend's global `dynamic_args` (Neo's loader resets and rewrites them from the
    file it loads; its engines read and write reference latents while encoding and denoising)."""
    try:
        from backend.args import dynamic_args
    except ImportError:
        yield
        return
    if isinstance(dynamic_args, dict):  # Forge: a plain dict
        saved = copy.copy(dynamic_args)
        try:
            yield
        finally:
            dynamic_args.clear()
            dynamic_args.update(saved)
        return
    fields = {k: v for k, v in vars(dynamic_args).items() if not k.startswith("__") and not isinstance(
        v, classmethod | staticmethod | property | types.FunctionType)}
    saved = {k: copy.copy(v) if isinstance(v, list | dict) else v for k, v in fields.items()}
    try:
        yield
    finally:
        for key, value in saved.items():
            current = getattr(dynamic_args, key, None)
            if isinstance(value, list) and isinstance(current, list):
                current[:] = value  # the target holds this very list (e.g. ref_latents)
            else:
                setattr(dynamic_args, key, value)


@dataclass
class ForgeLora:
    """Clones of the source's UNet and CLIP patchers with online LoRA patches."""

    source: SourceModel
    unet: Any
    clip: Any

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """Per forward: attach the UNet patches; the CLIP clone is swapped in, attached only by `encode`."""
        engine = self.source.engine
        base_clip = engine.forge_objects.clip
        engine.forge_objects.clip = self.clip
        try:
            _attach(self.unet)
            yield
        finally:
            engine.forge_objects.clip = base_clip
            with _keep_empty_cache_flag():
                self.source.unet.refresh_loras()
                base_clip.patcher.refresh_loras()  # returns at once unless an encode attached the LoRA


@contextlib.contextmanager
def _keep_empty_cache_flag() -> Iterator[None]:
    """Forge's LoRA refresh asks the sampler to empty the CUDA cache (a device sync and re-allocations);
    switching online patches frees nothing, so DS's two refreshes per step keep the host's flag as it was."""
    saved = getattr(memory_management, "signal_empty_cache", None)
    try:
        yield
    finally:
        if saved is not None:
            memory_management.signal_empty_cache = saved


def _attach(patcher: Any) -> None:
    """Move a clone's online patches to its (shared) module's device and make them the active ones."""
    device = next(patcher.model.parameters()).device
    dtype = getattr(patcher.model, "computation_dtype", None)
    nested_move_to_device(patcher.lora_patches, device=device, **({"dtype": dtype} if dtype else {}))
    with _keep_empty_cache_flag():
        patcher.refresh_loras()


@dataclass
class SourceModel:
    """A Forge engine used only for its UNet patcher and text encoder(s)."""

    title: str
    engine: Any
    latent_format: latent.LatentFormat
    sigma_max: float = math.inf
    loras: dict[tuple, Any] = field(default_factory=dict)
    controlnets: dict[tuple, Any] = field(default_factory=dict)  # loaded ControlNets this generation uses
    ipadapters: dict[tuple, Any] = field(default_factory=dict)  # IP-Adapter tables this generation uses
    control_unet: Any = None  # while an adapted branch runs: the patcher carrying its ControlNet / IP-Adapter
    marks_uncond_rows = True  # model_fn takes uncond_rows (a ControlNet / IP-Adapter tells them apart)

    @property
    def unet(self) -> Any:
        return self.engine.forge_objects.unet

    def patchers(self) -> list[Any]:
        """What Forge's memory manager must load beside the target while sampling."""
        return [self.unet]

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond_rows: int = 0) -> torch.Tensor:
        """The UNet's prediction for rows of (x, sigma, cond); the last `uncond_rows` go to the host as uncond
        conds, so a ControlNet / IP-Adapter treats them as it treats the target's negative prompt."""
        unet, split = self.control_unet or self.unet, x.shape[0] - uncond_rows
        if not uncond_rows:
            return self._batch(unet, x, sigma, cond, None)
        head, tail = slice_conds(cond, 0, split), slice_conds(cond, split)
        if split == uncond_rows and torch.equal(x[:split], x[split:]):  # one sub-prompt per image: one call
            return self._batch(unet, x[split:], sigma[split:], head, tail)
        parts = [self._batch(unet, x[:split], sigma[:split], head, None)] if split else []
        return torch.cat([*parts, self._batch(unet, x[split:], sigma[split:], None, tail)])

    def _batch(self, unet: Any, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any) -> torch.Tensor:
        """The host's cond/uncond batch call: cond rows' predictions, then uncond rows'."""
        conds, unconds = (compile_conditions(c) if c is not None else [] for c in (cond, uncond))
        if getattr(self.control_unet, "controlnet_linked_list", None) is not None:  # as the host's
            for c in conds + unconds:  # sampling_function gives the target's conds its ControlNets
                c["control"] = unet.controlnet_linked_list
        with host_globals():
            out, out_uncond = calc_cond_uncond_batch(unet.model, conds, unconds or None, x, sigma, unet.model_options)
        return torch.cat([out] * (cond is not None) + [out_uncond] * (uncond is not None)).to(x.dtype)

    def encode(self, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
               width: int, height: int) -> tuple[Any, Any]:
        self.engine.set_clip_skip(int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1)))
        clip = self.engine.forge_objects.clip.patcher
        if hasattr(clip, "refresh_loras"):
            _attach(clip)  # Forge: the LoRA clone inside ForgeLora.enabled
        try:
            with host_globals():
                return encode_prompts(self.engine, prompts, negatives, steps, hires_steps, width, height)
        finally:  # the text encoder is on the device only while it encodes
            forget_modules(memory_management.current_loaded_models,
                           [self.engine.forge_objects.clip.cond_stage_model], lambda entry: entry.model_unload())

    def loras_for(self, stacks: list[tuple[tuple[str, float], ...]]) -> list[Any]:
        """One pair of LoRA clones per stack of (file, multiplier); keeps only these."""
        return keep_only(self.loras, [lora_key(stack) for stack in stacks], stacks, lambda st: _load_lora(self, st))

    def controls_for(self, requests: list[Any]) -> list[Any]:
        """One patched clone per control.ControlRequest; keeps only these ControlNet / IP-Adapter files loaded."""
        from . import forge_control

        nets = keep_files(self.controlnets, [r.controlnet for r in requests if r.controlnet],
                          lambda f: forge_control.load_controlnet(f, self.title))
        ips = keep_files(self.ipadapters, [r.ipadapter for r in requests if r.ipadapter],
                         lambda f: forge_control.load_ipadapter(f, self))
        return [forge_control.attach(self, r, nets.get(r.controlnet), ips.get(r.ipadapter)) for r in requests]

    def offload(self) -> None:
        """Leave the GPU, stay in RAM: the host's own unload moves the weights to its offload device."""
        forget_modules(memory_management.current_loaded_models,
                       [self.unet.model, self.engine.forge_objects.clip.cond_stage_model],
                       lambda entry: entry.model_unload())

    def release(self) -> None:
        release(self)


def _load_lora(source: SourceModel, stack: tuple[tuple[str, float], ...]) -> Any:
    """Clones of the source's UNet and CLIP patchers carrying every LoRA of the stack as online patches."""
    clip = source.engine.forge_objects.clip
    unet, lora_clip = source.unet.clone(), clip.clone()
    for filename, multiplier in stack:
        weights = files.read_weights(filename, "LoRA")
        unet_patches, rest = load_lora(weights, model_lora_keys_unet(source.unet.model, {}))
        clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
        name = os.path.basename(filename)
        check_host_patches(name, source.title, len(weights), rest, [
            (unet_patches, source.unet.model.state_dict()), (clip_patches, clip.cond_stage_model.state_dict())])
        loaded = [*unet.add_patches(filename=filename, patches=unet_patches, strength_patch=multiplier,
                                    online_mode=True),
                  *lora_clip.add_patches(filename=filename, patches=clip_patches, strength_patch=multiplier,
                                         online_mode=True)]  # Forge returns a set, Neo a list
        if rest:
            logger.warning("LoRA %s: %d keys did not match the source %s", name, len(rest), source.title)
        logger.info("LoRA %s on %s: %d patches (online)", name, source.title, len(loaded))
    if hasattr(unet, "refresh_loras"):
        return ForgeLora(source, unet, lora_clip)
    from .neo_lora import NeoLora  # ComfyUI-style patcher: per-layer weight functions

    return NeoLora(source, unet, lora_clip)


def cached_source(cache: Any, info: Any, role: str = "source checkpoint") -> SourceModel:
    return cache.get(("forge", info.filename, info.shorthash or info.hash), lambda: load_source(info, role))


def load_source(info: Any, role: str = "source checkpoint") -> SourceModel:
    """`forge_loader` into an independent engine; never `forge_model_reload`, which replaces the target."""
    weights = files.read_weights(info.filename, role)
    logger.info("loading %s %s", role, info.title)
    with loading_source(info.title), host_globals(), _tensors_for(info.filename, weights):
        engine = loader.forge_loader(info.filename)
    if engine is None:
        raise DeltaError(f"Delta Sampling: Forge does not recognize the model type of '{info.title}'.")
    fmt = target_format(engine)
    return SourceModel(info.title, engine, fmt, source_sigma_max(engine, fmt))


@contextlib.contextmanager
def _tensors_for(filename: str, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """`forge_loader` takes a path: let its file read return the tensors we read safely instead. Forge's
    own reads unpickle .ckpt files permissively and rename a file they fail on. Neo asks for metadata."""
    original = loader.load_torch_file

    def read(ckpt: Any, *args: Any, **kwargs: Any) -> Any:
        if ckpt != filename:
            return original(ckpt, *args, **kwargs)
        return (weights, {}) if kwargs.get("return_metadata") else weights

    loader.load_torch_file = read
    try:
        yield
    finally:
        loader.load_torch_file = original


def _unload(entry: Any) -> None:
    """A loaded-model entry's own unload: Forge's takes avoid_model_moving, Neo's (memory, unpatch)."""
    if "avoid_model_moving" in inspect.signature(entry.model_unload).parameters:
        entry.model_unload(avoid_model_moving=True)
    else:
        entry.model_unload()


def release(source: SourceModel) -> None:
    """Make a source engine really leave memory: the host's loaded list, DS-patched UNets, then the heap."""
    forget_modules(memory_management.current_loaded_models,
                   [source.unet.model, source.engine.forge_objects.clip.cond_stage_model], _unload)
    source.loras.clear()
    forget_modules(memory_management.current_loaded_models,
                   [m.model for net in source.controlnets.values() for m in net.get_models()], _unload)
    source.controlnets.clear()
    source.ipadapters.clear()
    source.engine = None
    gc.collect()
    memory_management.soft_empty_cache()
    trim_heap()
