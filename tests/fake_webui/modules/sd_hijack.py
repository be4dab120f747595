"""modules/sd_hijack.py: the global model_hijack wraps a model's text encoders (emphasis, long prompts,
TI) and records them as the active model's (`clip`, `layers`), which DS must not leave changed."""

import torch
from modules import sd_unet


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """sd_hijack_clip's wrapper: the text encoder it replaces is its `wrapped` child (so the model's
    `cond_stage_model` no longer has `.transformer`)."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        return self.wrapped(texts)


class StableDiffusionModelHijack:
    clip = None
    layers = None

    def hijack(self, m):
        m.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model
        self.layers = list(m.modules())
        sd_unet.original_forward = "set by hijack"


model_hijack = StableDiffusionModelHijack()
