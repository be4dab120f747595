"""modules_forge/forge_loader.py: load_model_for_a1111 builds an A1111-style model object carrying
forge_objects (UnetPatcher, CLIP), without touching the active model."""

import backend.diffusion_engine.sd15

from modules_forge.unet_patcher import CLIP, ModelPatcher, UnetPatcher

loads: list[str] = []


def load_model_for_a1111(timer, checkpoint_info=None, state_dict=None):
    loads.append(checkpoint_info.filename)
    model = backend.diffusion_engine.sd15.StableDiffusion(state_dict)
    unet, clip = model.forge_objects.unet, model.forge_objects.clip
    unet.__class__, clip.__class__, clip.patcher.__class__ = UnetPatcher, CLIP, ModelPatcher
    unet.model.latent_format = type("SD15", (), {"scale_factor": 0.18215})()
    model.forge_objects_original = model.forge_objects.shallow_copy()
    model.forge_objects_after_applying_lora = model.forge_objects.shallow_copy()
    model.sd_checkpoint_info = checkpoint_info
    return model
