"""backend/patcher/controlnet.py: ControlBase / ControlNet (a linked list on a UnetPatcher) and
apply_controlnet_advanced, with Forge's signatures and call order: set_cond_hint, pre_run (start/end as
the predictor's sigmas), get_control (skips outside the range, resizes the hint to the latent x 8, runs
the control model on the predictor's scaled input and timestep), cleanup."""

import torch

from backend.patcher.base import ModelPatcher


class ControlBase:
    def __init__(self, device=None):
        self.cond_hint_original = None
        self.cond_hint = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.timestep_range = None
        self.transformer_options = {}
        self.previous_controlnet = None
        self.global_average_pooling = False

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0)):
        self.cond_hint_original = cond_hint
        self.strength = strength
        self.timestep_percent_range = timestep_percent_range
        return self

    def pre_run(self, model, percent_to_timestep_function):
        self.timestep_range = (percent_to_timestep_function(self.timestep_percent_range[0]),
                               percent_to_timestep_function(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def set_previous_controlnet(self, controlnet):
        self.previous_controlnet = controlnet
        return self

    def cleanup(self):
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint = None
        self.timestep_range = None

    def get_models(self):
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def copy_to(self, c):
        c.cond_hint_original = self.cond_hint_original
        c.strength = self.strength
        c.timestep_percent_range = self.timestep_percent_range
        c.global_average_pooling = self.global_average_pooling

    def inference_memory_requirements(self, dtype):
        return self.previous_controlnet.inference_memory_requirements(dtype) if self.previous_controlnet else 0

    def control_merge(self, control_input, control_output, control_prev, output_dtype):
        out = {"input": [], "middle": [], "output": []}
        for i, x in enumerate(control_output):
            key = "middle" if i == len(control_output) - 1 else "output"
            out[key].append(x * self.strength)
        if control_prev is not None:
            for key in out:
                for i, prev in enumerate(control_prev[key]):
                    out[key][i] = out[key][i] + prev
        return out


class ControlNet(ControlBase):
    def __init__(self, control_model, global_average_pooling=False, device=None, load_device=None,
                 manual_cast_dtype=None):
        super().__init__(device)
        self.control_model = control_model
        self.load_device = load_device
        self.control_model_wrapped = ModelPatcher(control_model, load_device=load_device, offload_device="cpu")
        self.global_average_pooling = global_average_pooling
        self.model_sampling_current = None
        self.manual_cast_dtype = manual_cast_dtype

    def get_control(self, x_noisy, t, cond, batched_number):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return control_prev
        size = (x_noisy.shape[2] * 8, x_noisy.shape[3] * 8)
        if self.cond_hint is None or tuple(self.cond_hint.shape[2:]) != size:
            self.cond_hint = torch.nn.functional.interpolate(self.cond_hint_original, size=size, mode="nearest-exact")
        hint = self.cond_hint.expand(x_noisy.shape[0], *self.cond_hint.shape[1:])
        timestep = self.model_sampling_current.timestep(t)
        x = self.model_sampling_current.calculate_input(t.reshape(-1, 1, 1, 1), x_noisy)
        control = self.control_model(x=x, hint=hint, timesteps=timestep.float(), context=cond["c_crossattn"],
                                     y=cond.get("y"))
        return self.control_merge(None, control, control_prev, x_noisy.dtype)

    def copy(self):
        c = ControlNet(self.control_model, global_average_pooling=self.global_average_pooling,
                       load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c

    def get_models(self):
        return [*super().get_models(), self.control_model_wrapped]

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.predictor

    def cleanup(self):
        self.model_sampling_current = None
        super().cleanup()


def apply_controlnet_advanced(unet, controlnet, image_bchw, strength, start_percent, end_percent,
                              positive_advanced_weighting=None, negative_advanced_weighting=None,
                              advanced_frame_weighting=None, advanced_sigma_weighting=None,
                              advanced_mask_weighting=None):
    cnet = controlnet.copy().set_cond_hint(image_bchw, strength, (start_percent, end_percent))
    m = unet.clone()
    m.add_patched_controlnet(cnet)
    return m
