"""A slim StableDiffusionProcessing and process_images with A1111's script-hook order.

Script hooks are wrapped like ScriptRunner's (exceptions reported, generation goes on); exceptions from
inside the sampler propagate, as they do in A1111.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from modules import prompt_parser, sd_samplers, shared

script_errors: list[BaseException] = []


def _hook(p, name, *args, **kwargs):
    for script in p.scripts:
        try:
            getattr(script, name)(p, *args, *p.script_args, **kwargs)
        except Exception as e:  # ScriptRunner: errors.report(...)
            script_errors.append(e)


@dataclass
class StableDiffusionProcessing:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 6
    cfg_scale: float = 5.0
    width: int = 32
    height: int = 32
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "Euler"
    s_min_uncond: float = 0.0
    prompts_list: list | None = None
    scripts: list = field(default_factory=list)
    script_args: tuple = ()
    extra_generation_params: dict = field(default_factory=dict)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_sampler_name: str | None = None
    denoising_strength: float = 0.6
    init_latent: Any = None
    init_images: list | None = None  # img2img (StableDiffusionProcessingImg2Img)
    mask: Any = None
    nmask: Any = None
    is_hr_pass: bool = False
    eta: Any = None

    @property
    def sd_model(self):
        return shared.sd_model


@dataclass
class Processed:
    samples: list
    infotexts: list


def _conds(p, prompts, negatives, steps, hires_steps=None):
    model = shared.sd_model
    uc = prompt_parser.get_learned_conditioning(model, prompt_parser.SdConditioning(negatives, is_negative_prompt=True), steps, hires_steps)
    c = prompt_parser.get_multicond_learned_conditioning(model, prompt_parser.SdConditioning(prompts), steps, hires_steps)
    return c, uc


def _dummy_image_cond(x):
    """txt2img_image_conditioning for a non-inpainting model: zeros(B, 5, 1, 1)."""
    return x.new_zeros(x.shape[0], 5, 1, 1)


def _noise(p, n, shape):
    return torch.randn((p.batch_size, *shape), generator=torch.Generator().manual_seed(p.seed + 7919 * n))


def _start_batch(p):
    """Where a batch begins (after its prompts are set). Nothing on A1111; the Forge fakes reset here."""


def _before_every_sampling(p, hires, **kwargs):
    _hook(p, "process_before_every_sampling", **kwargs)


def process_images(p):
    _hook(p, "process")
    samples = []
    for n in range(p.n_iter):
        all_prompts = p.prompts_list or [p.prompt] * (p.batch_size * p.n_iter)
        p.prompts = all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = [p.negative_prompt] * p.batch_size
        p.hr_prompts, p.hr_negative_prompts = p.prompts, p.negative_prompts
        _start_batch(p)
        config = sd_samplers.find_sampler_config(p.sampler_name)
        p.firstpass_steps = config.total_steps(p.steps)
        c, uc = _conds(p, p.prompts, p.negative_prompts, p.firstpass_steps)
        p.sampler = sd_samplers.create_sampler(p.sampler_name, shared.sd_model)
        shape = (4, p.height // 8, p.width // 8)
        x = _noise(p, n, shape)
        if p.init_latent is not None:
            _before_every_sampling(p, False, x=p.init_latent, noise=x, c=c, uc=uc)
            out = p.sampler.sample_img2img(p, p.init_latent, x, c, uc, image_conditioning=_dummy_image_cond(x))
        else:
            _before_every_sampling(p, False, x=x, noise=x, c=c, uc=uc)
            out = p.sampler.sample(p, x, c, uc, image_conditioning=_dummy_image_cond(x))
        if p.enable_hr:
            out = _hires(p, n, out)
        samples.append(out)
    processed = Processed(samples, [dict(p.extra_generation_params)])
    _hook(p, "postprocess", processed)
    return processed


def _hires(p, n, samples):
    p.is_hr_pass = True
    p.hr_upscale_to_x, p.hr_upscale_to_y = int(p.width * p.hr_scale), int(p.height * p.hr_scale)
    samples = torch.nn.functional.interpolate(samples, scale_factor=p.hr_scale, mode="nearest")
    p.sampler = sd_samplers.create_sampler(p.hr_sampler_name or p.sampler_name, shared.sd_model)
    config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
    hr_c, hr_uc = _conds(p, p.hr_prompts, p.hr_negative_prompts, p.firstpass_steps, config.total_steps(p.hr_second_pass_steps or p.steps))
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(p.seed + 31 * n + 1))
    _before_every_sampling(p, True, x=samples, noise=noise, c=hr_c, uc=hr_uc)
    out = p.sampler.sample_img2img(p, samples, noise, hr_c, hr_uc, steps=p.hr_second_pass_steps or p.steps,
                                   image_conditioning=_dummy_image_cond(samples))
    p.is_hr_pass = False
    return out
