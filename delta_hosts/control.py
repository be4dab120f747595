"""A ControlNet and an IP-Adapter on the adapted source: their files, the images, the control map and what
a unit asks of its host (`ControlRequest`). The models run in the host's own code (forge_control,
a1111_control); this module only finds, reads, checks and preprocesses."""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lib_delta import DeltaError
from lib_delta.spec import DeltaSettings

from . import files

EXTENSIONS = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
IPADAPTER_MARKERS = ("ip-adapter", "ip_adapter", "ipadapter")
CANNY_THRESHOLDS = (100, 200)  # the WebUIs' canny defaults (Forge's and sd-webui-controlnet's)


def folders() -> list[str]:
    """Where the WebUIs keep ControlNet models: --controlnet-dir, then models/ControlNet."""
    from modules import paths, shared

    found = [getattr(shared.cmd_opts, "controlnet_dir", None), os.path.join(paths.models_path, "ControlNet")]
    return [f for f in dict.fromkeys(found) if f and os.path.isdir(f)]


def control_models() -> list[str]:
    names = set()
    for folder in folders():
        for _root, _, filenames in os.walk(folder):
            names |= {os.path.splitext(n)[0] for n in filenames if n.lower().endswith(EXTENSIONS)}
    return sorted(names)


def is_ipadapter_name(name: str) -> bool:
    """The WebUIs tell IP-Adapters from ControlNets in their shared folder by name, as this does."""
    return any(marker in name.lower() for marker in IPADAPTER_MARKERS)


def controlnets() -> list[str]:
    return [n for n in control_models() if not is_ipadapter_name(n)]


def ipadapters() -> list[str]:
    return [n for n in control_models() if is_ipadapter_name(n)]


@dataclass(frozen=True)
class ControlRequest:
    """What one unit's adapted branch carries from the host's control models."""

    controlnet: str = ""  # the ControlNet file, or none
    hint: torch.Tensor | None = None  # its map, (1, 3, H, W) in [0, 1]
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    native: bool = False  # the source runs at its native size
    ipadapter: str = ""  # the IP-Adapter file, or none
    reference: np.ndarray | None = None  # its image, HWC uint8 RGB
    ip_weight: float = 1.0


def request(p: Any, s: DeltaSettings) -> ControlRequest | None:
    """The unit's request, or None when it has neither (a weight of 0 adds nothing: that model is skipped)."""
    cn = bool(s.control_model) and s.control_weight != 0.0
    ip = bool(s.ipadapter_model) and s.ipadapter_weight != 0.0
    if not (cn or ip):
        return None
    return ControlRequest(
        find_controlnet(s.control_model) if cn else "", hint(p, s) if cn else None, s.control_weight,
        s.control_start, s.control_end, bool(s.knob("native_size")),
        find_controlnet(s.ipadapter_model, "IP-Adapter") if ip else "", reference(p, s) if ip else None,
        s.ipadapter_weight)


def find_controlnet(name: str, role: str = "ControlNet") -> str:
    """The file of a ControlNet (or IP-Adapter) named by its file name, with or without extension."""
    stem = os.path.splitext(name)[0] if name.lower().endswith(EXTENSIONS) else name
    for folder in folders():
        for root, _, filenames in os.walk(folder):
            for filename in sorted(filenames):
                if filename.lower().endswith(EXTENSIONS) and os.path.splitext(filename)[0] == stem:
                    return os.path.join(root, filename)
    raise DeltaError(f"Delta Sampling: {role} '{name}' was not found in {' or '.join(folders()) or 'models/ControlNet'}.")


