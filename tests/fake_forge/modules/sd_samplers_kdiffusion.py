"""Forge's KDiffusionSampler: sampling_prepare/cleanup around real k-diffusion sampler functions."""

import k_diffusion.external
import k_diffusion.sampling
import torch
from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import sd_samplers, sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser

FUNCS = {"Euler": "sample_euler", "Heun": "sample_heun", "DPM++ 2M": "sample_dpmpp_2m", "Euler a": "sample_euler_ancestral"}


class CFGDenoiserKDiffusion(CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = k_diffusion.external.CompVisDenoiser(shared.sd_model)  # ForgeScheduleLinker
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class KDiffusionSampler:
    def __init__(self, name, sd_model):
        self.config = sd_samplers.find_sampler_config(name)
        self.func = getattr(k_diffusion.sampling, FUNCS[name])
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.last_latent = None

    def _run(self, p, x, steps, conditioning, unconditional_conditioning, image_conditioning):
        d = self.model_wrap_cfg
        d.p, d.step, d.mask, d.nmask = p, 0, getattr(p, "mask", None), getattr(p, "nmask", None)
        d.steps, d.total_steps = steps, self.config.total_steps(steps)
        self.last_latent = x
        torch.manual_seed(p.seed + 1000)
        return {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                "cond_scale": p.cfg_scale, "s_min_uncond": getattr(p, "s_min_uncond", 0.0)}

    def _launch(self, func):
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=None)
        try:
            return func()
        except sd_samplers_common.InterruptedException:
            return self.last_latent
        finally:
            sampling_cleanup(unet_patcher)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)
        extra_args = self._run(p, x, steps, conditioning, unconditional_conditioning, image_conditioning)
        x = x * sigmas[0]
        return self._launch(lambda: self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra_args, disable=True))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigma_sched = self.model_wrap.get_sigmas(steps)[steps - t_enc - 1:]
        extra_args = self._run(p, x, t_enc + 1, conditioning, unconditional_conditioning, image_conditioning)
        self.model_wrap_cfg.init_latent = x
        xi = x + noise * sigma_sched[0]
        return self._launch(lambda: self.func(self.model_wrap_cfg, xi, sigma_sched, extra_args=extra_args, disable=True))
