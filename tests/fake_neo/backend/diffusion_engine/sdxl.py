"""An 'SDXL' engine for the fakes: the tiny model under SDXL's latent class, with an eps, v-prediction or
rectified-flow predictor; zero terminal SNR rescales its schedule (Neo does this for the target while
it samples)."""

from backend.diffusion_engine.sd15 import StableDiffusion
from backend.modules.k_prediction import flow_sigmas, vp_sigmas, zero_terminal_snr


class SDXL:  # huggingface_guess.latent.SDXL
    latent_channels, scale_factor = 4, 0.13025


class StableDiffusionXL(StableDiffusion):
    latent = SDXL

    def __init__(self, state_dict, prediction_type="epsilon", ztsnr=False):
        super().__init__(state_dict, prediction_type, ztsnr)
        self.is_sd1, self.is_sdxl = False, True
        predictor = self.forge_objects.unet.model.predictor
        if prediction_type == "const":
            predictor.set_sigmas(flow_sigmas())
        elif ztsnr:
            predictor.set_sigmas(vp_sigmas(zero_terminal_snr(self.alphas_cumprod)))
