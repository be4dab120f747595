"""modules_forge/patch_basic.py: Forge wraps torch.load and safetensors.torch.load_file at start-up. The
wrapper hides `weights_only` from callers that inspect torch.load, and on any error it renames every
existing path argument to '<path>.corrupted' ("Forge will download models again")."""

import os

import safetensors.torch
import torch


def build_loaded(module, loader_name):
    original_name = loader_name + "_origin"
    if not hasattr(module, original_name):
        setattr(module, original_name, getattr(module, loader_name))
    original = getattr(module, original_name)

    def loader(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as e:
            message = str(e) + "\n"
            for path in list(args) + list(kwargs.values()):
                if isinstance(path, str) and os.path.exists(path):
                    os.replace(path, path + ".corrupted")
                    message += f"Forge has tried to move the corrupted file to {path}.corrupted\n"
            raise ValueError(message) from e

    setattr(module, loader_name, loader)


def patch_all_basics():
    build_loaded(safetensors.torch, "load_file")
    build_loaded(torch, "load")


def unpatch_all_basics():
    """Test helper (not in Forge): put the originals back."""
    for module, name in ((safetensors.torch, "load_file"), (torch, "load")):
        if hasattr(module, name + "_origin"):
            setattr(module, name, getattr(module, name + "_origin"))
            delattr(module, name + "_origin")
