"""backend/utils.py: load_torch_file (safetensors, or torch.load weights_only when safe_load)."""

import safetensors.torch
import torch

unsafe_loads: list[str] = []


def load_torch_file(ckpt, safe_load=False, device=None):
    if ckpt.lower().endswith(".safetensors"):
        return safetensors.torch.load_file(ckpt, device="cpu")
    if not safe_load:
        unsafe_loads.append(ckpt)  # Forge uses a permissive pickle module here
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def nested_move_to_device(obj, **kwargs):
    if isinstance(obj, dict):
        for key in obj:
            obj[key] = nested_move_to_device(obj[key], **kwargs)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            obj[i] = nested_move_to_device(obj[i], **kwargs)
    elif isinstance(obj, tuple):
        obj = tuple(nested_move_to_device(i, **kwargs) for i in obj)
    elif isinstance(obj, torch.Tensor):
        return obj.to(**kwargs)
    return obj
