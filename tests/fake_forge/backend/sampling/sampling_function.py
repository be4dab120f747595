"""backend/sampling/sampling_function.py: cond/uncond batching, CFG with pre/post-CFG functions, and
sampling_prepare loading the UNet with its extra patchers in one load_models_gpu call."""

import math

import torch

from backend import memory_management
from backend.sampling.condition import compile_conditions, compile_weighted_conditions


def _repeat(c, batch):
    return c if c.shape[0] == batch else c.repeat(batch // c.shape[0], *([1] * (c.ndim - 1)))


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = [(c, 0) for c in cond] + ([(c, 1) for c in uncond] if uncond is not None else [])
    while to_run:
        first_shape = to_run[0][0]["model_conds"]["c_crossattn"].shape[1:]
        batch = [r for r in to_run if r[0]["model_conds"]["c_crossattn"].shape[1:] == first_shape]
        to_run = [r for r in to_run if not any(r is b for b in batch)]
        conds = [{k: _repeat(v, x_in.shape[0]) for k, v in r[0]["model_conds"].items()} for r in batch]
        c = {k: torch.cat([d[k] for d in conds]) for k in conds[0]}
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = [r[1] for r in batch]
        transformer_options["sigmas"] = timestep
        input_x, timestep_ = torch.cat([x_in] * len(batch)), torch.cat([timestep] * len(batch))
        control = batch[-1][0].get("control")  # Forge takes the last entry's, as all share the patcher's list
        if control is not None:
            pointer = control
            while pointer is not None:
                pointer.transformer_options = transformer_options
                pointer = pointer.previous_controlnet
            c["control"] = control.get_control(input_x, timestep_, dict(c), len(batch))
        output = model.apply_model(input_x, timestep_, transformer_options=transformer_options, **c).chunk(len(batch))
        for (entry, kind), out in zip(batch, output, strict=True):
            mult = entry.get("strength", 1.0)
            if kind == 0:
                out_cond += out * mult
                out_count += mult
            else:
                out_uncond += out * mult
                out_uncond_count += mult
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,  # noqa: B006
                            return_full=False):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization") else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return (cfg_result, cond_pred, uncond_pred) if return_full else cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    control = unet_patcher.controlnet_linked_list
    if control is not None:
        for h in cond + (uncond or []):
            h["control"] = control
    return sampling_function_inner(unet_patcher.model, denoiser_params.x, denoiser_params.sigma, uncond, cond,
                                   cond_scale, unet_patcher.model_options, return_full=True)


def sampling_prepare(unet, x):  # the real one also estimates the target's own activations from x
    extra = list(unet.extra_model_patchers_during_sampling)
    if unet.controlnet_linked_list is not None:
        extra += unet.controlnet_linked_list.get_models()
    memory_management.load_models_gpu(models=[unet] + extra,
                                      hard_memory_preservation=unet.extra_preserved_memory_during_sampling)
    real_model = unet.model
    for cnet in unet.list_controlnets():
        cnet.pre_run(real_model, lambda p: real_model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet):
    for cnet in unet.list_controlnets():
        cnet.cleanup()
