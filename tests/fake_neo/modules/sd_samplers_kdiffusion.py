"""Neo's KDiffusionSampler: Forge's, with the sampler's sigmas from the target engine's predictor (eps, v,
zero terminal SNR or rectified flow)."""

import k_diffusion.external
from modules import a1111_fake, shared

_forge = a1111_fake.load("sd_samplers_kdiffusion", a1111_fake.FORGE_FAKES)


class CFGDenoiserKDiffusion(_forge.CFGDenoiserKDiffusion):
    @property
    def inner_model(self):
        if self.model_wrap is None:  # Neo: ForgeScheduleLinker over the engine's predictor
            predictor = shared.sd_model.forge_objects.unet.model.predictor
            self.model_wrap = k_diffusion.external.DiscreteSchedule(predictor.sigmas, quantize=False)
            self.model_wrap.inner_model = shared.sd_model
        return self.model_wrap


class KDiffusionSampler(_forge.KDiffusionSampler):
    denoiser_class = CFGDenoiserKDiffusion
