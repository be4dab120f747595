"""A1111's timestep samplers (DDIM, DDIM CFG++): eps outputs and integer timesteps through the same CFG
denoiser. CFG++ scales the CFG by 1/12.5 and steps along the unconditional noise, as 1.10.1's ddim_cfgpp."""

import torch
from modules import sd_samplers, sd_samplers_common, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler:
    def __init__(self, funcname, sd_model):
        self.funcname = funcname
        self.config = sd_samplers.find_sampler_config("DDIM")
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.last_latent = None

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        d = self.model_wrap_cfg
        d.p, d.step, d.mask, d.nmask = p, 0, getattr(p, "mask", None), getattr(p, "nmask", None)
        d.steps, d.total_steps = steps, self.config.total_steps(steps)
        extra_args = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                      "cond_scale": p.cfg_scale, "s_min_uncond": 0.0}
        timesteps = torch.arange(1, 1000, 1000 // steps) + 1
        alphas_cumprod = shared.sd_model.alphas_cumprod
        alphas = alphas_cumprod[timesteps]
        alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
        s_in = x.new_ones(x.shape[0])
        cfgpp = self.funcname == "ddim_cfgpp"
        if cfgpp:
            d.cond_scale_miltiplier, d.need_last_noise_uncond = 1 / 12.5, True
        try:
            for i in range(len(timesteps) - 1):
                index = len(timesteps) - 1 - i
                e_t = d(x, timesteps[index].item() * s_in, **extra_args)
                a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
                pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
                x = a_prev ** 0.5 * pred_x0 + (1 - a_prev) ** 0.5 * (d.last_noise_uncond if cfgpp else e_t)
        except sd_samplers_common.InterruptedException:
            return x
        return x
