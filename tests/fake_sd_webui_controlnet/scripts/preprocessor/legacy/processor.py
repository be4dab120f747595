"""scripts/preprocessor/legacy/processor.py: `clip(img, config=...)` encodes an HWC uint8 image with a CLIP
vision model loaded on first use into the module-global `clip_encoder` (`unload_clip` drops it); the
output has image_embeds and hidden_states. The fake encoder is a fixed projection of an 8x8 thumbnail."""

import torch

clip_encoder = {"clip_g": None, "clip_h": None, "clip_vitl": None}
loads = []


class ClipVisionDetector:
    def __init__(self, config, low_vram):
        dims = {"clip_h": (1024, 1280), "clip_g": (1280, 1664), "clip_vitl": (768, 1024)}[config]
        generator = torch.Generator().manual_seed(dims[0])
        self.model = torch.nn.Linear(3 * 8 * 8, dims[0])
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(dims[0], 3 * 8 * 8, generator=generator) * 0.3)
            self.model.bias.zero_()
        self.hidden = torch.nn.Linear(3 * 8 * 8, dims[1])

    def unload_model(self):
        self.model.to("meta")

    def __call__(self, input_image):
        pixels = torch.from_numpy(input_image).float().div(255.0).permute(2, 0, 1)[None]
        thumb = torch.nn.functional.adaptive_avg_pool2d(pixels, 8).flatten(1)
        hidden = self.hidden(thumb)[:, None].expand(1, 5, -1)
        return {"image_embeds": self.model(thumb), "hidden_states": [hidden, hidden * 2, hidden * 3]}


def clip(img, res=512, config="clip_vitl", low_vram=False, **kwargs):
    if clip_encoder[config] is None:
        loads.append(config)
        clip_encoder[config] = ClipVisionDetector(config, low_vram)
    return clip_encoder[config](img), False


def unload_clip(config="clip_vitl"):
    if clip_encoder[config] is not None:
        clip_encoder[config].unload_model()
        clip_encoder[config] = None
