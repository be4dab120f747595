"""A1111's KDiffusionSampler: real k-diffusion sampler functions over the CFG denoiser."""

import k_diffusion.external
import k_diffusion.sampling
import torch
from modules import sd_samplers, sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

FUNCS = {"Euler": "sample_euler", "Heun": "sample_heun", "DPM++ 2M": "sample_dpmpp_2m", "Euler a": "sample_euler_ancestral"}


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser = k_diffusion.external.CompVisVDenoiser if shared.sd_model.parameterization == "v" else k_diffusion.external.CompVisDenoiser
            self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler:
    denoiser_class = CFGDenoiserKDiffusion

    def __init__(self, name, sd_model):
        self.config = sd_samplers.find_sampler_config(name)
        self.func = getattr(k_diffusion.sampling, FUNCS[name])
        self.model_wrap_cfg = self.denoiser_class(self)
        self.last_latent = None

    @property
    def model_wrap(self):
        return self.model_wrap_cfg.inner_model

    def initialize(self, p):
        d = self.model_wrap_cfg
        d.p, d.step, d.mask, d.nmask = p, 0, getattr(p, "mask", None), getattr(p, "nmask", None)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent

    def get_sigmas(self, steps):
        return self.model_wrap.get_sigmas(steps)

    def _run(self, p, x, steps, conditioning, unconditional_conditioning, image_conditioning):
        self.initialize(p)
        sigmas = self.get_sigmas(steps)
        self.last_latent = x
        extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                      "cond_scale": p.cfg_scale, "s_min_uncond": self.s_min_uncond}
        torch.manual_seed(p.seed + 1000)  # ancestral noise, reproducible per run
        return sigmas, extra_args

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas, extra_args = self._run(p, x, steps, conditioning, unconditional_conditioning, image_conditioning)
        x = x * sigmas[0]
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra_args, disable=True))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas, extra_args = self._run(p, x, steps, conditioning, unconditional_conditioning, image_conditioning)
        sigma_sched = sigmas[steps - t_enc - 1:]
        self.model_wrap_cfg.init_latent = x
        xi = x + noise * sigma_sched[0]
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, sigma_sched, extra_args=extra_args, disable=True))
