"""Classic's patchers: `add_patches(patches, strength_patch=1.0, strength_model=1.0)`, positional, no
filename, no online mode (merged into the weights when loaded)."""

import backend.patcher.base
import backend.patcher.clip
import backend.patcher.unet


def _add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
    """ComfyUI's add_patches appends to each key's list: every call adds, even with equal strengths."""
    return self._forge_add_patches(filename=f"ldm_patched#{len(self.lora_patches)}", patches=patches,
                                   strength_patch=strength_patch, strength_model=strength_model)


def _classic_clone(base):
    def clone(self):
        n = base.clone(self)
        n.__class__ = type(self)
        return n

    return clone


class ModelPatcher(backend.patcher.base.ModelPatcher):
    _forge_add_patches = backend.patcher.base.ModelPatcher.add_patches
    add_patches = _add_patches
    clone = _classic_clone(backend.patcher.base.ModelPatcher)


class UnetPatcher(backend.patcher.unet.UnetPatcher):
    _forge_add_patches = backend.patcher.base.ModelPatcher.add_patches
    add_patches = _add_patches
    clone = _classic_clone(backend.patcher.unet.UnetPatcher)


class CLIP(backend.patcher.clip.CLIP):
    def clone(self):
        n = super().clone()
        n.__class__ = CLIP
        n.patcher.__class__ = ModelPatcher
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)
