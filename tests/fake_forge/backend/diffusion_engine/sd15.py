"""An SD1.5 engine whose UNet and text encoder are tests/tinyldm.py's tiny modules built as Forge layers;
its model config names huggingface_guess's latent class and its KModel carries an eps predictor."""

from types import SimpleNamespace

from tinyldm import TinyLDM

from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import KModel
from backend.modules.k_prediction import Prediction, vp_sigmas
from backend.operations import use_forge_operations
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher


class SD15:  # huggingface_guess.latent.SD15
    latent_channels, scale_factor = 4, 0.18215


class StableDiffusion(ForgeDiffusionEngine):
    latent = SD15

    def __init__(self, state_dict, prediction_type="epsilon", ztsnr=False):
        super().__init__()
        ldm = TinyLDM()
        ldm.load_state_dict(state_dict)
        use_forge_operations(ldm.eval().requires_grad_(False))
        self.alphas_cumprod = ldm.alphas_cumprod
        self.model_config = SimpleNamespace(latent_format=self.latent, ztsnr=ztsnr,
                                            huggingface_repo=type(self).__name__)
        predictor = Prediction(vp_sigmas(ldm.alphas_cumprod), prediction_type)
        unet = UnetPatcher(KModel(ldm.model.diffusion_model, predictor), load_device="cpu", offload_device="cpu")
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
