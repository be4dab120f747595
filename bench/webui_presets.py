"""DS speed presets in a real WebUI, side by side in one run: time per image against DS off, and how far
each preset's image is from exact DS (same seed), through the WebUI's own API.

    python bench/webui_presets.py --url http://127.0.0.1:7863 --source 'sd15_b.safetensors [e005f8ba36]' \\
        --lora lora_sd15 --steps 8 --size 256 --repeats 3

Generations are interleaved (off, exact, balanced, fast, ... in turn); the first round warms up (it loads
the source) and is not timed. Image distance: RMS pixel difference to exact DS over exact DS's own RMS
difference to DS off.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image
from webui_api import ds_args, txt2img

MODES = {
    "DS off": None,
    "exact, separate passes": {"speed": "custom", "batched": False},
    "exact": {"speed": "exact"},
    "balanced": {"speed": "balanced"},
    "fast": {"speed": "fast"},
}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--lora", help="a LoRA name (default: a prompt adapter)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    adapter = {"adapter_kind": "lora", "adapter": args.lora} if args.lora else \
        {"adapter_kind": "prompt", "adapted_prompt": "a photo of a cat, pixel art"}
    times: dict[str, list[float]] = {name: [] for name in MODES}
    images: dict[str, np.ndarray] = {}
    for round_ in range(args.repeats + 1):
        for name, knobs in MODES.items():
            ds = None if knobs is None else ds_args(source=args.source, strength=1.5, **adapter, **knobs)
            start = time.perf_counter()
            png = txt2img(args.url, ds, args.steps, args.size)
            if round_:
                times[name].append(time.perf_counter() - start)
            images[name] = pixels(png)
        print(f"round {round_ + 1}/{args.repeats + 1} done", flush=True)
    off = statistics.median(times["DS off"])
    effect = np.sqrt(((images["exact"] - images["DS off"]) ** 2).mean())
    print(f"\n{args.url}: {args.steps} Euler steps at {args.size}², {'LoRA ' + args.lora if args.lora else 'prompt adapter'}, "
          f"median of {args.repeats}; DS effect (exact vs off) RMS {effect:.1f} of 255\n")
    print("| mode | s / image | × DS off | distance to exact |\n|---|---|---|---|")
    for name in MODES:
        t = statistics.median(times[name])
        gap = np.sqrt(((images[name] - images["exact"]) ** 2).mean()) / max(effect, 1e-9)
        print(f"| {name} | {t:.2f} | {t / off:.2f} | {'' if name == 'DS off' else f'{100 * gap:.1f} %'} |")


if __name__ == "__main__":
    main()
