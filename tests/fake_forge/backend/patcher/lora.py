"""backend/patcher/lora.py: key maps, load_lora, merge_lora_to_weight and the per-module LoraLoader."""

import torch

from backend import memory_management


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - the real signature has this default
    for name, _ in model.named_parameters():
        if name.startswith("diffusion_model.") and name.endswith(".weight"):
            key_map["lora_unet_" + name[len("diffusion_model."):-len(".weight")].replace(".", "_")] = name
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006
    for name, _ in model.named_parameters():
        if name.startswith("clip_l.transformer.") and name.endswith(".weight"):
            key_map["lora_te_" + name[len("clip_l.transformer."):-len(".weight")].replace(".", "_")] = name
    return key_map


def load_lora(lora, to_load):
    patch_dict, loaded = {}, set()
    for prefix, key in to_load.items():
        up, down = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"
        if up in lora:
            alpha_key = f"{prefix}.alpha"
            alpha = lora[alpha_key].item() if alpha_key in lora else None
            patch_dict[key] = ("lora", (lora[up], lora[down], alpha, None, None))
            loaded |= {up, down, alpha_key}
    return patch_dict, {k: v for k, v in lora.items() if k not in loaded}


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for strength, value, strength_model, _offset, _function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        kind, (up, down, alpha, _mid, _dora) = value
        assert kind == "lora"
        up, down = up.to(weight), down.to(weight)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        weight += (strength * scale) * torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
    return weight.to(dtype)


class LoraLoader:
    """Shared by every clone of one module: refresh() restores the backup, then merges (offline) or
    attaches (online) the given patches."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        memory_management.signal_empty_cache = True  # Forge: the sampler empties the CUDA cache next
        for m in set(self.online_backup):
            del m.forge_online_loras
        self.online_backup = []
        for k, w in self.backup.items():
            _set(self.model, k, torch.nn.Parameter(w, requires_grad=False))
        self.backup = {}
        merged = {}
        for (_, _, _, online), patches in lora_patches.items():
            for key, current in patches.items():
                merged[(key, online)] = merged.get((key, online), []) + current
        for (key, online), current in merged.items():
            parent, child = _parent(self.model, key)
            weight = getattr(parent, child)
            if online:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = current
                self.online_backup.append(parent)
                continue
            self.backup.setdefault(key, weight.detach().clone())
            _set(self.model, key, torch.nn.Parameter(merge_lora_to_weight(current, weight, key), requires_grad=False))
        self.loaded_hash = hashes


def _parent(model, key):
    *path, child = key.split(".")
    parent = model
    for name in path:
        parent = getattr(parent, name)
    return parent, child


def _set(model, key, value):
    parent, child = _parent(model, key)
    setattr(parent, child, value)
