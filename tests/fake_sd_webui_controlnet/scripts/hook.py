"""scripts/hook.py: ControlParams and UnetHook with the real signatures and side effects."""

from modules import script_callbacks

POSITIVE_MARK_TOKEN = 1024
NEGATIVE_MARK_TOKEN = -POSITIVE_MARK_TOKEN
MARK_EPS = 1e-3


def unmark_prompt_context(x):
    """A context whose first token is a +-1024 marker row: (cond_mark 1 for cond rows, the context without
    it); an unmarked one: every row a cond row."""
    if float((x[..., 0, :].abs() - POSITIVE_MARK_TOKEN).abs().mean()) >= MARK_EPS:
        return x.new_ones(x.shape[0], 1, 1, 1), [], [], x
    mark = (x[:, 0, :].mean(-1) > 0).to(x)[:, None, None, None]
    return mark, [], [], x[:, 1:, :]


class ControlParams:
    def __init__(self, control_model, preprocessor, hint_cond, weight, guidance_stopped, start_guidance_percent,
                 stop_guidance_percent, advanced_weighting, control_model_type, hr_hint_cond, global_average_pooling,
                 soft_injection, cfg_injection, hr_option=None, control_context_override=None,
                 effective_region_mask=None, union_control_types=None, **kwargs):
        self.control_model = control_model
        self.preprocessor = preprocessor
        self.hint_cond = hint_cond
        self.weight = weight
        self.guidance_stopped = guidance_stopped
        self.start_guidance_percent = start_guidance_percent
        self.stop_guidance_percent = stop_guidance_percent
        self.advanced_weighting = advanced_weighting
        self.control_model_type = control_model_type
        self.hr_hint_cond = hr_hint_cond
        self.global_average_pooling = global_average_pooling
        self.soft_injection = soft_injection
        self.cfg_injection = cfg_injection


class UnetHook:
    def __init__(self, lowvram=False):
        self.lowvram = lowvram
        self.model = None
        self.control_params = None

    def guidance_schedule_handler(self, x):
        for param in self.control_params or []:
            percent = x.sampling_step / x.total_sampling_steps
            param.guidance_stopped = percent < param.start_guidance_percent or percent > param.stop_guidance_percent
            if self.model is not None:
                self.model.current_sampling_percent = percent

    def hook(self, model, sd_ldm, control_params, process, batch_option_uint_separate=False,
             batch_option_style_align=False):
        self.model, self.sd_ldm, self.control_params = model, sd_ldm, control_params
        outer = self

        def process_sample(*args, **kwargs):
            return process.sample_before_CN_hack(*args, **kwargs)

        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            cond_mark, _, _, context = unmark_prompt_context(context)
            outer.model.cond_mark = cond_mark
            output, middle = 0.0, 0.0
            for param in outer.control_params:
                if param.guidance_stopped:
                    continue
                hint = param.hint_cond
                if param.hr_hint_cond is not None and abs(x.shape[2] * 8 - param.hr_hint_cond.shape[2]) < abs(
                        x.shape[2] * 8 - hint.shape[2]):
                    hint = param.hr_hint_cond
                if tuple(hint.shape[2:]) != (x.shape[2] * 8, x.shape[3] * 8):
                    raise RuntimeError(f"The size of tensor a ({hint.shape[2] // 8}) must match the size of tensor b "
                                       f"({x.shape[2]}) at non-singleton dimension 2")
                hint = hint.to(x).expand(x.shape[0], *hint.shape[1:])
                zero, mid = param.control_model(x=x, hint=hint, timesteps=timesteps, context=context, y=y)
                output, middle = output + zero * param.weight, middle + mid * param.weight
            control = None if isinstance(output, float) else {"output": [output], "middle": [middle]}
            return self._original_forward(x, timesteps, context, control=control)

        if getattr(process, "sample_before_CN_hack", None) is None:
            process.sample_before_CN_hack = process.sample
        process.sample = process_sample
        model._original_forward = model.forward
        self.original_forward = model.forward
        model.forward = forward.__get__(model, type(model))
        script_callbacks.on_cfg_denoiser(self.guidance_schedule_handler)

    def restore(self):
        script_callbacks.remove_callbacks_for_function(self.guidance_schedule_handler)
        self.control_params = None
        if self.model is not None and hasattr(self.model, "_original_forward"):
            self.model.forward = self.model._original_forward
            del self.model._original_forward
