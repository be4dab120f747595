"""backend/operations.py (Neo): a layer with `parameters_manual_cast` casts its weights to the input and
applies its `weight_function` / `bias_function` lists (online LoRA) on every forward."""

import torch


def weights_manual_cast(layer, x):
    weight, bias = layer.weight.to(x.device, x.dtype), layer.bias
    for f in layer.weight_function:
        weight = f(weight)
    if bias is not None:
        bias = bias.to(x.device, x.dtype)
        for f in layer.bias_function:
            bias = f(bias)
    return weight, bias


class _ForgeLayer:
    weight_function: list = []
    bias_function: list = []
    parameters_manual_cast = False

    def _weights(self, x):
        return weights_manual_cast(self, x) if self.parameters_manual_cast else (self.weight, self.bias)


class ForgeLinear(_ForgeLayer, torch.nn.Linear):
    def forward(self, x):
        weight, bias = self._weights(x)
        return torch.nn.functional.linear(x, weight, bias)


class ForgeConv2d(_ForgeLayer, torch.nn.Conv2d):
    def forward(self, x):
        weight, bias = self._weights(x)
        return self._conv_forward(x, weight, bias)


def use_forge_operations(module):
    """What `using_forge_operations` gives a model built under it: every Linear/Conv2d is a Forge layer."""
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = ForgeLinear
        elif type(m) is torch.nn.Conv2d:
            m.__class__ = ForgeConv2d
    return module
