"""backend/patcher/base.py (Neo): ComfyUI-style ModelPatcher. LoRA lives in `patches[key]` as 6-tuples;
`load()` merges offline patches into the weights (with a backup) and wires online ones as per-forward
`LowVramPatch` weight functions; a clone shares the module, its backup and its `patches_uuid` until
`add_patches` gives it a new one. Counters on the module (`loads`, `unpatches`) are for the tests."""

import copy
import uuid

import torch
from backend.patcher.lora import merge_lora_to_weight


def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
    model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    if disable_cfg1_optimization:
        model_options["disable_cfg1_optimization"] = True
    return model_options


class LowVramPatch:
    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches, self.convert_func, self.set_func = key, patches, convert_func, set_func

    def __call__(self, weight):
        return merge_lora_to_weight(self.patches[self.key], weight, self.key, computation_dtype=weight.dtype)


def wipe_lowvram_weight(m):
    if hasattr(m, "prev_parameters_manual_cast"):
        m.parameters_manual_cast = m.prev_parameters_manual_cast
        del m.prev_parameters_manual_cast
    m.weight_function = []
    m.bias_function = []


def _parent(model, key):
    path, _, param = key.rpartition(".")
    return model.get_submodule(path), param


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, *, current_device=None,
                 weight_inplace_update=False):
        self.size, self.model = size, model
        self.patches, self.backup = {}, {}
        self.object_patches, self.object_patches_backup, self.weight_wrapper_patches = {}, {}, {}
        self.model_options = {"transformer_options": {}}
        self.load_device, self.offload_device = load_device, offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.model.device = current_device
        for attr, value in (("model_loaded_weight_memory", 0), ("model_lowvram", False),
                            ("current_weight_patches_uuid", None), ("loads", 0), ("unpatches", 0)):
            if not hasattr(model, attr):
                setattr(model, attr, value)

    @property
    def current_device(self):
        return self.model.device

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           current_device=self.current_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        n.parent = self
        return n

    def is_clone(self, other):
        return self.model is getattr(other, "model", None)

    def has_online_lora(self):
        return any(any(p[-1] for p in patches) for patches in self.patches.values())

    def use_online_lora(self, key):
        return any(p[-1] for p in self.patches[key])

    def model_size(self):
        return 1

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options = set_model_options_post_cfg_function(self.model_options, post_cfg_function,
                                                                 disable_cfg1_optimization)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        p, model_sd = set(), self.model.state_dict()
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in model_sd:
                p.add(k)
                self.patches.setdefault(key, []).append(
                    (strength_patch, patches[k], strength_model, offset, function, online_mode))
        self.patches_uuid = uuid.uuid4()
        return list(p)

    @torch.inference_mode()
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return
        parent, param = _parent(self.model, key)
        weight = getattr(parent, param)
        if key not in self.backup:
            self.backup[key] = weight.detach().clone()
        merged = merge_lora_to_weight(self.patches[key], weight.to(torch.float32, copy=True), key)
        setattr(parent, param, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        self.model.loads += 1
        for name, m in self.model.named_modules():
            if not any(True for _ in m.parameters(recurse=False)):
                continue
            wipe_lowvram_weight(m)
            if getattr(m, "forge_patched_weights", False):
                continue
            for param, _ in m.named_parameters(recurse=False):
                key = f"{name}.{param}" if name else param
                if key not in self.patches:
                    continue
                if self.use_online_lora(key):
                    setattr(m, f"{param}_function", [LowVramPatch(key, self.patches)])
                    m.prev_parameters_manual_cast = getattr(m, "parameters_manual_cast", False)
                    m.parameters_manual_cast = True
                else:
                    self.patch_weight_to_device(key, device_to)
            m.forge_patched_weights = True
        self.model.device = device_to
        self.model.model_loaded_weight_memory = 1
        self.model.current_weight_patches_uuid = self.patches_uuid

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights:
            self.load(device_to, lowvram_model_memory, force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if not unpatch_weights:
            return
        self.model.unpatches += 1
        for key, weight in self.backup.items():
            parent, param = _parent(self.model, key)
            setattr(parent, param, torch.nn.Parameter(weight, requires_grad=False))
        self.backup.clear()
        self.model.current_weight_patches_uuid = None
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
        self.model.model_loaded_weight_memory = 0
        for m in self.model.modules():
            m.__dict__.pop("forge_patched_weights", None)

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        current = self.model.current_weight_patches_uuid
        unpatch = current is not None and (current != self.patches_uuid or force_patch_weights)
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        self.load(device_to, full_load=True, force_patch_weights=force_patch_weights)
        return 0

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        return self.model
