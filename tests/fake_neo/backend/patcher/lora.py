"""backend/patcher/lora.py (Neo): ComfyUI's loader, whose patches are WeightAdapter objects (`.name`,
`.weights`), and merge_lora_to_weight over 6-tuples (strength, value, strength_model, offset, function,
online flag)."""

import torch
from backend import forge_fake

_forge = forge_fake.load("patcher/lora.py")  # the key maps are Forge's
model_lora_keys_unet, model_lora_keys_clip = _forge.model_lora_keys_unet, _forge.model_lora_keys_clip


class LoRAAdapter:
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights  # (up, down, alpha, mid, dora_scale, reshape)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha = self.weights[:3]
        up, down = up.to(weight.device, intermediate_dtype), down.to(weight.device, intermediate_dtype)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
        return weight + (strength * scale) * diff.to(weight.dtype)


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for prefix, key in to_load.items():
        up, down, alpha_key = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight", f"{prefix}.alpha"
        if up in lora:
            alpha = lora[alpha_key].item() if alpha_key in lora else None
            keys = {up, down, alpha_key}
            patch_dict[key] = LoRAAdapter(keys, (lora[up], lora[down], alpha, None, None, None))
            loaded |= keys
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for p in patches:
        strength, value, strength_model = p[0], p[1], p[2]
        if strength_model != 1.0:
            weight *= strength_model
        weight = value.calculate_weight(weight, key, strength, strength_model, p[3], p[4], computation_dtype)
    return weight.to(dtype)
