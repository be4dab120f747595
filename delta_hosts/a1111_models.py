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
from .generation import (
    encode_prompts,
    keep_files,
    keep_only,
    loading_source,
    lora_key,
    temporarily,
    trim_heap,
)
from .memory import MemoryPolicy


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
    controlnets: dict[tuple, Any] = field(default_factory=dict)  # sd-webui-controlnet models this generation uses
    ipadapters: dict[tuple, Any] = field(default_factory=dict)  # and IP-Adapters
    control: Any = None  # while an adapted branch runs: its a1111_control.A1111Control
    marks_uncond_rows = True  # model_fn takes uncond_rows (an IP-Adapter tells them apart)
    on_device: bool = False

    @property
    def sigma_max(self) -> float:
        """The highest noise level it was trained on: its schedule's last sigma (huge with zero terminal SNR)."""
        if self.latent_format.family == "flow":
            return math.inf
        return float(getattr(self.denoiser, "sigma_max", math.inf))

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond_rows: int = 0) -> torch.Tensor:
        cond_dict = cond if isinstance(cond, dict) else {"c_crossattn": [cond]}
        if self.control is not None:
            cond_dict = self.control.marked(cond_dict, x.shape[0], uncond_rows)
        with devices.autocast(), _own_unet():
            return self.denoiser(x, sigma, cond=cond_dict).to(x.dtype)

    def encode(self, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
               width: int, height: int) -> tuple[Any, Any]:
        with devices.autocast(), self._encoding():
            return encode_prompts(self.model, prompts, negatives, steps, hires_steps, width, height)

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        """The text encoders are on the device only while they encode."""
        if getattr(self.model, "lowvram", False):  # A1111's hook brings them in; send them back out after
            from modules import lowvram

            try:
                yield
            finally:
                lowvram.send_everything_to_cpu()
            return
        encoder = text_encoders(self.model)
        encoder.to(devices.device)
        try:
            yield
        finally:
            encoder.to(devices.cpu)

    def loras_for(self, stacks: list[tuple[tuple[str, float], ...]]) -> list[LoraAdapter]:
        """One adapter per stack of (file, multiplier), each LoRA on this source; keeps only these."""
        def load(stack: tuple[tuple[str, float], ...]) -> LoraAdapter:
            parts = []
            for filename, multiplier in stack:
                adapter = LoraAdapter.from_state_dict(read_weights(filename, "LoRA"), self.model, multiplier)
                logger.info("LoRA %s on %s: %d keys matched", os.path.basename(filename), self.title,
                            adapter.report.matched)
                parts.append(adapter)
            return LoraAdapter.stack(parts)

        return keep_only(self.adapters, [lora_key(stack) for stack in stacks], stacks, load)

    def controls_for(self, requests: list[Any]) -> list[Any]:
        """One control per control.ControlRequest, through sd-webui-controlnet; keeps only these files loaded."""
        from . import a1111_control

        a1111_control.extension()  # a clear message before anything loads
        unet = self.model.model.diffusion_model
        nets = keep_files(self.controlnets, [r.controlnet for r in requests if r.controlnet],
                          lambda f: a1111_control.load_controlnet(f, unet, devices.device, devices.dtype_unet))
        ips = keep_files(self.ipadapters, [r.ipadapter for r in requests if r.ipadapter],
                         lambda f: a1111_control.load_ipadapter(f, self))
        return [a1111_control.A1111Control(self, r, nets.get(r.controlnet), ips.get(r.ipadapter)) for r in requests]

    def to_device(self) -> None:
        """Ready to run (policy: memory.MemoryPolicy): the UNet on the device, text encoders on the CPU;
        under --medvram/--lowvram A1111's own hooks move the UNet (or its blocks) in while it runs."""
        if self.on_device or self.denoiser is None:
            return
        if policy(self.model).low_vram:
            from modules import lowvram

            if not hasattr(getattr(self.model, "first_stage_model", None), "decode"):
                self.model.first_stage_model = NoVae()
            try:
                with _unwrapped_text_encoder(self.model):  # A1111 sets up low VRAM before it wraps encoders
                    lowvram.setup_for_low_vram(self.model, not shared.cmd_opts.lowvram)
            except Exception:
                self.model.lowvram = False  # set first by A1111: a retry would skip the hooks
                raise
            with _without(self.denoiser, "inner_model"):
                self.denoiser.to(devices.device)  # the denoiser's own sigmas
        else:
            with _without(self.model, *TEXT_ENCODER_FIELDS):
                self.denoiser.to(devices.device)
        self.on_device = True

    def offload(self) -> None:
        """Leave the device, stay in RAM (DS is off for a generation)."""
        if not self.on_device:
            return
        if getattr(self.model, "lowvram", False):
            from modules import lowvram

            if any(lowvram.module_in_gpu is m for m in self.model.modules()):
                lowvram.send_everything_to_cpu()  # the small always-resident parts stay
        else:
            self.denoiser.to(devices.cpu)
            self.on_device = False
        devices.torch_gc()

    def release(self) -> None:
        release(self)


