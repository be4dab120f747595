"""Forge's CFGDenoiser.forward: unbatched on_cfg_denoiser, NGMS, sampling_function (with post-CFG
functions), inpaint blend, on_cfg_after_cfg. on_cfg_denoised never fires."""

import torch
from backend.sampling.sampling_function import sampling_function
from modules import a1111_fake, prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoiser_callback,
)

_a1111 = a1111_fake.load("sd_samplers_cfg_denoiser")


class CFGDenoiser(_a1111.CFGDenoiser):
    def skips_uncond(self, sigma, s_min_uncond):
        """Forge's skip-early-CFG and NGMS rules (the scale drops to 1 when they fire)."""
        opts = shared.opts
        if opts.skip_early_cond > 0 and self.step / self.total_steps <= opts.skip_early_cond:
            return True
        return bool((self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond)

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond, **kwargs):
        state = shared.state
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        cond_composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask is not None:
            noisy_initial_latent = self.init_latent + sigma[:, None, None, None] * torch.randn_like(self.init_latent)
            x = x * self.nmask + noisy_initial_latent * self.mask
        denoiser_params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond,
                                            uncond, self)
        cfg_denoiser_callback(denoiser_params)
        if self.p.is_hr_pass and getattr(self.p, "hr_cfg", None):
            cond_scale = self.p.hr_cfg
        if self.skips_uncond(sigma, s_min_uncond):
            cond_scale = 1.0
        extra = {"extra_model_options": kwargs["model_options"]} if "model_options" in kwargs else {}
        denoised, cond_pred, uncond_pred = sampling_function(self, denoiser_params=denoiser_params,
                                                             cond_scale=cond_scale, cond_composition=cond_composition,
                                                             **extra)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = denoised
        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        self.step += 1
        return after.x
