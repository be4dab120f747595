"""backend/patcher/base.py: ModelPatcher (clones share the module and its LoraLoader)."""

import copy

from backend.patcher.lora import LoraLoader


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader
        self.current_device = offload_device if current_device is None else current_device

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        model_keys = {k for k, _ in self.model.named_parameters()}
        this_patches, p = {}, set()
        for key in patches:
            if key in model_keys:
                p.add(key)
                this_patches.setdefault(key, []).append([strength_patch, patches[key], strength_model, None, None])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this_patches
        return p

    def has_online_lora(self):
        return any(online for (_, _, _, online) in self.lora_patches)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                                                 disable_cfg1_optimization)

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)
