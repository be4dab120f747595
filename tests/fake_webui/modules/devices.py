import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = dtype_unet = dtype_vae = torch.float32


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
