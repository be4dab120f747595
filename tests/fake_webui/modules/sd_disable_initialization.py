"""modules/sd_disable_initialization.py: build a model without random init, then load weights straight
into place (LoadStateDictOnMeta takes each tensor in the dtype its conversion rules give)."""

import contextlib

import torch


class DisableInitialization(contextlib.nullcontext):
    def __init__(self, disable_clip=True):
        super().__init__()


class InitializeOnMeta(contextlib.nullcontext):
    pass


class LoadStateDictOnMeta:
    def __init__(self, state_dict, device, weight_dtype_conversion=None):
        self.state_dict, self.device, self.conversion = state_dict, device, weight_dtype_conversion or {}

    def dtype_for(self, key):
        for prefix, dtype in self.conversion.items():
            if prefix and key.startswith(prefix):
                return dtype
        return self.conversion.get("")

    def __enter__(self):
        self.original = torch.nn.Module.load_state_dict
        outer = self

        def load_state_dict(module, state_dict, strict=True, assign=False):
            converted = {k: v.to(outer.device, outer.dtype_for(k)) if outer.dtype_for(k) else v.to(outer.device)
                         for k, v in state_dict.items()}
            return outer.original(module, converted, strict=strict, assign=True)

        torch.nn.Module.load_state_dict = load_state_dict
        return self

    def __exit__(self, *exc):
        torch.nn.Module.load_state_dict = self.original