def _own_unet() -> contextlib.AbstractContextManager[None]:
    """A selected SD Unet (TensorRT, ...) answers every UNetModel.forward with the target's engine, which
    would make the delta ~0: the source runs its own UNet, and the selection is put back right after."""
    from modules import sd_unet

    return temporarily(sd_unet, current_unet=None)


class NoVae(torch.nn.Module):
    """Stands in for the VAE a source never uses (A1111's low-VRAM set-up wraps encode/decode)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a Delta Sampling source has no VAE")

    decode = encode


def policy(model: Any) -> MemoryPolicy:
    """A1111's flags, as it reads them for its own model (`lowvram.is_needed`)."""
    from modules import lowvram

    if not lowvram.is_needed(model):
        return MemoryPolicy()
    return MemoryPolicy("lowvram" if shared.cmd_opts.lowvram else "medvram")


TEXT_ENCODER_FIELDS = ("conditioner", "cond_stage_model")  # SDXL after the hijack: both name the conditioner


def text_encoders(model: Any) -> torch.nn.Module:
    return getattr(model, "conditioner", None) or model.cond_stage_model


def _unwrapped_text_encoder(model: Any) -> contextlib.AbstractContextManager[None]:
    """The encoder the hijack's wrapper (sd_hijack_clip / _open_clip) wraps, in its place for a while."""
    inner = getattr(getattr(model, "cond_stage_model", None), "wrapped", None)
    if inner is None or hasattr(model, "conditioner"):  # SDXL: lowvram hooks the conditioner itself
        return contextlib.nullcontext()
    return temporarily(model, cond_stage_model=inner)


def _without(parent: torch.nn.Module, *names: str) -> contextlib.AbstractContextManager[None]:
    """`parent` without some children while moving it: they stay where they are."""
    return temporarily(parent, **{name: None for name in names if getattr(parent, name, None) is not None})


def cached_source(cache: Any, info: Any, role: str = "source checkpoint") -> SourceModel:
    """The source model for a CheckpointInfo from `cache`, keyed by file and hash; loaded on a miss."""
    source = cache.get(("ckpt", info.filename, info.shorthash or info.hash), lambda: load_source(info, role))
    source.to_device()
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
    model.first_stage_model = NoVae()  # the source never decodes; keep no VAE
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
    model.to(devices.dtype_unet)  # on the CPU: SourceModel.to_device places it
    model.alphas_cumprod = alphas.to(torch.float32)
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
    for built in [*source.controlnets.values(), *source.ipadapters.values()]:
        built.model.to("meta")
    source.controlnets.clear()
    source.ipadapters.clear()
    source.model.to("meta")
    source.model = source.denoiser = None  # type: ignore[assignment]
    gc.collect()
    devices.torch_gc()
    trim_heap()  # glibc keeps freed pages otherwise: RSS would stay up after a release
