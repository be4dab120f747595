"""An SD1.5 engine whose UNet and text encoder are tests/tinyldm.py's tiny modules built as Forge layers."""

from tinyldm import TinyLDM

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import KModel
from backend.operations import use_forge_operations
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, state_dict):
        super().__init__()
        ldm = TinyLDM()
        ldm.load_state_dict(state_dict)
        use_forge_operations(ldm.eval().requires_grad_(False))
        self.alphas_cumprod = ldm.alphas_cumprod
        unet = UnetPatcher(KModel(ldm.model.diffusion_model, ldm.alphas_cumprod), load_device="cpu",
                           offload_device="cpu")
        clip = CLIP({"clip_l": ldm.cond_stage_model})
        self.forge_objects = ForgeObjects(unet, clip, None, None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.clip_skip = 1
        self.is_sd1 = True

    def set_clip_skip(self, clip_skip):
        self.clip_skip = clip_skip

    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.forge_objects.clip.cond_stage_model["clip_l"](list(prompt))
