"""Random-weight model files with the real key layouts, for the real-WebUI checks (nothing downloaded)."""

from __future__ import annotations

import torch

SD15_BLOCK_CHANNELS = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280)  # input block outputs
HINT_CHANNELS = (3, 16, 16, 32, 32, 96, 96, 256, 320)  # cldm's input_hint_block convs (every other module)


def sd15_controlnet(unet: dict[str, torch.Tensor], seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """An SD1.5 ControlNet in the original cldm layout (`control_model.` keys: the UNet encoder copy, the hint
    block, 12 zero convs, middle_block_out), random weights. `unet`: an SD1.5 checkpoint's tensors; its
    `model.diffusion_model.` time_embed / input_blocks / middle_block keys give the encoder copy's shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape: torch.Size, fan_in: int, std: float | None = None) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * (std or min(0.05, fan_in**-0.5))).to(dtype)

    prefix, out = "model.diffusion_model.", {}
    for key, tensor in unet.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name and name.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            fan_in = int(tensor[0].numel()) if tensor.ndim > 1 else 1
            out[f"control_model.{name}"] = rand(tensor.shape, fan_in) if tensor.ndim > 1 else tensor.to(dtype).clone()
    for i, (c_in, c_out) in enumerate(zip(HINT_CHANNELS, HINT_CHANNELS[1:], strict=False)):
        # He-scaled: the map must survive eight convolutions for the control image to matter
        out[f"control_model.input_hint_block.{2 * i}.weight"] = rand((c_out, c_in, 3, 3), c_in * 9, (2 / (c_in * 9)) ** 0.5)
        out[f"control_model.input_hint_block.{2 * i}.bias"] = torch.zeros(c_out, dtype=dtype)
    for i, c in enumerate(SD15_BLOCK_CHANNELS):  # "zero" convs: small, not zero, so the ControlNet acts
        out[f"control_model.zero_convs.{i}.0.weight"] = rand((c, c, 1, 1), c)
        out[f"control_model.zero_convs.{i}.0.bias"] = torch.zeros(c, dtype=dtype)
    out["control_model.middle_block_out.0.weight"] = rand((1280, 1280, 1, 1), 1280)
    out["control_model.middle_block_out.0.bias"] = torch.zeros(1280, dtype=dtype)
    return out


SD15_IP_SITE_CHANNELS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)


def sd15_ipadapter(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """A plain SD1.5 IP-Adapter (h94's ip-adapter_sd15 layout, .safetensors form): image_proj.proj (3072, 1024)
    and norm (768) over the CLIP ViT-H image embedding; ip_adapter.{2i+1}.to_{k,v}_ip (C_i, 768) for the 16
    cross-attention sites in the hosts' order (input 1,2,4,5,7,8; output 3..11; middle)."""
    g = torch.Generator().manual_seed(seed)
    out = {"image_proj.proj.weight": (torch.randn(3072, 1024, generator=g) * 1024**-0.5).to(dtype),
           "image_proj.proj.bias": torch.zeros(3072, dtype=dtype), "image_proj.norm.weight": torch.ones(768, dtype=dtype),
           "image_proj.norm.bias": torch.zeros(768, dtype=dtype)}
    for i, channels in enumerate(SD15_IP_SITE_CHANNELS):
        for kv in ("k", "v"):
            out[f"ip_adapter.{2 * i + 1}.to_{kv}_ip.weight"] = (torch.randn(channels, 768, generator=g) * 768**-0.5).to(dtype)
    return out
