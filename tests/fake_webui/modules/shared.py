"""A1111's shared: opts, cmd_opts, state and the active model."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.onchange, self.section = default, label, onchange, section


class Options:
    def __init__(self, data):
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)


DEFAULT_OPTS = {
    "skip_early_cond": 0.0, "s_min_uncond_all": False, "use_old_scheduling": False, "enable_quantization": False,
    "batch_cond_uncond": True, "CLIP_stop_at_last_layers": 1, "pad_cond_uncond": False, "pad_cond_uncond_v0": False, "live_preview_content": "Prompt",
}
opts = Options(DEFAULT_OPTS)
cmd_opts = SimpleNamespace(no_half=True, lora_dir="", lowvram=False, medvram=False, medvram_sdxl=False)
state = SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
sd_model = None
