"""What DS costs, side by side in one run: time per step, ratio to plain, FLOP floor, peak memory.

    python bench/speed.py            # CPU: real SD1.5 / SDXL UNets with random weights, small latents
    python bench/speed.py --gpu      # CUDA, fp16, real sizes (SD1.5 at 512 px, SDXL at 1024 px)

Rows: plain, DS exact (separate passes, then batched), a first run that loads the pair from safetensors files
and a second that finds it in the source cache, each fast knob, the presets, and SD1.5 -> SDXL with and
without a native-size source. Timing: one warm-up, then the median of interleaved repeats. The FLOP floor
of a row is the FLOPs it executes (torch's flop counter, per model call and latent size) over plain's: a
row that runs at plain's efficiency has time ratio = floor. The error column is read from the trained toy
(bench/toy.py, bench/out/toy_errors.json): distance to exact DS over the DS effect, same seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from archs import Model, build, flops_per_row, lora_state_dict, meta_flops_per_row, with_controlnet  # noqa: E402
from k_diffusion import sampling  # noqa: E402

from lib_delta import latent  # noqa: E402
from lib_delta.delta import DeltaRun, StepInput  # noqa: E402
from lib_delta.lora import LoraAdapter  # noqa: E402
from lib_delta.schedules import progress_from_calls  # noqa: E402
from lib_delta.source import Branch, CfgSourcePair, ModelCache  # noqa: E402
from lib_delta.spec import DeltaSettings  # noqa: E402

CFG = 6.0
OUT = Path(__file__).resolve().parent / "out"


@dataclasses.dataclass
class Row:
    label: str
    target: Model
    settings: DeltaSettings | None  # None: plain
    plain: str  # label of this group's plain row
    toy: str = ""  # the toy's name for this mode (error column)
    load: str = ""  # "": the prebuilt pair; "cold": load it from files each run; "cached": from the source cache;
    # "control": the pair with a ControlNet on the adapted side
    times: list[float] = dataclasses.field(default_factory=list)
    flops: float = 0.0
    peak: float = 0.0


def ds(**kw) -> DeltaSettings:
    return DeltaSettings(enabled=True, source="bench", adapter="bench", strength=1.0, **kw)


def custom(**kw) -> DeltaSettings:
    knobs = {"batched": True, "cond_only": False, "reuse": 1.0, "native_size": False, **kw}
    return ds(speed="custom", **knobs)


def pair_for(source: Model, adapter: LoraAdapter, fmt: latent.LatentFormat, batch: int,
             controlled: Model | None = None) -> CfgSourcePair:
    """Base and base + LoRA; with `controlled` (the source behind a ControlNet), the adapted side runs through
    it too, as DS runs a source-side ControlNet: separate passes, the ControlNet on the adapted rows only."""
    c, u = source.conds(batch, 1), source.conds(batch, 2)
    conds_list = [[(i, 1.0)] for i in range(batch)]
    base = Branch(source.model_fn, lambda step: (conds_list, c, u))
    if controlled is not None:
        adapted = Branch(controlled.model_fn, lambda step: (conds_list, c, u), adapter.enabled)
    else:
        adapted = Branch(source.model_fn, lambda step: (conds_list, c, u), adapter.enabled, adapter.rows)
    return CfgSourcePair(fmt, base, adapted, CFG)


class SourceFiles:
    """The source base and its LoRA as safetensors files, loaded through the core's ModelCache as the hosts
    do: a cold run reads and builds both, a second run with the same pair finds them cached."""

    def __init__(self, source: Model, lora: dict[str, torch.Tensor], fmt: latent.LatentFormat, batch: int,
                 calls: list, folder: Path) -> None:
        self.unet_file, self.lora_file = folder / "source.safetensors", folder / "lora.safetensors"
        save_file({k: v.contiguous() for k, v in source.unet.state_dict().items()}, self.unet_file)
        save_file(lora, self.lora_file)
        self.device, self.dtype = source.unet.device, source.unet.dtype
        self.fmt, self.batch, self.calls = fmt, batch, calls
        self.cache = ModelCache(1)

    def load(self) -> CfgSourcePair:
        model = build("SD1.5", 0, self.device, self.dtype, self.calls, weights=load_file(self.unet_file))
        holder = torch.nn.Module()
        holder.diffusion_model = model.unet
        adapter = LoraAdapter.from_state_dict(load_file(self.lora_file), holder, 1.0)
        return pair_for(model, adapter, self.fmt, self.batch)

    def pair(self, cold: bool) -> CfgSourcePair:
        if cold:
            self.cache.clear()
        return self.cache.get(str(self.unet_file), self.load)


def sample(row: Row, pair: CfgSourcePair | None, fmt: latent.LatentFormat, size: int, steps: int,
           batch: int, device: torch.device) -> torch.Tensor:
    target = row.target
    c, u = target.conds(batch, 3), target.conds(batch, 4)
    branch = Branch(target.model_fn, lambda step: ([[(i, 1.0)] for i in range(batch)], c, u))
    run = DeltaRun(row.settings, pair, fmt) if row.settings is not None else None
    calls = [0]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if run is not None:
            run.capture(StepInput(x, sigma, calls[0], progress_from_calls(calls[0], steps)))
        rows = branch.rows(x, sigma, calls[0], uncond=True)
        out = rows.run(branch.model_fn)
        d = rows.combine(out, CFG)
        calls[0] += 1
        return run.apply(d, out[-batch:]) if run is not None else d

    sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6, device=device)
    noise = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return sampling.sample_euler(denoise, noise * sigmas[0], sigmas, disable=True)


class PeakMemory(contextlib.AbstractContextManager):
    """Peak memory above the level at entry: CUDA's allocator counter, or RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss())
        self.used = (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA, fp16, real sizes")
    ap.add_argument("--size", type=int, help="same-size pair latent side (CPU 16, GPU 64)")
    ap.add_argument("--xl-size", type=int, help="SDXL target latent side (CPU 32, GPU 128)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--floors", action="store_true", help="only the FLOP floors of SD1.5 -> SDXL at 1024 px (no timing)")
    ap.add_argument("--groups", nargs="+", default=["same", "xl"], choices=["same", "xl"],
                    help="same: a same-size SD1.5 pair; xl: SD1.5 -> SDXL (needs ~14 GB RAM in fp32)")
    args = ap.parse_args()
    if args.floors:
        return real_size_floors()
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.float16 if args.gpu else torch.float32
    size = args.size or (64 if args.gpu else 16)
    xl_size = args.xl_size or (128 if args.gpu else 32)
    torch.set_grad_enabled(False)
    calls: list = []
    started = time.perf_counter()
    sd15_target, sd15_source = build("SD1.5", 1, device, dtype, calls), build("SD1.5", 2, device, dtype, calls)
    holder = torch.nn.Module()
    holder.diffusion_model = sd15_source.unet
    lora = lora_state_dict(sd15_source.unet, 16, 3)
    adapter = LoraAdapter.from_state_dict(lora, holder, 1.0)
    # the source's native size in latent cells: SD1.5's 512 px, scaled like the target on CPU
    source_fmt = dataclasses.replace(latent.SD1, native_side=8 * xl_size // 2)
    pair = pair_for(sd15_source, adapter, source_fmt, args.batch)
    rows = [] if "same" not in args.groups else [
        Row("plain SD1.5", sd15_target, None, "plain SD1.5"),
        Row("DS exact, separate passes", sd15_target, custom(batched=False), "plain SD1.5", "custom: batched=False"),
        Row("DS exact (batched pair)", sd15_target, ds(), "plain SD1.5", "exact"),
        Row("DS exact, first run (loads the pair)", sd15_target, ds(), "plain SD1.5", "exact", load="cold"),
        Row("DS exact, second run (cached pair)", sd15_target, ds(), "plain SD1.5", "exact", load="cached"),
        Row("DS exact + ControlNet on the adapted source", sd15_target, ds(), "plain SD1.5", load="control"),
        Row("cond-only delta", sd15_target, custom(cond_only=True), "plain SD1.5", "custom: cond_only=True"),
        Row("delta every 2 calls", sd15_target, custom(reuse=2.0), "plain SD1.5", "custom: reuse=2"),
        Row("preset balanced", sd15_target, ds(speed="balanced"), "plain SD1.5", "balanced"),
        Row("preset fast", sd15_target, ds(speed="fast"), "plain SD1.5", "fast"),
    ]
    groups = {"plain SD1.5": (size, latent.SD1)}
    models = {"SD1.5": sd15_target}
    if any(r.load == "control" for r in rows):
        controlled = models["SD1.5+ControlNet"] = with_controlnet(sd15_source, 5)
        control_pair = pair_for(sd15_source, adapter, source_fmt, args.batch, controlled)
    if "xl" in args.groups:
        xl = models["SDXL"] = build("SDXL", 4, device, dtype, calls)
        rows += [
            Row("plain SDXL", xl, None, "plain SDXL"),
            Row("SD1.5 -> SDXL exact", xl, ds(), "plain SDXL", "exact"),
            Row("SD1.5 -> SDXL native-size source", xl, custom(native_size=True), "plain SDXL", "custom: native_size=True"),
            Row("SD1.5 -> SDXL preset fast", xl, ds(speed="fast"), "plain SDXL", "fast"),
        ]
        groups["plain SDXL"] = (xl_size, latent.SDXL)
    print(f"models built in {time.perf_counter() - started:.0f} s on {device} ({dtype}); "
          f"SD1.5 latent {size}², SDXL latent {xl_size}², source native {source_fmt.native_side // 8}², "
          f"{args.steps} Euler steps, batch {args.batch}", flush=True)

    folder = tempfile.TemporaryDirectory(prefix="ds-bench-")
    files = SourceFiles(sd15_source, lora, source_fmt, args.batch,
                        calls, Path(folder.name)) if any(r.load in ("cold", "cached") for r in rows) else None
    flop_cache: dict = {}
    for i in range(args.repeats + 1):  # the first pass warms up and counts FLOPs and memory
        for row in rows:
            side, fmt = groups[row.plain]
            calls.clear()
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                row_pair = control_pair if row.load == "control" else \
                    files.pair(cold=row.load == "cold") if row.load else pair
                sample(row, row_pair if row.settings else None, fmt, side, args.steps, args.batch, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            if i == 0:
                row.flops = sum(n * flops_per_row(models[name], s, flop_cache) for name, n, s in calls)
                row.peak = mem.used
            else:
                row.times.append(elapsed / args.steps)
        print(f"pass {i + 1}/{args.repeats + 1} done", flush=True)
    folder.cleanup()
    report(rows, args, device, dtype)


def real_size_floors() -> None:
    """SD1.5 -> SDXL at 1024 px: FLOPs per step over plain SDXL, from rows per step of each mode (target 2;
    the pair 4, 2 with cond-only; halved by delta every 2 calls; at 512 px with a native-size source)."""
    xl, sd15_1024, sd15_512 = (meta_flops_per_row(n, side) for n, side in (("SDXL", 128), ("SD1.5", 128), ("SD1.5", 64)))
    cn_1024 = meta_flops_per_row("SD1.5", 128, controlnet=True)
    print(f"per row: SDXL 1024 px {xl / 1e12:.2f} TFLOP, SD1.5 1024 px {sd15_1024 / 1e12:.2f}, 512 px {sd15_512 / 1e12:.2f}, "
          f"SD1.5 ControlNet 1024 px {cn_1024 / 1e12:.2f} ({cn_1024 / sd15_1024:.2f} of its UNet)")
    modes = {"exact": 4 * sd15_1024, "native-size source": 4 * sd15_512, "cond-only": 2 * sd15_1024,
             "balanced (delta every 2)": 2 * sd15_1024, "fast (cond-only, every 2, native size)": sd15_512,
             "exact + SD1.5 ControlNet on the adapted rows": 4 * sd15_1024 + 2 * cn_1024}
    print("| SD1.5 -> SDXL, 1024 px | FLOP floor |\n|---|---|")
    for name, source in modes.items():
        print(f"| {name} | {(2 * xl + source) / (2 * xl):.2f} |")


def report(rows: list[Row], args, device, dtype) -> None:
    errors = {}
    toy = OUT / "toy_errors.json"
    if toy.exists():
        errors = json.loads(toy.read_text())
    by_label = {r.label: r for r in rows}
    lines = ["| row | ms / step | × plain | FLOP floor | × floor | peak MB | toy error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        plain = by_label[r.plain]
        t, tp = statistics.median(r.times), statistics.median(plain.times)
        floor = r.flops / plain.flops
        err = errors.get(r.toy)
        lines.append(f"| {r.label} | {t * 1e3:.0f} | {t / tp:.2f} | {floor:.2f} | {t / tp / floor:.2f} | "
                     f"{r.peak:.0f} | {'' if err is None else f'{100 * err:.1f} %'} |")
    table = "\n".join(lines)
    when = time.strftime("%Y-%m-%d")
    head = f"bench/speed.py, {when}, {device} {dtype}, steps {args.steps}, repeats {args.repeats}, batch {args.batch}"
    print("\n" + head + "\n\n" + table)
    OUT.mkdir(exist_ok=True)
    (OUT / "speed.md").write_text(head + "\n\n" + table + "\n")
    chart(rows, by_label)


def chart(rows: list[Row], by_label: dict[str, Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    ratio = [statistics.median(r.times) / statistics.median(by_label[r.plain].times) for r in rows]
    floor = [r.flops / by_label[r.plain].flops for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], ratio, height=0.4, label="time / plain")
    ax.barh([i - 0.2 for i in y], floor, height=0.4, label="FLOP floor")
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("cost relative to the plain target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "speed.png", dpi=120)
    print(f"wrote {OUT / 'speed.md'} and {OUT / 'speed.png'}")


if __name__ == "__main__":
    main()
