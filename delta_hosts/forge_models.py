"""New Forge (`backend/`): independent source engines from `forge_loader`, prompts through each engine's
own `get_learned_conditioning`, LoRAs through Forge's own loader in online mode.

LoRA choice ("online LoRA refreshed per forward"): the adapted branch is a clone of the source's UNet and
CLIP patchers carrying `online_mode=True` patches. Forge merges online patches per layer inside each
forward (backend.operations.get_weight_and_bias) and never writes them into the weights, so one module
serves both branches; `refresh_loras()` before each branch attaches or detaches them. Half the memory
of two engines; in fp32 it is exact (the same merge_lora_to_weight math as Forge's offline merge).
"""

from __future__ import annotations

import contextlib
import gc
import os
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

from . import files
from .a1111_models import flag_format
from .generation import encode_prompts, forget_modules, loading_source, trim_heap


def target_format(engine: Any) -> latent.LatentFormat:
    """Latent format of a Forge engine (the active one or a source)."""
    name = type(engine).__name__
    if name in ("Flux", "Chroma"):  # Forge sets no flag for these
        return latent.FLUX
    fmt = flag_format(engine)
    if fmt is None:
        raise DeltaError(f"Delta Sampling does not know the latent format of a {name} model.")
    return fmt


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
            self.source.unet.refresh_loras()
            base_clip.patcher.refresh_loras()  # returns at once unless an encode attached the LoRA


def _attach(patcher: Any) -> None:
    """Move a clone's online patches to its (shared) module's device and make them the active ones."""
    device = next(patcher.model.parameters()).device
    dtype = getattr(patcher.model, "computation_dtype", None)
    nested_move_to_device(patcher.lora_patches, device=device, **({"dtype": dtype} if dtype else {}))
    patcher.refresh_loras()


@dataclass
class SourceModel:
    """A Forge engine used only for its UNet patcher and text encoder(s)."""

    title: str
    engine: Any
    latent_format: latent.LatentFormat
    loras: dict[tuple, ForgeLora] = field(default_factory=dict)

    @property
    def unet(self) -> Any:
        return self.engine.forge_objects.unet

    def patchers(self) -> list[Any]:
        """What Forge's memory manager must load beside the target while sampling."""
        return [self.unet]

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        unet = self.unet
        out, _ = calc_cond_uncond_batch(unet.model, compile_conditions(cond), None, x, sigma, unet.model_options)
        return out.to(x.dtype)

    def encode(self, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
               width: int, height: int) -> tuple[Any, Any]:
        self.engine.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
        _attach(self.engine.forge_objects.clip.patcher)  # the LoRA clone inside ForgeLora.enabled
        return encode_prompts(self.engine, prompts, negatives, steps, hires_steps, width, height)

    def lora(self, filename: str, multiplier: float) -> ForgeLora:
        key = (filename, os.path.getmtime(filename) if os.path.exists(filename) else 0.0, multiplier)
        if key not in self.loras:
            self.loras.clear()
            self.loras[key] = _load_lora(self, filename, multiplier)
        return self.loras[key]

    def release(self) -> None:
        release(self)


def _load_lora(source: SourceModel, filename: str, multiplier: float) -> ForgeLora:
    weights = files.read_weights(filename, "LoRA")
    clip = source.engine.forge_objects.clip
    unet_patches, rest = load_lora(weights, model_lora_keys_unet(source.unet.model, {}))
    clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
    name = os.path.basename(filename)
    check_host_patches(name, source.title, len(weights), rest, [
        (unet_patches, source.unet.model.state_dict()), (clip_patches, clip.cond_stage_model.state_dict())])
    unet, lora_clip = source.unet.clone(), clip.clone()
    loaded = unet.add_patches(filename=filename, patches=unet_patches, strength_patch=multiplier, online_mode=True)
    loaded |= lora_clip.add_patches(filename=filename, patches=clip_patches, strength_patch=multiplier,
                                    online_mode=True)
    if rest:
        logger.warning("LoRA %s: %d keys did not match the source %s", name, len(rest), source.title)
    logger.info("LoRA %s on %s: %d patches (online)", name, source.title, len(loaded))
    return ForgeLora(source, unet, lora_clip)


def cached_source(cache: Any, info: Any, role: str = "source checkpoint") -> SourceModel:
    return cache.get(("forge", info.filename, info.shorthash or info.hash), lambda: load_source(info, role))


def load_source(info: Any, role: str = "source checkpoint") -> SourceModel:
    """`forge_loader` into an independent engine; never `forge_model_reload`, which replaces the target."""
    weights = files.read_weights(info.filename, role)
    logger.info("loading %s %s", role, info.title)
    with loading_source(info.title), _tensors_for(info.filename, weights):
        engine = loader.forge_loader(info.filename)
    if engine is None:
        raise DeltaError(f"Delta Sampling: Forge does not recognize the model type of '{info.title}'.")
    return SourceModel(info.title, engine, target_format(engine))


@contextlib.contextmanager
def _tensors_for(filename: str, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """`forge_loader` takes a path: let its file read return the tensors we read safely instead. Forge's
    own reads unpickle .ckpt files permissively and rename a file they fail on."""
    original = loader.load_torch_file
    loader.load_torch_file = lambda ckpt, *a, **k: weights if ckpt == filename else original(ckpt, *a, **k)
    try:
        yield
    finally:
        loader.load_torch_file = original


def release(source: SourceModel) -> None:
    """Make a source engine really leave memory: Forge's loaded list, DS-patched UNets, then the heap."""
    forget_modules(memory_management.current_loaded_models,
                   [source.unet.model, source.engine.forge_objects.clip.cond_stage_model],
                   lambda entry: entry.model_unload(avoid_model_moving=True))
    source.loras.clear()
    source.engine = None
    gc.collect()
    memory_management.soft_empty_cache()
    trim_heap()
