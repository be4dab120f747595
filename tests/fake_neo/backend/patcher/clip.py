"""backend/patcher/clip.py (Neo): CLIP over Neo's ModelPatcher; clones share the text encoder."""

import torch
from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):  # noqa: B006 - Neo's signature
        if no_init:
            return
        self.cond_stage_model = torch.nn.ModuleDict(model_dict)
        self.tokenizer = tokenizer_dict
        self.patcher = ModelPatcher(self.cond_stage_model, load_device="cpu", offload_device="cpu")

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
