"""Forge's KDiffusionSampler: the A1111 fake's sampler loop inside sampling_prepare/cleanup, over
Forge's CFG denoiser (the A1111 fake loaded here picks up the Forge CFGDenoiser overlay)."""

import k_diffusion.external
from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import a1111_fake, shared

_a1111 = a1111_fake.load("sd_samplers_kdiffusion")


class CFGDenoiserKDiffusion(_a1111.CFGDenoiserKDiffusion):
    @property
    def inner_model(self):
        if self.model_wrap is None:  # Forge: ForgeScheduleLinker over the engine's predictor
            self.model_wrap = k_diffusion.external.CompVisDenoiser(shared.sd_model)
        return self.model_wrap


class KDiffusionSampler(_a1111.KDiffusionSampler):
    denoiser_class = CFGDenoiserKDiffusion

    def launch_sampling(self, steps, func):
        unet_patcher = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=None)
        try:
            return super().launch_sampling(steps, func)
        finally:
            sampling_cleanup(unet_patcher)
