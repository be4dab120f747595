"""backend/patcher/unet.py (Neo): UnetPatcher keeps Forge's extra-patcher API over Neo's ModelPatcher."""

from backend import forge_fake
from backend.patcher.base import ModelPatcher

_forge = forge_fake.load("patcher/unet.py")


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_extra_model_patcher_during_sampling(self, model_patcher):
        self.extra_model_patchers_during_sampling.append(model_patcher)

    # Neo keeps Forge's ControlNet linked list unchanged
    add_patched_controlnet = _forge.UnetPatcher.add_patched_controlnet
    list_controlnets = _forge.UnetPatcher.list_controlnets
