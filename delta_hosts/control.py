"""A ControlNet on the adapted source: its files, the control image and its map. The ControlNet itself is
the host's own (forge_models.ForgeControl); this module only finds, decodes and preprocesses."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import numpy as np
import torch

from lib_delta import DeltaError
from lib_delta.spec import DeltaSettings

EXTENSIONS = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
CANNY_THRESHOLDS = (100, 200)  # the WebUIs' canny defaults (Forge's and sd-webui-controlnet's)


def folders() -> list[str]:
    """Where the WebUIs keep ControlNet models: --controlnet-dir, then models/ControlNet."""
    from modules import paths, shared

    found = [getattr(shared.cmd_opts, "controlnet_dir", None), os.path.join(paths.models_path, "ControlNet")]
    return [f for f in dict.fromkeys(found) if f and os.path.isdir(f)]


def controlnets() -> list[str]:
    names = set()
    for folder in folders():
        for _root, _, filenames in os.walk(folder):
            names |= {os.path.splitext(n)[0] for n in filenames if n.lower().endswith(EXTENSIONS)}
    return sorted(names)


def find_controlnet(name: str) -> str:
    """The file of a ControlNet named by its file name, with or without extension."""
    stem = os.path.splitext(name)[0] if name.lower().endswith(EXTENSIONS) else name
    for folder in folders():
        for root, _, filenames in os.walk(folder):
            for filename in sorted(filenames):
                if filename.lower().endswith(EXTENSIONS) and os.path.splitext(filename)[0] == stem:
                    return os.path.join(root, filename)
    raise DeltaError(f"Delta Sampling: ControlNet '{name}' was not found in {' or '.join(folders()) or 'models/ControlNet'}.")


def decode_image(value: Any) -> np.ndarray | None:
    """An image as HWC uint8 RGB from what the UI or API sends: a numpy array, a PIL image, a base64
    string (with or without a data: prefix), or gradio's {"image": ...} / {"background": ...} dicts."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dict):
        return decode_image(value.get("image", value.get("background", value.get("composite"))))
    if isinstance(value, str):
        from PIL import Image

        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            value = Image.open(io.BytesIO(base64.b64decode(data)))
        except Exception as e:
            raise DeltaError("Delta Sampling: DS ControlNet image is not a readable image (base64 PNG/JPEG expected).") from e
    if hasattr(value, "convert"):  # PIL
        value = np.asarray(value.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise DeltaError(f"Delta Sampling: DS ControlNet image has shape {array.shape}; an RGB image is expected.")
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
