"""backend/sampling/sampling_function.py (Neo): Forge's batching, post-CFG args that also carry the
`cond_scale` actually used, `extra_model_options`, and sampling_prepare with Neo's load_models_gpu."""

import math

from backend import forge_fake, memory_management
from backend.sampling.condition import compile_conditions, compile_weighted_conditions

calc_cond_uncond_batch = forge_fake.load("sampling/sampling_function.py").calc_cond_uncond_batch


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,  # noqa: B006
                            return_full=False):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization") else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    scale = cond_scale * (edit_strength if not math.isclose(edit_strength, 1.0) else 1.0)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        cfg_result = fn(args)
    return (cfg_result, cond_pred, uncond_pred) if return_full else cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition, extra_model_options=None):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    control = unet_patcher.controlnet_linked_list
    if control is not None:
        for h in cond + (uncond or []):
            h["control"] = control
    model_options = {**unet_patcher.model_options, **(extra_model_options or {})}
    return sampling_function_inner(unet_patcher.model, denoiser_params.x, denoiser_params.sigma, uncond, cond,
                                   cond_scale, model_options, return_full=True)


def sampling_prepare(unet, x):  # Neo adds the target's own estimate from x to both amounts
    extra = unet.extra_preserved_memory_during_sampling
    nets = unet.controlnet_linked_list.get_models() if unet.controlnet_linked_list is not None else []
    memory_management.load_models_gpu(models=[unet] + unet.extra_model_patchers_during_sampling + nets,
                                      memory_required=extra, minimum_memory_required=extra)
    real_model = unet.model
    for cnet in unet.list_controlnets():
        cnet.pre_run(real_model, lambda p: real_model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet):
    for cnet in unet.list_controlnets():
        cnet.cleanup()
    memory_management.soft_empty_cache()
