"""backend/loader.py: forge_loader(path) reads the file itself and builds an independent engine;
an unrecognized state dict is 'Failed to recognize model type!'."""

from backend.diffusion_engine.sd15 import StableDiffusion
from backend.utils import load_torch_file

loads: list[str] = []


def forge_loader(sd, additional_state_dicts=None):
    loads.append(sd)
    try:
        state_dict = load_torch_file(sd)
        engine = StableDiffusion(state_dict)
    except Exception as e:
        raise ValueError("Failed to recognize model type!") from e
    return engine
