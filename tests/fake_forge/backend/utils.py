"""backend/utils.py: load_torch_file. As in Forge, `safe_load` only takes effect when torch.load's code
names `weights_only`; under Forge's start-up wrapper it does not, so pickles are read permissively."""

import safetensors.torch
import torch

unsafe_loads: list[str] = []


def load_torch_file(ckpt, safe_load=False, device=None):
    if ckpt.lower().endswith(".safetensors"):
        return safetensors.torch.load_file(ckpt, device="cpu")
    if safe_load and "weights_only" not in torch.load.__code__.co_varnames:
        print("Warning torch.load doesn't support weights_only on this pytorch version, loading unsafely.")
        safe_load = False
    if safe_load:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    else:
        unsafe_loads.append(ckpt)
        sd = torch.load(ckpt, map_location="cpu", weights_only=False)  # Forge: its permissive pickle module
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
