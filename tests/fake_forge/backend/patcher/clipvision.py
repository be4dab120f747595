"""backend/patcher/clipvision.py: a CLIP vision model behind its own ModelPatcher; `encode_image` takes
B,H,W,C images in [0, 1], loads the model through the memory manager and returns image_embeds. The fake
encoder is a fixed random projection of an 8x8 thumbnail, so different images give different embeds."""

import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class Output(dict):
    def __getattr__(self, name):
        return self[name]


class ClipVisionModel:
    def __init__(self, embed_dim):
        self.model = torch.nn.Linear(3 * 8 * 8, embed_dim)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(embed_dim)
            self.model.weight.copy_(torch.randn(embed_dim, 3 * 8 * 8, generator=generator) * 0.3)
            self.model.bias.zero_()
        self.patcher = ModelPatcher(self.model, load_device="cpu", offload_device="cpu")

    def encode_image(self, image):
        assert image.ndim == 4 and image.shape[-1] == 3 and 0.0 <= image.min() and image.max() <= 1.0
        memory_management.load_model_gpu(self.patcher)
        thumb = torch.nn.functional.adaptive_avg_pool2d(image.permute(0, 3, 1, 2), 8).flatten(1)
        return Output(image_embeds=self.model(thumb))


def load(ckpt_path):
    return ClipVisionModel(1280 if "bigG" in ckpt_path else 1024)
