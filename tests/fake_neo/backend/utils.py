"""backend/utils.py (Neo): load_torch_file reads safetensors with safe_open and pickles weights-only
through `torch.load` (which Neo wraps at start-up: a failed read renames the file); it can also return
the file's metadata."""

import safetensors
import torch
from backend import forge_fake

nested_move_to_device = forge_fake.load("utils.py").nested_move_to_device


def load_torch_file(ckpt, *, safe_load=True, device=None, return_metadata=False):
    metadata = {}
    if ckpt.lower().endswith(".safetensors"):
        try:
            with safetensors.safe_open(ckpt, framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                metadata = f.metadata() or {}
        except Exception as e:
            raise ValueError(f'Model "{ckpt}" is corrupt or invalid') from e
    else:
        assert safe_load
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    return (sd, metadata) if return_metadata else sd
