"""Real SD1.5 and SDXL UNet architectures with random weights (diffusers' UNet2DConditionModel, configs as
published for those models), wrapped as DS model functions: (x, sigma, cond) -> x0, eps-prediction on SD's
discrete schedule. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from k_diffusion import external

SD15 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip
SDXL = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
CONFIGS = {"SD1.5": SD15, "SDXL": SDXL}


def alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear beta schedule (SD1.x, SD2, SDXL)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(torch.float32)


@dataclass
class Model:
    name: str
    unet: UNet2DConditionModel
    denoiser: external.DiscreteEpsDDPMDenoiser
    calls: list[tuple[str, int, tuple[int, int]]]  # (model, rows, latent size) of every forward

    def model_fn(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append((self.name, x.shape[0], tuple(x.shape[-2:])))
        return self.denoiser(x, sigma, cond=cond)

    def conds(self, batch: int, seed: int) -> dict[str, torch.Tensor]:
        """Random text conditioning of this architecture's shape (a prompt's encoding stands in)."""
        g = torch.Generator().manual_seed(seed)
        dtype = self.unet.dtype
        cond = {"crossattn": torch.randn(batch, 77, self.unet.config.cross_attention_dim, generator=g).to(dtype)}
        if self.unet.config.addition_embed_type == "text_time":
            cond["text_embeds"] = torch.randn(batch, 1280, generator=g).to(dtype)
            cond["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(dtype)
        return cond


def build(name: str, seed: int, device: torch.device, dtype: torch.dtype, calls: list,
          weights: dict[str, torch.Tensor] | None = None) -> Model:
    """Random weights from seed, or the given state dict (built on the meta device, then assigned: how a
    WebUI loads a checkpoint, without a random init first)."""
    if weights is None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**CONFIGS[name]).to(device, dtype)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**CONFIGS[name])
        unet.load_state_dict({k: v.to(device, dtype) for k, v in weights.items()}, assign=True)
    unet = unet.eval().requires_grad_(False)
    added = unet.config.addition_embed_type == "text_time"

    def eps(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {"added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}} if added else {}
        return unet(x.to(dtype), t, encoder_hidden_states=cond["crossattn"], **extra).sample.to(x.dtype)

    eps_model = _Callable(eps)
    denoiser = external.DiscreteEpsDDPMDenoiser(eps_model, alphas_cumprod().to(device), quantize=True)
    return Model(name, unet, denoiser, calls)


def with_controlnet(model: Model, seed: int) -> Model:
    """The same UNet behind a ControlNet (diffusers' ControlNetModel copied from it, random zero convs) with a
    random control image: the adapted branch of a source-side ControlNet. Shares `calls` with the model."""
    from diffusers import ControlNetModel

    unet = model.unet
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet).to(unet.device, unet.dtype).eval().requires_grad_(False)
    for name, param in net.named_parameters():
        if "zero_conv" in name or "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            param.data.normal_(0, 0.01)

    def eps(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        hint = torch.rand(1, 3, x.shape[-2] * 8, x.shape[-1] * 8, generator=torch.Generator().manual_seed(seed))
        hint = hint.to(x.device, unet.dtype).expand(x.shape[0], -1, -1, -1)
        down, mid = net(x.to(unet.dtype), t, encoder_hidden_states=cond["crossattn"], controlnet_cond=hint,
                        return_dict=False)
        out = unet(x.to(unet.dtype), t, encoder_hidden_states=cond["crossattn"],
                   down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return out.sample.to(x.dtype)

    denoiser = external.DiscreteEpsDDPMDenoiser(_Callable(eps), alphas_cumprod().to(unet.device), quantize=True)
    return Model(f"{model.name}+ControlNet", unet, denoiser, model.calls)


class _Callable(torch.nn.Module):
    """k-diffusion's denoiser wraps an nn.Module; this one holds the eps function."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(x, t, cond)


def lora_state_dict(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on every attention projection of the UNet (what style LoRAs train)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.05
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def meta_flops_per_row(name: str, side: int, controlnet: bool = False) -> int:
    """FLOPs of one row at a latent side, counted on the meta device: real sizes without the memory.
    `controlnet`: the ControlNet's own FLOPs (diffusers' ControlNetModel of that UNet) instead."""
    from diffusers import ControlNetModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[name])
        extra = {}
        if unet.config.addition_embed_type == "text_time":
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)}}
        context = torch.zeros(1, 77, unet.config.cross_attention_dim)
        x, t = torch.zeros(1, 4, side, side), torch.tensor([500])
        with FlopCounterMode(display=False) as counter:
            if controlnet:
                ControlNetModel.from_unet(unet)(x, t, encoder_hidden_states=context,
                                                controlnet_cond=torch.zeros(1, 3, 8 * side, 8 * side), **extra)
            else:
                unet(x, t, encoder_hidden_states=context, **extra)
    return counter.get_total_flops()


def flops_per_row(model: Model, size: tuple[int, int], cache: dict) -> int:
    """FLOPs of one latent row through this UNet at this size (torch's flop counter; rows add linearly)."""
    key = (model.name, size)
    if key not in cache:
        from torch.utils.flop_counter import FlopCounterMode

        device = next(model.unet.parameters()).device
        x = torch.randn(1, 4, *size, device=device)
        cond = {k: v[:1].to(device) for k, v in model.conds(1, 0).items()}
        with FlopCounterMode(display=False) as counter:
            model.denoiser(x, torch.tensor([1.0], device=device), cond=cond)
        cache[key] = counter.get_total_flops()
    return cache[key]
