"""backend/loader.py (Neo): forge_loader(path) reads the file with metadata, resets the global
dynamic_args and sets its flags from the file, picks the engine from the state dict (here: SDXL when
the file name says 'xl'; `v_pred` / `ztsnr` keys, 'rectified' in the path), and raises
ModuleNotFoundError for what it does not recognize."""

import os

from backend.args import dynamic_args
from backend.diffusion_engine.sd15 import StableDiffusion
from backend.diffusion_engine.sdxl import StableDiffusionXL
from backend.utils import load_torch_file

loads: list[str] = []
MARKERS = ("v_pred", "ztsnr")


def forge_loader(sd, additional_state_dicts=None):
    loads.append(sd)
    state_dict, _metadata = load_torch_file(sd, return_metadata=True)
    dynamic_args.reset()
    path = str(sd).lower()
    dynamic_args.kontext = "kontext" in path
    dynamic_args.klein = dynamic_args.wan = dynamic_args.pid = False
    weights = {k: v for k, v in state_dict.items() if k not in MARKERS}
    try:
        if "xl" in os.path.basename(path):
            prediction = "const" if "rectified" in path else "v_prediction" if "v_pred" in state_dict else "epsilon"
            return StableDiffusionXL(weights, prediction, ztsnr="ztsnr" in state_dict)
        return StableDiffusion(weights)
    except Exception as e:
        raise ModuleNotFoundError("Failed to recognize model type") from e
