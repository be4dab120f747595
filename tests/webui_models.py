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
