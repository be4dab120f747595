"""Neo's KDiffusionSampler: the sampler's sigmas come from the target engine's predictor (eps, v, zero
terminal SNR or rectified flow), inside sampling_prepare / sampling_cleanup."""

import k_diffusion.external
from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from modules import a1111_fake, shared

_a1111 = a1111_fake.load("sd_samplers_kdiffusion")


class CFGDenoiserKDiffusion(_a1111.CFGDenoiserKDiffusion):
    @property
    def inner_model(self):
        if self.model_wrap is None:  # Neo: ForgeScheduleLinker over the engine's predictor
            predictor = shared.sd_model.forge_objects.unet.model.predictor
            self.model_wrap = k_diffusion.external.DiscreteSchedule(predictor.sigmas, quantize=False)
            self.model_wrap.inner_model = shared.sd_model
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
