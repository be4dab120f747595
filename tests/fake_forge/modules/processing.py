"""Forge's processing order: forge_objects reset from forge_objects_after_applying_lora before every
pass; the hires pass calls process_before_every_sampling before and after that reset."""

import importlib.util
from pathlib import Path

from modules import sd_samplers, shared

_spec = importlib.util.spec_from_file_location(
    "modules._a1111_processing", Path(__file__).parents[2] / "fake_webui" / "modules" / "processing.py")
_a1111 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_a1111)
StableDiffusionProcessing, Processed, script_errors = _a1111.StableDiffusionProcessing, _a1111.Processed, _a1111.script_errors
_hook, _conds, _noise, _dummy_image_cond = _a1111._hook, _a1111._conds, _a1111._noise, _a1111._dummy_image_cond


def _reset(p):
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


def process_images(p):
    _hook(p, "process")
    samples = []
    for n in range(p.n_iter):
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
        all_prompts = p.prompts_list or [p.prompt] * (p.batch_size * p.n_iter)
        p.prompts = all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = [p.negative_prompt] * p.batch_size
        p.hr_prompts, p.hr_negative_prompts = p.prompts, p.negative_prompts
        _reset(p)
        p.firstpass_steps = sd_samplers.find_sampler_config(p.sampler_name).total_steps(p.steps)
        c, uc = _conds(p, p.prompts, p.negative_prompts, p.firstpass_steps)
        p.sampler = sd_samplers.create_sampler(p.sampler_name, shared.sd_model)
        x = _noise(p, n, (4, p.height // 8, p.width // 8))
        _reset(p)
        if p.init_latent is not None:
            _hook(p, "process_before_every_sampling", x=p.init_latent, noise=x, c=c, uc=uc)
            out = p.sampler.sample_img2img(p, p.init_latent, x, c, uc, image_conditioning=_dummy_image_cond(x))
        else:
            _hook(p, "process_before_every_sampling", x=x, noise=x, c=c, uc=uc)
            out = p.sampler.sample(p, x, c, uc, image_conditioning=_dummy_image_cond(x))
        if p.enable_hr:
            out = _hires(p, n, out)
        samples.append(out)
    processed = Processed(samples, [dict(p.extra_generation_params)])
    _hook(p, "postprocess", processed)
    return processed


def _hires(p, n, samples):
    import torch

    p.is_hr_pass = True
    p.hr_upscale_to_x, p.hr_upscale_to_y = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
    samples = torch.nn.functional.interpolate(samples, scale_factor=p.hr_scale, mode="nearest")
    p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, shared.sd_model)
    config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
    hr_c, hr_uc = _conds(p, p.hr_prompts, p.hr_negative_prompts, p.firstpass_steps,
                         config.total_steps(p.hr_second_pass_steps or p.steps))
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(p.seed + 31 * n + 1))
    _hook(p, "process_before_every_sampling", x=samples, noise=noise, c=hr_c, uc=hr_uc)
    _reset(p)
    _hook(p, "process_before_every_sampling", x=samples, noise=noise, c=hr_c, uc=hr_uc)
    out = p.sampler.sample_img2img(p, samples, noise, hr_c, hr_uc, steps=p.hr_second_pass_steps or p.steps,
                                   image_conditioning=_dummy_image_cond(samples))
    p.is_hr_pass = False
    return out
