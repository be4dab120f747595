"""Neo's CFGDenoiser.forward: Forge's, with Neo's skip rules (skip-early CFG never on the first call,
NGMS only above sigma 0); the sampler's model_options reach sampling_function as extra_model_options."""

from modules import a1111_fake, shared

_forge = a1111_fake.load("sd_samplers_cfg_denoiser", a1111_fake.FORGE_FAKES)


class CFGDenoiser(_forge.CFGDenoiser):
    def skips_uncond(self, sigma, s_min_uncond):
        opts = shared.opts
        if 0 < self.step / self.total_steps <= opts.skip_early_cond:
            return True
        return bool((self.step % 2 or opts.s_min_uncond_all) and 0 < sigma[0] < s_min_uncond)
