"""modules/lowvram.py (1.10.1), written from its source: --medvram / --lowvram keep the big parts of a model
on the CPU and move one of them at a time to the device in a forward pre-hook (`module_in_gpu`)."""

from collections import namedtuple

import torch
from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")
ModuleWithParent = namedtuple("ModuleWithParent", ["module", "parent"], defaults=["None"])


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or (
        shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def setup_for_low_vram(sd_model, use_medvram):
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _):
        global module_in_gpu
        module = parents.get(module, module)
        if module_in_gpu == module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    first_stage_model = sd_model.first_stage_model
    encode, decode = first_stage_model.encode, first_stage_model.decode

    def encode_wrap(x):
        send_me_to_gpu(first_stage_model, None)
        return encode(x)

    def decode_wrap(z):
        send_me_to_gpu(first_stage_model, None)
        return decode(z)

    is_sdxl = hasattr(sd_model, "conditioner")
    is_sd2 = not is_sdxl and hasattr(sd_model.cond_stage_model, "model")
    remain = [(sd_model, "first_stage_model"), (sd_model, "depth_model"), (sd_model, "embedder"), (sd_model, "model")]
    if is_sdxl:
        remain.append((sd_model, "conditioner"))
    elif is_sd2:
        remain.append((sd_model.cond_stage_model, "model"))
    else:
        remain.append((sd_model.cond_stage_model, "transformer"))
    stored = []
    for obj, name in remain:
        stored.append(getattr(obj, name, None))
        setattr(obj, name, None)
    sd_model.to(devices.device)
    for (obj, name), module in zip(remain, stored, strict=True):
        setattr(obj, name, module)

    if is_sdxl:
        sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
    elif is_sd2:
        sd_model.cond_stage_model.model.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.model] = sd_model.cond_stage_model
    else:
        sd_model.cond_stage_model.transformer.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.transformer] = sd_model.cond_stage_model
    sd_model.first_stage_model.register_forward_pre_hook(send_me_to_gpu)
    sd_model.first_stage_model.encode, sd_model.first_stage_model.decode = encode_wrap, decode_wrap

    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
        return
    diff_model = sd_model.model.diffusion_model
    names = [n for n in ("input_blocks", "middle_block", "output_blocks", "time_embed") if hasattr(diff_model, n)]
    stored = [getattr(diff_model, n) for n in names]
    for n in names:
        setattr(diff_model, n, None)
    sd_model.model.to(devices.device)
    for n, module in zip(names, stored, strict=True):
        setattr(diff_model, n, module)
    diff_model.time_embed.register_forward_pre_hook(send_me_to_gpu)
    for block in diff_model.input_blocks:
        block.register_forward_pre_hook(send_me_to_gpu)
    for name in ("middle_block",):
        if hasattr(diff_model, name):
            getattr(diff_model, name).register_forward_pre_hook(send_me_to_gpu)
    for block in getattr(diff_model, "output_blocks", []):
        block.register_forward_pre_hook(send_me_to_gpu)
