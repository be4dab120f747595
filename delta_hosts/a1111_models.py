"""A1111: build independent source models and their conditioning, without touching the active model.

Never `sd_models.load_model` (it trashes the active model) and never `model_loaded_callback` (it would
tag modules for the Lora extension, which would merge the prompt's <lora:...> into the source).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from modules import devices, sd_models, shared

from lib_delta import DeltaError, latent, logger
from lib_delta.lora import LoraAdapter

from .files import find_checkpoint, read_weights, split_title  # noqa: F401 - re-exported
from .generation import encode_prompts, loading_source


def flag_format(model: Any) -> latent.LatentFormat | None:
    """Latent format from the WebUI's is_sd* flags, which every host's model objects carry; None if unset."""
    for flag, fmt in (("is_sd3", latent.SD3), ("is_sdxl", latent.SDXL), ("is_sd2", latent.SD2),
                      ("is_sd1", latent.SD1)):
        if getattr(model, flag, False):
            return fmt
    return None


def target_format(model: Any) -> latent.LatentFormat:
    """The latent format of an A1111 model object (the active one or a source)."""
    return flag_format(model) or latent.SD1


@dataclass
class SourceModel:
    """An independent A1111 model object used only for its UNet and text encoder(s)."""

    title: str
    model: torch.nn.Module
    denoiser: torch.nn.Module
    latent_format: latent.LatentFormat
    adapters: dict[tuple, LoraAdapter] = field(default_factory=dict)

    @property
    def sigma_max(self) -> float:
        """The highest noise level it was trained on: its schedule's last sigma (huge with zero terminal SNR)."""
        if self.latent_format.family == "flow":
            return math.inf
        return float(getattr(self.denoiser, "sigma_max", math.inf))

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        cond_dict = cond if isinstance(cond, dict) else {"c_crossattn": [cond]}
        with devices.autocast(), _own_unet():
            return self.denoiser(x, sigma, cond=cond_dict).to(x.dtype)

    def encode(self, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
               width: int, height: int) -> tuple[Any, Any]:
        with devices.autocast():
            return encode_prompts(self.model, prompts, negatives, steps, hires_steps, width, height)

    def lora(self, filename: str, multiplier: float) -> LoraAdapter:
        key = (filename, os.path.getmtime(filename) if os.path.exists(filename) else 0.0, multiplier)
        if key not in self.adapters:
            self.adapters.clear()
            adapter = LoraAdapter.from_state_dict(read_weights(filename, "LoRA"), self.model, multiplier)
            logger.info("LoRA %s on %s: %d keys matched", os.path.basename(filename), self.title, adapter.report.matched)
            self.adapters[key] = adapter
        return self.adapters[key]

    def offload(self) -> None:
        """Leave the GPU, stay in RAM (DS is off for a generation)."""
        self.place(devices.cpu)

    def place(self, device: torch.device) -> None:
        if self.denoiser is not None and next(self.model.parameters()).device != torch.device(device):
            self.denoiser.to(device)  # the denoiser wraps the model: its sigmas move with it
            devices.torch_gc()

    def release(self) -> None:
        release(self)


@contextlib.contextmanager
def _own_unet() -> Iterator[None]:
    """A selected SD Unet (TensorRT, ...) answers every UNetModel.forward with the target's engine, which
    would make the delta ~0: the source runs its own UNet, and the selection is put back right after."""
    from modules import sd_unet

    selected = sd_unet.current_unet
    sd_unet.current_unet = None
    try:
        yield
    finally:
        sd_unet.current_unet = selected


def cached_source(cache: Any, info: Any, role: str = "source checkpoint") -> SourceModel:
    """The source model for a CheckpointInfo from `cache`, keyed by file and hash; loaded on a miss."""
    source = cache.get(("ckpt", info.filename, info.shorthash or info.hash), lambda: load_source(info, role))
    source.place(devices.device)
    return source


def load_source(info: Any, role: str = "source checkpoint") -> SourceModel:
    """Load a checkpoint as an independent model in the host's device and UNet dtype."""
    weights = read_weights(info.filename, role)
    logger.info("loading %s %s", role, info.title)
    with loading_source(info.title):
        model = _instantiate(info, weights)
    fmt = target_format(model)
    unet_in = getattr(model.model.diffusion_model, "in_channels", fmt.channels)
    if unet_in != fmt.channels:
        raise DeltaError(f"Delta Sampling: '{info.title}' is an inpainting/edit model ({unet_in} input channels); "
                         "use a plain base checkpoint as the source.")
    return SourceModel(info.title, model, _denoiser(model), fmt)


def _instantiate(info: Any, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    from modules import sd_disable_initialization, sd_models_config, sd_models_xl
    from omegaconf import OmegaConf

    config = OmegaConf.load(sd_models_config.find_checkpoint_config(state_dict, info))
    sd_models.repair_config(config, state_dict)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("first_stage_model.")}
    with sd_disable_initialization.DisableInitialization(disable_clip=True), \
            sd_disable_initialization.InitializeOnMeta():
        model = sd_models.instantiate_from_config(config.model, state_dict)
    model.first_stage_model = torch.nn.Identity()  # the source never decodes; keep no VAE
    conversion = None if shared.cmd_opts.no_half else {"alphas_cumprod": None, "": torch.float16}
    with sd_disable_initialization.LoadStateDictOnMeta(state_dict, device=devices.cpu,
                                                       weight_dtype_conversion=conversion):
        sd_models.set_model_type(model, state_dict)
        sd_models.set_model_fields(model)
        if model.is_sdxl:
            sd_models_xl.extend_sdxl(model)
        if hasattr(model, "before_load_weights"):
            model.before_load_weights(state_dict)
        model.load_state_dict(state_dict, strict=False)
        if hasattr(model, "after_load_weights"):
            model.after_load_weights(state_dict)
    del state_dict
    model.is_sdxl_inpaint = False
    alphas = model.alphas_cumprod
    model.alphas_cumprod = None
    model.to(devices.device, devices.dtype_unet)
    model.alphas_cumprod = alphas.to(devices.device, torch.float32)
    model.alphas_cumprod_original = model.alphas_cumprod
    sd_models.apply_alpha_schedule_override(model)  # the host's downcast / zero-terminal-SNR options
    model.eval().requires_grad_(False)
    _hijack_text_encoders(model)
    return model


def _hijack_text_encoders(model: torch.nn.Module) -> None:
    """Wrap the source's text encoders for emphasis, long prompts and TI, keeping the host's globals."""
    from modules import sd_hijack, sd_unet

    hijack = sd_hijack.model_hijack
    saved = (hijack.clip, hijack.layers, sd_unet.original_forward)
    try:
        hijack.hijack(model)
    finally:
        hijack.clip, hijack.layers, sd_unet.original_forward = saved


def _denoiser(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "create_denoiser"):
        return model.create_denoiser()
    import k_diffusion.external

    wrapper = k_diffusion.external.CompVisVDenoiser if model.parameterization == "v" else k_diffusion.external.CompVisDenoiser
    return wrapper(model, quantize=shared.opts.enable_quantization)


def release(source: SourceModel) -> None:
    """Drop a source model's weights so the memory really comes back."""
    source.adapters.clear()
    source.model.to("meta")
    source.model = source.denoiser = None  # type: ignore[assignment]
    gc.collect()
    devices.torch_gc()
