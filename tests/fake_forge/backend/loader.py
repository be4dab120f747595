"""backend/loader.py: forge_loader(path) builds an independent engine from a checkpoint file."""

from backend.diffusion_engine.sd15 import StableDiffusion
from backend.utils import load_torch_file

loads: list[str] = []


def forge_loader(sd, additional_state_dicts=None):
    loads.append(sd)
    return StableDiffusion(load_torch_file(sd))
