"""modules_forge/supported_controlnet.py: ControlNetPatcher.try_build_from_state_dict for cldm files
(`control_model.` keys, detected by `control_model.zero_convs.0.0.weight`; None for anything else),
loading with strict=False and printing what is missing, as Forge does."""

from backend.patcher.controlnet import ControlNet
from tinyldm import TinyControlNet


class ControlModelPatcher:
    def __init__(self, model_patcher=None):
        self.model_patcher = model_patcher


class ControlNetPatcher(ControlModelPatcher):
    @staticmethod
    def try_build_from_state_dict(controlnet_data, ckpt_path):
        if "control_model.zero_convs.0.0.weight" not in controlnet_data:
            return None
        prefix = "control_model."
        state_dict = {k[len(prefix):]: controlnet_data.pop(k) for k in list(controlnet_data) if k.startswith(prefix)}
        model = TinyControlNet()
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            print("missing controlnet keys:", missing, "unexpected:", unexpected)
        return ControlNetPatcher(ControlNet(model.eval(), load_device="cpu"))
