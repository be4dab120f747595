"""LoRA on a Forge Neo source (ComfyUI-style `ModelPatcher`): only what differs from Forge.

Neo's patchers keep LoRA in `patches[key]` and switch clones of one module only through
`load_models_gpu`, which unpatches and moves the whole module when `patches_uuid` changes. So the clones
carrying the LoRA are never loaded: while the adapted branch runs, each patched layer gets the same
per-forward `LowVramPatch` weight function that Neo's own `load()` installs for online LoRA, appended to
what the layer already has, and every layer is put back afterwards. No weights are merged or moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backend import memory_management
from backend.patcher.base import LowVramPatch

_UNSET = object()


@dataclass
class NeoLora:
    """Clones of the source's UNet and CLIP patchers whose `patches` hold the LoRA (online mode)."""

    source: Any
    unet: Any
    clip: Any
    _device: Any = field(default=None, repr=False)

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """Per UNet forward of the adapted branch."""
        self._move_factors()
        with weight_functions(self.unet):
            yield

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """While the adapted prompts are encoded: the base CLIP patcher stays the loaded one."""
        base = self.source.engine.forge_objects.clip.patcher
        memory_management.load_model_gpu(base)  # a load after this would wipe the weight functions
        with weight_functions(self.clip.patcher):
            yield

    def _move_factors(self) -> None:
        """Move the LoRA factors to the UNet's device once (Neo would copy them on every forward)."""
        device = next(self.unet.model.parameters()).device
        if device != self._device:
            for patches in self.unet.patches.values():
                for patch in patches:
                    _move_adapter(patch[1], device)
            self._device = device


def _move_adapter(value: Any, device: Any) -> None:
    weights = getattr(value, "weights", None)
    if isinstance(weights, tuple):  # Neo's WeightAdapter objects
        value.weights = tuple(w.to(device) if hasattr(w, "to") else w for w in weights)


@contextlib.contextmanager
def weight_functions(patcher: Any) -> Iterator[None]:
    """Run `patcher.model`'s layers with `patcher.patches` applied per forward; restore them after."""
    saved: list[tuple[Any, str, Any, Any]] = []
    try:
        for key in patcher.patches:
            path, _, param = key.rpartition(".")
            layer = patcher.model.get_submodule(path)
            attr = f"{param}_function"
            saved.append((layer, attr, layer.__dict__.get(attr, _UNSET),
                          layer.__dict__.get("parameters_manual_cast", _UNSET)))
            setattr(layer, attr, [*getattr(layer, attr, []), LowVramPatch(key, patcher.patches)])
            layer.parameters_manual_cast = True  # Neo's layers apply weight functions on this path
        yield
    finally:
        for layer, attr, functions, cast in reversed(saved):
            _restore(layer, attr, functions)
            _restore(layer, "parameters_manual_cast", cast)


def _restore(layer: Any, attr: str, value: Any) -> None:
    if value is _UNSET:
        layer.__dict__.pop(attr, None)
    else:
        setattr(layer, attr, value)
