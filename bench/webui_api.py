"""The few WebUI API calls the WebUI benchmarks need (A1111 and the Forge family share them)."""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_delta.spec import DeltaSettings  # noqa: E402


def call(url: str, path: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read() or b"{}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def ds_args(**settings: Any) -> list[Any]:
    """The script's API args (the settings spec's order) for DS on with these settings."""
    return DeltaSettings(enabled=True).replace(**settings).to_args()


def txt2img(url: str, ds: list[Any] | None, steps: int, size: int, seed: int = 1,
            prompt: str = "a photo of a cat") -> bytes:
    """One image's PNG bytes; `ds`: the script's args, or None for DS off."""
    payload: dict[str, Any] = {"prompt": prompt, "steps": steps, "width": size, "height": size,
                               "sampler_name": "Euler", "seed": seed, "cfg_scale": 6}
    if ds is not None:
        payload["alwayson_scripts"] = {"delta sampling": {"args": ds}}
    return base64.b64decode(call(url, "/sdapi/v1/txt2img", payload)["images"][0])
