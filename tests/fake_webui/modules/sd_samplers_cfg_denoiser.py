"""A1111's CFGDenoiser.forward, in the real order of batching, callbacks, uncond skipping and CFG."""

import torch
from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoisedParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoised_callback,
    cfg_denoiser_callback,
)


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = self.nmask = self.init_latent = None
        self.steps = self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.mask_before_denoising = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None

    @property
    def inner_model(self):
        raise NotImplementedError

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        state = shared.state
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)

        def apply_blend(current_latent):
            return current_latent * self.nmask + self.init_latent * self.mask

        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond])

        denoiser_params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(denoiser_params)
        x_in, image_cond_in, sigma_in = denoiser_params.x, denoiser_params.image_cond, denoiser_params.sigma
        tensor, uncond = denoiser_params.text_cond, denoiser_params.text_uncond
        skip_uncond = False
        opts = shared.opts
        if opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
        cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in], "c_concat": [image_cond_in]})
        denoised_image_indexes = [x[0][0] for x in conds_list]
        if skip_uncond:
            fake_uncond = torch.cat([x_out[i:i + 1] for i in denoised_image_indexes])
            x_out = torch.cat([x_out, fake_uncond])
        cfg_denoised_callback(CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0]:])
        if skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale * self.cond_scale_miltiplier)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)
        self.sampler.last_latent = denoised
        after_cfg_callback_params = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after_cfg_callback_params)
        denoised = after_cfg_callback_params.x
        self.step += 1
        return denoised
