"""Side-by-side benchmark: DS on vs off (time per image) and LoRA hooks vs a second model copy (memory).

Run: python tests/bench_delta.py [--dim 256] [--steps 10] [--size 16] [--repeats 3]
Everything is measured in this one run and printed as ratios. Targets: a same-size pair costs about 3x
the target alone (two extra CFG'd source passes per step, the paper's cost model), and the LoRA-adapted
branch adds a small fraction of the base's weight memory where a second copy would add 100%.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import tinyldm  # noqa: E402
from k_diffusion import external, sampling  # noqa: E402

from lib_delta import latent  # noqa: E402
from lib_delta.delta import DeltaRun, StepInput  # noqa: E402
from lib_delta.lora import LoraAdapter  # noqa: E402
from lib_delta.schedules import progress_from_calls  # noqa: E402
from lib_delta.source import Branch, CfgSourcePair  # noqa: E402
from lib_delta.spec import DeltaSettings  # noqa: E402

CFG = 5.0


def lora_for(model: torch.nn.Module, rank: int = 8) -> dict[str, torch.Tensor]:
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "diffusion_model" in name:
            key = "lora_unet_" + name.split("diffusion_model.", 1)[1].replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features) * 0.1
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank) * 0.1
    return sd


def branch(model: torch.nn.Module, context=None) -> Branch:
    den = external.CompVisDenoiser(model)
    c, u = model.get_learned_conditioning(["a fox"]), model.get_learned_conditioning([""])
    kw = {"context": context} if context else {}
    return Branch(lambda x, s, cond: den(x, s, cond={"c_crossattn": [cond]}), lambda step: ([[(0, 1.0)]], c, u), **kw)


def sample(target: torch.nn.Module, run: DeltaRun | None, steps: int, size: int) -> torch.Tensor:
    """Euler over an A1111-ordered CFG denoiser: capture, batched cond+uncond, CFG, apply."""
    tb = branch(target)
    calls = [0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if run is not None:
            run.capture(StepInput(x, sigma, calls[0], progress_from_calls(calls[0], steps)))
        d = tb.denoise(x, sigma, calls[0], CFG, False)
        calls[0] += 1
        return run.apply(d) if run is not None else d

    sigmas = external.CompVisDenoiser(target).get_sigmas(steps)
    x = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    return sampling.sample_euler(denoise, x, sigmas, disable=True)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tinyldm.DIM = args.dim
    torch.set_grad_enabled(False)
    target, source = tinyldm.TinyLDM(seed=1).eval(), tinyldm.TinyLDM(seed=2).eval()
    adapter = LoraAdapter.from_state_dict(lora_for(source), source, 1.0)
    pair = CfgSourcePair(latent.SD1, branch(source), branch(source, adapter.enabled), CFG)
    settings = DeltaSettings(enabled=True, source="s", adapter="a")

    off = best_time(lambda: sample(target, None, args.steps, args.size), args.repeats)
    on = best_time(lambda: sample(target, DeltaRun(settings, pair, latent.SD1), args.steps, args.size), args.repeats)
    print(f"time per image  DS off {off * 1e3:8.1f} ms | DS on {on * 1e3:8.1f} ms | ratio {on / off:.2f}x "
          "(cost model: 3.0x for a same-size pair)")

    held = tensor_bytes([p.parts for p in adapter._patches.values()])
    largest = max(adapter.merged_weight(name)[0].numel() * 4 for name in adapter.module_names)
    second = copy.deepcopy(source)
    adapter.merge_into_(second)
    copy_bytes = tensor_bytes(list(second.parameters()))
    print(f"adapted branch  LoRA held {held / 1e6:.2f} MB + one merged layer at a time ({largest / 1e6:.2f} MB) | "
          f"second copy {copy_bytes / 1e6:.2f} MB | ratio {(held + largest) / copy_bytes:.2f}")


def tensor_bytes(objs) -> int:
    """Bytes of the distinct tensors in (nested lists/dicts of) tensors."""
    seen, total, stack = set(), 0, list(objs)
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.data_ptr() not in seen:
                seen.add(o.data_ptr())
                total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


if __name__ == "__main__":
    main()
