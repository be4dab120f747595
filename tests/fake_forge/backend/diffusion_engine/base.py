"""backend/diffusion_engine/base.py: ForgeObjects and the engine base class."""

import copy


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return copy.copy(self)


class ForgeDiffusionEngine:
    matched_guesses = []

    def __init__(self, estimated_config=None, huggingface_components=None):
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