def decode_image(value: Any, role: str = "DS ControlNet image") -> np.ndarray | None:
    """An image as HWC uint8 RGB from what the UI or API sends: a numpy array, a PIL image, a base64
    string (with or without a data: prefix), or gradio's {"image": ...} / {"background": ...} dicts."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dict):
        return decode_image(value.get("image", value.get("background", value.get("composite"))), role)
    if isinstance(value, str):
        from PIL import Image

        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = Image.open(io.BytesIO(base64.b64decode(data)))
        except Exception as e:
            raise DeltaError(f"Delta Sampling: {role} is not a readable image (base64 PNG/JPEG expected).") from e
    if hasattr(value, "convert"):  # PIL
        value = np.asarray(value.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DeltaError(f"Delta Sampling: {role} has shape {array.shape}; an RGB image is expected.")
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def control_map(image: np.ndarray, preprocessor: str) -> np.ndarray:
    """The map the ControlNet sees: canny edges as RGB (cv2.Canny, the WebUIs' thresholds), or the image."""
    if preprocessor == "none":
        return image
    try:
        import cv2
    except ImportError as e:
        raise DeltaError("Delta Sampling: the canny preprocessor needs OpenCV (opencv-python), which this WebUI "
                         "lacks; set DS ControlNet preprocessor to none and give an edge map.") from e
    edges = cv2.Canny(image, *CANNY_THRESHOLDS)
    return np.stack([edges] * 3, -1)


def hint(p: Any, settings: DeltaSettings) -> torch.Tensor:
    """The control map as a (1, 3, H, W) float tensor in [0, 1], from the panel's image or, when it is
    empty, the img2img input."""
    image = decode_image(settings.control_image)
    if image is None and getattr(p, "init_images", None):
        image = decode_image(p.init_images[0])
    if image is None:
        raise DeltaError("Delta Sampling: DS ControlNet needs a control image: add one in the unit's ControlNet "
                         "image (or use img2img, whose input is used when it is empty).")
    mapped = control_map(image, settings.control_preprocessor)
    return torch.from_numpy(mapped).float().div(255.0).permute(2, 0, 1)[None].contiguous()


def reference(p: Any, settings: DeltaSettings) -> np.ndarray:
    """The IP-Adapter's reference image (HWC uint8): the panel's, or, when it is empty, the img2img input."""
    image = decode_image(settings.ipadapter_image, "DS IP-Adapter image")
    if image is None and getattr(p, "init_images", None):
        image = decode_image(p.init_images[0], "DS IP-Adapter image")
    if image is None:
        raise DeltaError("Delta Sampling: DS IP-Adapter needs a reference image: add one in the unit's IP-Adapter "
                         "image (or use img2img, whose input is used when it is empty).")
    return image


CONTEXT_DIMS = {768: "SD1.5", 1024: "SD2", 2048: "SDXL"}  # what an IP-Adapter's to_k_ip layers take


@dataclass(frozen=True)
class IPAdapterFile:
    parts: dict[str, dict[str, torch.Tensor]]  # {"image_proj": ..., "ip_adapter": ...}
    encoder: str  # the CLIP image encoder it takes: "H" or "bigG"


def read_ipadapter(filename: str, unet: torch.nn.Module, source: str) -> IPAdapterFile:
    """An IP-Adapter file read by DS (safetensors, or a weights-only pickle) and checked against the source's
    UNet; the hosts build their modules from its tables."""
    name = os.path.basename(filename)
    parts = ipadapter_parts(files.read_weights(filename, "IP-Adapter"), name)
    check_ipadapter(parts, unet, name, source)
    return IPAdapterFile(parts, image_encoder(parts, name))


def ipadapter_parts(weights: dict[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter file's two tables, as the hosts take them: {"image_proj": ..., "ip_adapter": ...}
    (a .safetensors file holds them flat under those prefixes; a .bin file nested, read flat here)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in weights.items():
        part, _, rest = key.partition(".")
        if part in parts and rest:
            parts[part][rest] = tensor
    if "1.to_k_ip.weight" not in parts["ip_adapter"] or not parts["image_proj"]:
        raise DeltaError(f"Delta Sampling: '{name}' is not an IP-Adapter (it has no image_proj and ip_adapter "
                         "weights).")
    proj = parts["image_proj"]
    if "0.to_q_lora.down.weight" in parts["ip_adapter"] or ("proj.2.weight" in proj and "proj.3.weight" not in proj):
        raise DeltaError(f"Delta Sampling: '{name}' is a FaceID IP-Adapter, which needs InsightFace; DS runs plain "
                         "and plus IP-Adapters on the source.")
    return parts


def image_encoder(parts: dict[str, dict[str, torch.Tensor]], name: str) -> str:
    """The CLIP image encoder an IP-Adapter was trained with: "H" (ViT-H/14) or "bigG", from its input width."""
    proj = parts["image_proj"]
    if "latents" in proj:  # plus: a resampler over the encoder's penultimate hidden states
        width, widths = proj["proj_in.weight"].shape[1], {1280: "H", 1664: "bigG"}
    elif "proj.3.weight" in proj:  # full: an MLP over the hidden states
        width, widths = proj["proj.0.weight"].shape[1], {1280: "H", 1664: "bigG"}
    else:  # plain: a projection of the image embedding
        width, widths = proj["proj.weight"].shape[1], {1024: "H", 1280: "bigG"}
    if width not in widths:
        raise DeltaError(f"Delta Sampling: '{name}' takes image features of width {width}, which no CLIP image "
                         "encoder of the WebUI gives.")
    return widths[width]


def check_ipadapter(parts: dict[str, dict[str, torch.Tensor]], unet: torch.nn.Module, name: str,
                    source: str) -> None:
    """Refuse an IP-Adapter made for another architecture than the source (its prompt width differs)."""
    made_for = int(parts["ip_adapter"]["1.to_k_ip.weight"].shape[1])
    width = next((int(m.in_features) for n, m in unet.named_modules() if n.endswith("attn2.to_k")), made_for)
    if made_for != width:
        raise DeltaError(f"Delta Sampling: the IP-Adapter '{name}' is made for {CONTEXT_DIMS.get(made_for, 'another model')} "
                         f"(prompt width {made_for}), but the source '{source}' takes width {width}: choose an "
                         "IP-Adapter made for the source.")
