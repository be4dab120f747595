"""reForge / Forge Classic (`ldm_patched`): source models built like the active one, by
`modules_forge.forge_loader.load_model_for_a1111` (A1111 prompt handling over ldm_patched modules),
and LoRAs through `ldm_patched.modules.sd.load_lora_for_models`.

LoRA choice ("two engines"): these forks merge LoRA patches into the shared weights when a patcher is
loaded, and toggling base/adapted on one module re-merges (Classic) or moves the whole UNet (reForge) on
every switch. So the adapted branch is a second copy of the source with the LoRA merged by the fork's own
model management: 2x the source's memory, no per-step patching, both copies loaded with the target.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from ldm_patched.modules import lora as fork_lora
from ldm_patched.modules import model_management
from ldm_patched.modules.sd import load_lora_for_models
from modules_forge import forge_loader

from lib_delta import DeltaError, latent, logger
from lib_delta.lora import check_host_patches

from . import a1111_models, files
from .generation import (
    encode_prompts,
    forget_modules,
    keep_only,
    loading_source,
    lora_key,
    temporarily,
    trim_heap,
)


def target_format(model: Any) -> latent.LatentFormat:
    """Latent format from the model's ldm_patched latent format (these forks keep A1111's is_* flags)."""
    fmt = a1111_models.target_format(model)
    scale = getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None)
    scale = getattr(getattr(scale, "latent_format", None), "scale_factor", fmt.scale)
    if abs(scale - fmt.scale) > 1e-6:
        raise DeltaError(f"Delta Sampling does not know this model's latent format (scale {scale}).")
    return fmt


@dataclass
class Engine:
    """One loaded copy: the A1111-style model object and the patchers that carry its weights."""

    model: Any
    unet: Any
    clip: Any


@dataclass
class TwoEngineLora:
    """The adapted branch: a second copy of the source whose patchers carry the LoRA."""

    source: SourceModel
    engine: Engine

    def enabled(self) -> contextlib.AbstractContextManager[None]:
        return temporarily(self.source, active=self.engine)


@dataclass
class SourceModel:
    title: str
    base: Engine
    latent_format: latent.LatentFormat
    info: Any = None
    active: Engine | None = None
    loras: dict[tuple, TwoEngineLora] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.active = self.base

    @property
    def sigma_max(self) -> float:
        sampling = getattr(self.base.unet.model, "model_sampling", None)
        return float(getattr(sampling, "sigma_max", math.inf))

    def patchers(self) -> list[Any]:
        return [self.base.unet] + [lora.engine.unet for lora in self.loras.values()]

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        kw = {"c_crossattn": cond["crossattn"], "y": cond["vector"]} if isinstance(cond, dict) else {"c_crossattn": cond}
        model = self.active.unet.model
        return model.apply_model(x, sigma, transformer_options={}, **kw).to(x.dtype)

    def encode(self, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
               width: int, height: int) -> tuple[Any, Any]:
        model_management.load_model_gpu(self.active.clip.patcher)  # merges this copy's text-encoder LoRA
        try:
            return encode_prompts(self.active.model, prompts, negatives, steps, hires_steps, width, height)
        finally:  # the text encoder is on the device only while it encodes
            forget_modules(model_management.current_loaded_models, [self.active.clip.cond_stage_model],
                           lambda entry: entry.model_unload())

    def loras_for(self, stacks: list[tuple[tuple[str, float], ...]]) -> list[TwoEngineLora]:
        """One merged copy of the source per stack of (file, multiplier); keeps only these."""
        return keep_only(self.loras, [lora_key(stack) for stack in stacks], stacks,
                         lambda stack: _load_lora(self, stack), lambda old: _drop(old.engine))

    def offload(self) -> None:
        """Leave the GPU, stay in RAM: out of the fork's loaded list, moved by its own unload."""
        for engine in [self.base, *(lora.engine for lora in self.loras.values())]:
            _drop(engine)

    def release(self) -> None:
        for lora in self.loras.values():
            _drop(lora.engine)
        self.loras.clear()
        _drop(self.base)
        self.active = self.base = None  # type: ignore[assignment]
        gc.collect()
        model_management.soft_empty_cache()
        trim_heap()


def _load_lora(source: SourceModel, stack: tuple[tuple[str, float], ...]) -> TwoEngineLora:
    loaded = [(filename, multiplier, files.read_weights(filename, "LoRA")) for filename, multiplier in stack]
    for filename, _, weights in loaded:
        _check_lora(source, os.path.basename(filename), weights)
    copy = _load_engine(source.info, files.read_weights(source.info.filename, "source checkpoint"))
    for filename, multiplier, weights in loaded:
        unet, clip = load_lora_for_models(copy.unet, copy.clip, weights, multiplier, multiplier, filename)
        if unet is copy.unet and clip is copy.clip:
            _drop(copy)
            raise DeltaError(f"Delta Sampling: LoRA '{os.path.basename(filename)}' does not fit the source "
                             f"'{source.title}': no keys matched (it was made for another architecture).")
        copy.unet, copy.clip = unet, clip
    copy.model.forge_objects.unet, copy.model.forge_objects.clip = copy.unet, copy.clip
    names = ", ".join(os.path.basename(f) for f, _ in stack)
    logger.info("LoRA %s on %s: merged into a second copy of the source", names, source.title)
    return TwoEngineLora(source, copy)


def _check_lora(source: SourceModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    """The fork matches LoRA keys by name only and skips misfits silently: check shapes first."""
    unet, clip = source.base.unet, source.base.clip
    unet_patches, rest = fork_lora.load_lora(weights, fork_lora.model_lora_keys_unet(unet.model, {}))
    clip_patches, rest = fork_lora.load_lora(rest, fork_lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    check_host_patches(name, source.title, len(weights), rest, [
        (unet_patches, unet.model.state_dict()), (clip_patches, clip.cond_stage_model.state_dict())])


def cached_source(cache: Any, info: Any, role: str = "source checkpoint") -> SourceModel:
    return cache.get(("ldm_patched", info.filename, info.shorthash or info.hash), lambda: load_source(info, role))


def load_source(info: Any, role: str = "source checkpoint") -> SourceModel:
    weights = files.read_weights(info.filename, role)
    logger.info("loading %s %s", role, info.title)
    engine = _load_engine(info, weights)
    return SourceModel(info.title, engine, target_format(engine.model), info)


def _load_engine(info: Any, weights: dict[str, torch.Tensor]) -> Engine:
    """`load_model_for_a1111` builds a model object without touching the active one."""
    from modules import timer

    with loading_source(info.title):
        model = forge_loader.load_model_for_a1111(timer.Timer(), info, weights)
    if isinstance(model, torch.nn.Module):
        model.eval()
    return Engine(model, model.forge_objects.unet, model.forge_objects.clip)


def _drop(engine: Engine) -> None:
    """Remove a copy's patchers from the fork's loaded list and from DS-patched target UNets."""
    forget_modules(model_management.current_loaded_models, [engine.unet.model, engine.clip.cond_stage_model],
                   lambda entry: entry.model_unload())
