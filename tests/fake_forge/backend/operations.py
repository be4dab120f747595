"""backend/operations.py: Forge layers read their weights through get_weight_and_bias, which merges
online LoRA patches (`layer.forge_online_loras`) on the fly."""

import torch

from backend.patcher.lora import merge_lora_to_weight


def get_weight_and_bias(layer):
    patches = getattr(layer, "forge_online_loras", None) or {}
    weight, bias = layer.weight, layer.bias
    if "weight" in patches:
        weight = merge_lora_to_weight(patches["weight"], weight, "online weight lora", weight.dtype)
    if bias is not None and "bias" in patches:
        bias = merge_lora_to_weight(patches["bias"], bias, "online bias lora", bias.dtype)
    return weight, bias


class ForgeLinear(torch.nn.Linear):
    def forward(self, x):
        weight, bias = get_weight_and_bias(self)
        return torch.nn.functional.linear(x, weight, bias)


class ForgeConv2d(torch.nn.Conv2d):
    def forward(self, x):
        weight, bias = get_weight_and_bias(self)
        return self._conv_forward(x, weight, bias)


class ForgeEmbedding(torch.nn.Embedding):
    pass


def use_forge_operations(module):
    """What `using_forge_operations` gives a model built under it: every Linear/Conv2d is a Forge layer."""
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = ForgeLinear
        elif type(m) is torch.nn.Conv2d:
            m.__class__ = ForgeConv2d
    return module
