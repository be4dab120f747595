"""scripts/controlnet_model_guess.py: build_model_by_guess for cldm files (`control_model.` stripped) and
IP-Adapters (flat safetensors keys regrouped into image_proj / ip_adapter)."""

from typing import NamedTuple

from scripts.enums import ControlModelType
from scripts.ipadapter.ipadapter_model import IPAdapterModel
from scripts.ipadapter.plugable_ipadapter import PlugableIPAdapter
from tinyldm import TinyControlNet


class ControlModel(NamedTuple):
    model: object
    type: ControlModelType


def build_model_by_guess(state_dict, unet, model_path: str) -> ControlModel:
    if any("image_proj." in x for x in state_dict) and any("ip_adapter." in x for x in state_dict):
        state_dict = {part: {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + ".")}
                      for part in ("image_proj", "ip_adapter")}
    if "ip_adapter" in state_dict:
        return ControlModel(PlugableIPAdapter(IPAdapterModel.load(state_dict, model_path)), ControlModelType.IPAdapter)
    state_dict = {k.replace("control_model.", "", 1): v for k, v in state_dict.items()}
    if "input_hint_block.0.weight" not in state_dict:
        raise Exception(f"[ControlNet] Unable to determine the model type of {model_path}")
    network = TinyControlNet()
    network.load_state_dict(state_dict, strict=False)  # shape mismatches still raise, as in the real one
    return ControlModel(network.eval(), ControlModelType.ControlNet)
