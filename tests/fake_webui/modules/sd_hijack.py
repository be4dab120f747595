"""modules/sd_hijack.py: the global model_hijack wraps a model's text encoders (emphasis, long prompts,
TI) and records them as the active model's (`clip`, `layers`), which DS must not leave changed."""

from modules import sd_unet


class StableDiffusionModelHijack:
    clip = None
    layers = None

    def hijack(self, m):
        m.cond_stage_model.hijacked = True
        self.clip = m.cond_stage_model
        self.layers = list(m.modules())
        sd_unet.original_forward = "set by hijack"


model_hijack = StableDiffusionModelHijack()
