"""A trained toy of Delta Sampling (DS): the transfer across architectures, where it breaks, fast modes.

Run: python bench/toy.py [--quick] [--seed 0] [--out bench/out] [--retrain] [--serial]
(about 3 minutes on 2 CPU cores with training, 1.5 minutes from the cached weights; --quick about 45 s)

Three tiny models are trained on synthetic shapes (bench/toy_models.py): a 16x16 eps-prediction base
(latent = image), a LoRA on it trained on A' (yellow shapes; A has red/green/blue ones) and a 32x32
v-prediction target with other widths, depth and stem (latent = 0.5 * image) trained on A only. The
target is sampled (k-diffusion Euler, Karras sigmas, CFG) with lib_delta's DeltaRun adding
lambda * (CFG(adapted) - CFG(base)), and the samples are measured against A and A'.

Outputs in --out: toy.md (the tables, also printed), toy_chart.png, toy_grid.png, toy_errors.json and
toy_models.pt (trained weights, keyed by a hash of the training config; --retrain ignores it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import toy_models as tm  # noqa: E402
from k_diffusion import sampling  # noqa: E402

from lib_delta import latent, logger  # noqa: E402
from lib_delta.delta import DeltaRun, StepInput  # noqa: E402
from lib_delta.lora import LoraAdapter  # noqa: E402
from lib_delta.schedules import progress_from_calls  # noqa: E402
from lib_delta.source import Branch, CfgSourcePair  # noqa: E402
from lib_delta.spec import PRESETS, DeltaSettings  # noqa: E402

# Source and target share the "VAE" (RGB pixels) and the channel count; their scales differ. The source's
# native side (16 latent px) makes native_size() run it at 16x16 under the 32x32 target.
SOURCE_FORMAT = latent.LatentFormat("toy base 16px", 3, 1.0, vae="toy-rgb", native_side=16 * 8, downscale=8)
SIDE = 32
LAMBDAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
TARGET_ERROR = 0.10  # the bar: a fast mode's error <= 10% of the DS effect
WEAK = 0.3  # the weak pair: the same LoRA at this multiplier


def target_format(cfg: tm.ToyConfig) -> latent.LatentFormat:
    return latent.LatentFormat("toy target 32px (v)", 3, cfg.target_scale, vae="toy-rgb", native_side=SIDE * 8)


@dataclass(frozen=True)
class RunConfig:
    n: int = 64  # samples per setting (one batch, one noise tensor for all settings)
    steps: int = 8  # Euler steps (= model calls)
    cfg_scale: float = 4.0  # target and source CFG
    lam: float = 1.0  # the lambda of the fast-mode and auto tables
    grid_columns: int = 8
    reference: int = 2048  # data images per reference set


FULL = RunConfig()
QUICK = RunConfig(n=16, steps=6, reference=512)


# -- measurement -----------------------------------------------------------------------------------------
PALETTE = {**tm.A_COLOURS, **tm.A2_COLOURS}


def features(img: torch.Tensor) -> torch.Tensor:
    """Per image: mean R, G, B over the foreground and the foreground's area fraction, (n, 4).

    Foreground = pixels whose brightest channel is above 0 (the background is -0.8 in every channel, every
    shape colour has a channel at +0.8). An image without foreground gets the background colour.
    """
    img = img.float()
    mask = (img.amax(1, keepdim=True) > 0).float()
    area = mask.flatten(1).sum(1)
    colour = (img * mask).flatten(2).sum(2) / area.clamp_min(1)[:, None]
    colour = torch.where(area[:, None] > 0, colour, torch.full_like(colour, tm.BG))
    return torch.cat([colour, (area / mask[0].numel())[:, None]], 1).double()


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def yellow_share(feats: torch.Tensor) -> float:
    """Fraction of images whose mean foreground colour is nearest yellow (the A' colour) of all palettes."""
    palette = torch.tensor(list(PALETTE.values()), dtype=feats.dtype)
    nearest = torch.cdist(feats[:, :3], palette).argmin(1)
    return float((nearest == list(PALETTE).index("yellow")).float().mean())


@dataclass
class Metrics:
    """The distance of a sample set to A and A'.

    fd_a, fd_a2: Frechet distance between Gaussian fits of the 4 `features` of the samples and of a
    reference set of the data (2048 fresh images of A, resp. A'). Why this distance: A and A' differ in
    exactly one measurable attribute, the foreground colour, and share the geometry (area); the 4-D fit
    is well conditioned with 64 samples (an Inception FID needs thousands and no network is available
    here), it is 0 for equal Gaussians and grows with both a mean shift (colour moved) and a spread
    change (colours smeared, sizes broken). The "data" rows show its floor at this sample count.
    yellow: the share of samples whose foreground is yellow (A' attribute present); A has 0, A' 1.
    out: the share of pixels outside [-1, 1] (the data never leaves [-0.8, 0.8]): over-saturation.
    shift: RMS pixel distance (image units) to the same seeds sampled without DS.
    """

    fd_a: float
    fd_a2: float
    yellow: float
    out: float
    shift: float


class Refs:
    def __init__(self, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed + 1000)
        self.a = features(tm.shapes(count, SIDE, tm.A_COLOURS, g)[0])
        self.a2 = features(tm.shapes(count, SIDE, tm.A2_COLOURS, g)[0])

    def measure(self, img: torch.Tensor, plain: torch.Tensor | None) -> Metrics:
        f = features(img)
        shift = 0.0 if plain is None else float((img - plain).pow(2).mean().sqrt())
        return Metrics(frechet(f, self.a), frechet(f, self.a2), yellow_share(f), float((img.abs() > 1).float().mean()),
                       shift)


# -- the toy: models, pairs, sampling ---------------------------------------------------------------------
Record = list[tuple[StepInput, torch.Tensor, torch.Tensor, torch.Tensor]]  # (step, CFG'd x0, uncond, DS x0)


@dataclass
class Sample:
    x: torch.Tensor  # target latent
    img: torch.Tensor  # image units
    run: DeltaRun | None
    seconds: float
    effective: list[float] = field(default_factory=list)  # per applied step: mean RMS(update) / RMS(delta)
    guidance: list[float] = field(default_factory=list)  # per applied step: mean RMS(guidance) / RMS(delta)
    record: Record = field(default_factory=list)


class Toy:
    """Trained models, the LoRA pairs and one fixed batch of labels and noise for every setting."""

    def __init__(self, trained: tm.Trained, cfg: tm.ToyConfig, rc: RunConfig, seed: int) -> None:
        self.trained, self.cfg, self.rc = trained, cfg, rc
        self.target_format = target_format(cfg)
        n = rc.n
        self.labels = torch.arange(n) % len(tm.CLASSES)
        cond, uncond = tm.one_hot(self.labels), tm.one_hot(torch.full((n,), tm.NULL))
        conds_list = [[(i, 1.0)] for i in range(n)]
        self.conds_at = lambda step: (conds_list, cond, uncond)
        self.pairs = {name: self.lora_pair(LoraAdapter.from_state_dict(trained.lora, trained.base, mult), name)
                      for name, mult in (("strong", 1.0), ("weak", WEAK))}
        self.sigmas = sampling.get_sigmas_karras(rc.steps, tm.SIGMA_MIN, tm.SIGMA_MAX)
        self.noise = torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed + 2000))

    def lora_pair(self, adapter: LoraAdapter, name: str) -> CfgSourcePair:
        model = self.trained.base
        base = Branch(model, self.conds_at)
        adapted = Branch(model, self.conds_at, adapter.enabled, adapter.rows)
        return CfgSourcePair(SOURCE_FORMAT, base, adapted, self.rc.cfg_scale, sigma_max=tm.SIGMA_MAX,
                             title=f"toy LoRA x{adapter.multiplier:g}")

    def sample(self, settings: DeltaSettings | None, pair: str = "strong", record: bool = False) -> Sample:
        """The target sampled (Euler) on the fixed noise; DS on with `settings`, off with None."""
        run = None if settings is None else DeltaRun(settings, self.pairs[pair], self.target_format, "toy target")
        target = Branch(self.trained.target, self.conds_at)
        total = len(self.sigmas) - 1
        calls, result = [0], Sample(self.noise, self.noise, run, 0.0)
        if run is not None:
            scaled = run.scaled

            def recording(lam, delta, x0, uncond):
                update = scaled(lam, delta, x0, uncond)
                size = _rms(delta).clamp_min(1e-12)
                result.effective.append(float((_rms(update) / size).mean()))
                result.guidance.append(float((_rms(x0 - uncond) / size).mean()))
                return update

            run.scaled = recording

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            step = StepInput(x, sigma, calls[0], progress_from_calls(calls[0], total))
            if run is not None:
                run.capture(step)
            rows = target.rows(x, sigma, calls[0], uncond=True)
            out = rows.run(target.model_fn)
            denoised, uncond = rows.combine(out, self.rc.cfg_scale), out[-x.shape[0]:]
            calls[0] += 1
            final = denoised if run is None else run.apply(denoised, uncond)
            if record:
                result.record.append((step, denoised, uncond, final))
            return final

        start = time.perf_counter()
        with torch.no_grad():
            x = sampling.sample_euler(denoise, self.noise * self.sigmas[0], self.sigmas, disable=True)
        assert calls[0] == total, (calls[0], total)
        result.x, result.img, result.seconds = x, self.target_format.to_unscaled(x), time.perf_counter() - start
        return result

    def replay(self, settings: DeltaSettings, record: Record, pair: str = "strong") -> tuple[float, float]:
        """One-step error: the mode's DS update on the exact run's states, step by step, against the exact
        update: sqrt(sum ||u_mode - u_exact||^2 / sum ||u_exact||^2) over all steps (no trajectory drift);
        and the same on 4x4-pixel averages of the updates (their low-frequency part)."""
        run = DeltaRun(settings, self.pairs[pair], self.target_format, "toy target")
        sums = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for step, denoised, uncond, exact in record:
                run.capture(step)
                diff, ref = run.apply(denoised, uncond) - exact, exact - denoised
                low = [torch.nn.functional.avg_pool2d(v, 4) for v in (diff, ref)]
                sums += torch.tensor([float(v.pow(2).sum()) for v in (diff, ref, *low)], dtype=torch.float64)
        return math.sqrt(sums[0] / sums[1].clamp_min(1e-30)), math.sqrt(sums[2] / sums[3].clamp_min(1e-30))


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.float().pow(2).flatten(1).mean(1).sqrt()


@contextlib.contextmanager
def same_snr_source() -> Iterator[None]:
    """Ablation (monkeypatched for this run only): feed the source the target's state scaled with the
    latent, x0 AND noise (x_src = k x, sigma_src = k sigma, k = s_src / s_tgt), so it sees the target's
    signal-to-noise ratio. lib_delta keeps the noise as it is and rescales only x0 (same sigma)."""
    original = latent.source_state

    def scaled(x, x0, sigma, source, target, source_sigma_max=math.inf):
        k = source.scale / target.scale
        noise = (x - x0) / sigma.reshape(-1, 1, 1, 1).clamp_min(1e-12)
        sigma_src = (k * sigma).clamp(max=source_sigma_max)
        return source.from_unscaled(target.to_unscaled(x0)) + sigma_src.reshape(-1, 1, 1, 1) * noise, sigma_src

    latent.source_state = scaled
    try:
        yield
    finally:
        latent.source_state = original


@contextlib.contextmanager
def upsampling(mode: str) -> Iterator[None]:
    """Measurement only (monkeypatched for this run): bring the native-size source's delta up with `mode`
    instead of lib_delta's bilinear."""
    original = latent.upsample

    def resample(delta: torch.Tensor, size) -> torch.Tensor:
        corners = {} if mode in ("nearest", "nearest-exact") else {"align_corners": False}
        return torch.nn.functional.interpolate(delta.float(), size=tuple(size), mode=mode, **corners).to(delta.dtype)

    latent.upsample = resample
    try:
        yield
    finally:
        latent.upsample = original


RESAMPLING = ("bilinear", "bicubic", "nearest-exact")


def ds(lam: float, **kw) -> DeltaSettings:
    return DeltaSettings(enabled=True, source="toy base", adapter="toy lora", strength=lam, **kw)


def custom(lam: float, **knobs) -> DeltaSettings:
    return ds(lam, speed="custom", **{**PRESETS["exact"], **knobs})


def rel_error(fast: torch.Tensor, exact: torch.Tensor, plain: torch.Tensor) -> float:
    """||x_fast - x_exact|| / ||x_exact - x_plain|| over the whole batch (target latent)."""
    return float((fast - exact).norm() / (exact - plain).norm().clamp_min(1e-12))


def calibrate_auto(exact: Sample, lam: float) -> float:
    """The auto r whose per-step lambda (r * RMS(target guidance) / RMS(delta), per image) averages `lam` over
    the steps and images of this fixed-lambda run: r = lam / mean(RMS(guidance) / RMS(delta))."""
    return round(lam * len(exact.guidance) / sum(exact.guidance), 3)


# -- the experiment -----------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    m: Metrics
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Results:
    toy: Toy
    refs: Refs
    plain: Sample
    sweep: dict[float, Sample]
    breaks: dict[str, Sample]
    modes: dict[str, Sample]
    errors: dict[str, float]  # trajectory error vs exact, per mode
    one_step: dict[str, tuple[float, float]]  # one-step error vs exact per mode: all, low frequencies
    auto: dict[str, Sample]
    auto_r: float
    tables: dict[str, list[Row]]
    markdown: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    out: Path | None = None


def experiment(toy: Toy, refs: Refs) -> Results:
    rc, seconds = toy.rc, {}
    t = time.perf_counter()
    plain = toy.sample(None)
    sweep = {lam: toy.sample(ds(lam), record=lam == rc.lam) for lam in LAMBDAS}
    main = sweep[rc.lam]
    seconds["lambda sweep"] = time.perf_counter() - t

    def row(name: str, s: Sample, **extra: str) -> Row:
        calls = "" if s.run is None else f"{s.run.source_calls}/{s.run.applied_steps}"
        return Row(name, refs.measure(s.img, plain.img), {"source calls": calls, "time s": f"{s.seconds:.2f}",
                                                          **extra})

    t = time.perf_counter()
    big = max(LAMBDAS)
    breaks = {
        f"lambda {big:g} (all steps)": sweep[big],
        f"lambda {rc.lam:g}, window 0.8-1.0 (short, late)": toy.sample(ds(rc.lam, start=0.8, end=1.0)),
        f"lambda {4 * rc.lam:g}, window 0.8-1.0 (short, late)": toy.sample(ds(4 * rc.lam, start=0.8, end=1.0)),
        f"lambda {rc.lam:g}, window 0.5-1.0 (late half)": toy.sample(ds(rc.lam, start=0.5, end=1.0)),
        f"lambda {rc.lam:g}, window 0.0-0.5 (early half)": toy.sample(ds(rc.lam, start=0.0, end=0.5)),
        f"lambda {rc.lam:g}, window 0.0-0.2 (short, early)": toy.sample(ds(rc.lam, start=0.0, end=0.2)),
    }
    with same_snr_source():
        breaks[f"lambda {rc.lam:g}, ablation: source at the target's SNR"] = toy.sample(ds(rc.lam))
    seconds["breaks"] = time.perf_counter() - t

    t = time.perf_counter()
    auto_r = calibrate_auto(main, rc.lam)
    modes = {"exact": main}
    for speed in ("balanced", "fast"):
        modes[speed] = toy.sample(ds(rc.lam, speed=speed))
    knobs = {"custom: batched=False": {"batched": False}, "custom: cond_only=True": {"cond_only": True},
             "custom: reuse=2": {"reuse": 2.0}, "custom: native_size=True": {"native_size": True}}
    for name, knob in knobs.items():
        modes[name] = toy.sample(custom(rc.lam, **knob))
    modes[f"auto r={auto_r:g}"] = toy.sample(ds(auto_r, strength_mode="auto"))
    reference = f"reference: exact at lambda {1.1 * rc.lam:g} (a 10% larger delta)"
    modes[reference] = toy.sample(ds(1.1 * rc.lam))
    errors = {name: rel_error(s.x, main.x, plain.x) for name, s in modes.items()}
    one_step = {"exact": (0.0, 0.0), "custom: batched=False": (0.0, 0.0) if errors["custom: batched=False"] == 0
                else toy.replay(modes["custom: batched=False"].run.settings, main.record)}
    one_step |= {name: toy.replay(s.run.settings, main.record) for name, s in modes.items()
                 if name not in one_step and name != reference and not name.startswith("auto")}
    seconds["fast modes"] = time.perf_counter() - t

    t = time.perf_counter()
    resampled = {"bilinear": modes["custom: native_size=True"]}
    for mode in RESAMPLING[1:]:
        with upsampling(mode):
            resampled[mode] = toy.sample(custom(rc.lam, native_size=True))
    seconds["resampling"] = time.perf_counter() - t

    t = time.perf_counter()
    auto = {"strong, fixed": main, "weak, fixed": toy.sample(ds(rc.lam), pair="weak"),
            "strong, auto": modes[f"auto r={auto_r:g}"], "weak, auto": toy.sample(ds(auto_r, strength_mode="auto"),
                                                                                  pair="weak")}
    seconds["auto"] = time.perf_counter() - t

    mode_rows = [row("DS off (plain)", plain)]
    for name, s in modes.items():
        verdict = "yes" if errors[name] <= TARGET_ERROR else "**no**"
        if name.startswith("auto"):
            verdict = "(a strength mode, not a shortcut)"
        elif name.startswith("reference"):
            verdict = "(what 10% of the delta does)"
        step, low = (f"{v:.4f}" for v in one_step[name]) if name in one_step else ("", "")
        mode_rows.append(row(name, s, **{"error vs exact": f"{errors[name]:.4f}", "<= 10%": verdict,
                                         "one-step error": step, "one-step, 4x4 means": low}))
    auto_rows = []
    for name, s in auto.items():
        strength = f"auto r = {auto_r:g}" if "auto" in name else f"lambda = {rc.lam:g}"
        eff = sum(s.effective) / max(len(s.effective), 1)
        auto_rows.append(row(f"{name} ({'x1' if 'strong' in name else f'x{WEAK:g}'} LoRA)", s,
                             **{"setting": strength, "mean effective lambda": f"{eff:.3f}"}))
    tables = {"lambda sweep": [*data_rows(refs, rc), row("DS off (plain)", plain),
                               *(row(f"lambda {lam:g}", s) for lam, s in sweep.items())],
              "where it breaks": [row("DS off (plain)", plain), row(f"lambda {rc.lam:g} (all steps)", main),
                                  *(row(name, s) for name, s in breaks.items())],
              "fast modes": mode_rows, "auto strength": auto_rows,
              "resampling": [row(f"native size, delta up {mode}" + (" (ships)" if mode == "bilinear" else ""), s,
                                 **{"error vs exact": f"{rel_error(s.x, main.x, plain.x):.4f}"})
                             for mode, s in resampled.items()]}
    res = Results(toy, refs, plain, sweep, breaks, modes, errors, one_step, auto, auto_r, tables, seconds=seconds)
    res.markdown = markdown(res)
    return res


def data_rows(refs: Refs, rc: RunConfig) -> list[Row]:
    """Fresh data sets of the sample count: the distance floor."""
    g = torch.Generator().manual_seed(99)
    return [Row(name, refs.measure(tm.shapes(rc.n, SIDE, colours, g)[0], None))
            for name, colours in (("data: A", tm.A_COLOURS), ("data: A'", tm.A2_COLOURS))]


def shift_ratio(res: Results, kind: str) -> tuple[float, float]:
    """(strong/weak ratio of ||x - x_plain||, strong/weak ratio of the FD-to-A' drop) for fixed or auto."""
    s, w = res.auto[f"strong, {kind}"], res.auto[f"weak, {kind}"]
    dist = float((s.img - res.plain.img).norm()) / max(float((w.img - res.plain.img).norm()), 1e-12)
    fd0 = res.refs.measure(res.plain.img, None).fd_a2
    drop_s, drop_w = (fd0 - res.refs.measure(v.img, None).fd_a2 for v in (s, w))
    return dist, drop_s / drop_w if drop_w > 0 else math.inf


# -- report ---------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    extras = list(dict.fromkeys(k for r in rows for k in r.extra))
    head = ["setting", "FD to A", "FD to A'", "yellow %", "out of range %", "shift (RMS)", *extras]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.m
        cells = [r.name, f"{m.fd_a:.3f}", f"{m.fd_a2:.3f}", f"{100 * m.yellow:.1f}", f"{100 * m.out:.2f}",
                 f"{m.shift:.3f}", *(r.extra.get(k, "") for k in extras)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(res: Results) -> str:
    toy, errors = res.toy, res.errors
    rc, cfg = toy.rc, toy.cfg
    (fixed_d, fixed_fd), (auto_d, auto_fd) = shift_ratio(res, "fixed"), shift_ratio(res, "auto")
    shortcuts = [k for k in errors if k != "exact" and not k.startswith(("auto", "reference"))]
    missed = [k for k in shortcuts if errors[k] > TARGET_ERROR]
    parts = [
        "# Delta Sampling toy: transfer across architectures, where it breaks, fast modes",
        f"{rc.n} samples per setting (the same labels and noise in every row), Euler {rc.steps} steps, Karras "
        f"sigmas {tm.SIGMA_MIN}-{tm.SIGMA_MAX}, CFG {rc.cfg_scale:g} (target and source). Source: eps base "
        f"{cfg.base_widths} at 16x16 (latent scale 1.0, {cfg.base_steps} steps) + LoRA rank {cfg.lora_rank} "
        f"trained on A' ({cfg.lora_steps} steps). Target: v-prediction {cfg.target_widths} with a 2x2 "
        f"pixel-unshuffle stem at 32x32 (latent scale {cfg.target_scale:g}, {cfg.target_steps} steps), never "
        "trained on A'.",
        f"FD: Frechet distance of Gaussian fits of per-image (foreground R, G, B, area) to {rc.reference} data "
        "images; "
        "yellow: share of samples with a yellow (A') foreground; out of range: pixels outside [-1, 1]; shift: "
        "RMS pixel distance to the same seed without DS; source calls: steps whose delta was computed / steps "
        "with DS applied.",
        "## lambda sweep", table(res.tables["lambda sweep"]),
        "## Where it breaks", table(res.tables["where it breaks"]),
        f"## Fast modes (lambda = {rc.lam:g})",
        "error vs exact = ||x_mode - x_exact|| / ||x_exact - x_plain|| on the same noise (target latent, "
        "final samples). one-step error: the mode's update on the exact run's states, step by step, against "
        "the exact update (no trajectory drift); 4x4 means: the same on 4x4-pixel averages of the updates "
        "(their low frequencies). Issue target: error <= 10% for every fast mode. "
        + ("Missed by: " + ", ".join(f"{k} ({errors[k]:.3f})" for k in missed) + "." if missed
           else "Every shortcut meets it."),
        table(res.tables["fast modes"]),
        "## Auto strength: one setting for two pairs of different strength",
        f"The weak pair is the same LoRA at multiplier {WEAK:g}. auto r = {res.auto_r:g} is calibrated on the "
        f"strong pair's lambda = {rc.lam:g} run: r = lambda / mean(RMS(target guidance) / RMS(delta)) over its "
        "steps and images, so that auto's per-step lambda averages the fixed one there.",
        table(res.tables["auto strength"]),
        f"Strong/weak ratio of the shift ||x - x_plain||: fixed lambda = {rc.lam:g}: **{fixed_d:.2f}**, auto: "
        f"**{auto_d:.2f}**; of the drop in FD to A': fixed **{fixed_fd:.2f}**, auto **{auto_fd:.2f}** "
        "(1.00 = the same effect from both pairs).",
        "## Resampling of the native-size source's delta",
        "The native-size source runs at 16x16 under the 32x32 target; its delta comes back up with each "
        "interpolation (the state goes down by area averaging in every row).",
        table(res.tables["resampling"]),
    ]
    return "\n\n".join(parts) + "\n"


# -- figures ----------------------------------------------------------------------------------------------------
def chart(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    lams = list(res.sweep)
    ms = [res.refs.measure(s.img, res.plain.img) for s in res.sweep.values()]
    xs = range(len(lams))
    ax.plot(xs, [m.fd_a for m in ms], "o-", label="FD to A")
    ax.plot(xs, [m.fd_a2 for m in ms], "s-", label="FD to A'")
    ax.set_xticks(list(xs), [f"{lam:g}" for lam in lams])
    ax.set_xlabel("lambda")
    ax.set_ylabel("Frechet distance (colour/area features)")
    ax.set_yscale("log")
    twin = ax.twinx()
    twin.plot(xs, [100 * m.yellow for m in ms], "^--", color="goldenrod", label="yellow %")
    twin.plot(xs, [100 * m.out for m in ms], "x:", color="crimson", label="out of range %")
    twin.set_ylabel("%")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center left")
    ax.set_title("DS transfer vs lambda (target samples)")

    ax = axes[1]
    names = [k for k in res.errors if k != "exact" and not k.startswith("reference")]
    ys = range(len(names))
    vals = [res.errors[k] for k in names]
    ax.barh([y - 0.2 for y in ys], vals, height=0.4, label="error of the final samples",
            color=["tab:green" if v <= TARGET_ERROR else "tab:red" for v in vals])
    ax.barh([y + 0.2 for y in ys], [res.one_step.get(k, (0.0, 0.0))[0] for k in names], height=0.4,
            color="tab:gray", label="one-step error (exact run's states)")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.axvline(TARGET_ERROR, color="k", ls="--", lw=1, label="10% target")
    ref = next((v for k, v in res.errors.items() if k.startswith("reference")), None)
    if ref is not None:
        ax.axvline(ref, color="tab:purple", ls=":", lw=1, label="exact at 1.1 x lambda")
    ax.set_xlabel("||x_mode - x_exact|| / ||x_exact - x_plain||")
    ax.set_title(f"fast modes vs exact DS (lambda = {res.toy.rc.lam:g})")
    ax.set_xlim(0, max(2.0, 1.05 * max(vals + [v for v, _ in res.one_step.values()])))
    ax.legend(fontsize=7, loc="center right")
    ax.invert_yaxis()

    ax = axes[2]
    rows = res.tables["auto strength"]
    ax.bar([r.name.split(" (")[0] for r in rows], [r.m.shift for r in rows],
           color=["tab:blue", "tab:cyan", "tab:orange", "gold"])
    for i, r in enumerate(rows):
        ax.text(i, r.m.shift, f"{100 * r.m.yellow:.0f}% yellow", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("shift: RMS pixel distance to DS off")
    ax.set_title(f"fixed vs auto: LoRA x1 (strong) and x{WEAK:g} (weak)")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(res.toy.rc.grid_columns, res.toy.rc.n)
    rows = [("DS off", res.plain), *((f"lambda {lam:g}", s) for lam, s in res.sweep.items() if lam > 0)]
    rows += [(name.split(" (")[0].replace("window ", "w ").replace("ablation: source at the target's SNR",
                                                                     "target-SNR source"), s)
             for name, s in res.breaks.items() if "all steps" not in name]
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 1.6, len(rows) * 0.9 + 0.4))
    for i, (name, s) in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(((s.img[j].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
            if i == 0:
                ax.set_title(f"seed {j} ({tm.CLASSES[int(res.toy.labels[j])]})", fontsize=7)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _settings() -> Iterator[None]:
    """One thread, deterministic algorithms, quiet lib_delta logs; restored afterwards (tests share torch)."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), logger.level
    torch.set_num_threads(1)  # tiny convolutions: a second intra-op thread costs more than it gives here
    torch.use_deterministic_algorithms(True)
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        logger.setLevel(saved[2])


def run(argv: list[str] | None = None) -> Results:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, steps and training (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    p.add_argument("--serial", action="store_true", help="train the target in this process too")
    p.add_argument("--steps", type=int, help="Euler steps of every sample (default 8; WebUI users run 20-30)")
    args = p.parse_args(argv)
    with _settings():
        return _run(args)


def _run(args: argparse.Namespace) -> Results:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(tm.QUICK if args.quick else tm.ToyConfig(), seed=args.seed)
    rc = QUICK if args.quick else FULL
    rc = replace(rc, steps=args.steps) if args.steps else rc
    trained, cached = tm.load_or_train(cfg, out / "toy_models.pt", args.retrain, parallel=not args.serial)
    t_train = time.perf_counter() - start
    how = f"cached ({cfg.key()})" if cached else "trained " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                       trained.seconds.items())
    print(f"models: {how} ({t_train:.1f} s)", flush=True)
    toy = Toy(trained, cfg, rc, args.seed)
    refs = Refs(rc.reference, args.seed)
    res = experiment(toy, refs)
    res.out = out
    t = time.perf_counter()
    chart(res, out / "toy_chart.png")
    grid(res, out / "toy_grid.png")
    res.seconds = {"models": t_train, **res.seconds, "figures": time.perf_counter() - t,
                   "total": time.perf_counter() - start}
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    res.markdown += (f"\nWall time: {timing} (models {'from the cache' if cached else 'trained'}; one CPU thread, "
                     "training in two processes).\n")
    (out / "toy.md").write_text(res.markdown)
    (out / "toy_errors.json").write_text(json.dumps(res.errors, indent=2) + "\n")
    print(res.markdown)
    print(f"wrote {out / 'toy.md'}, toy_chart.png, toy_grid.png, toy_errors.json")
    return res


if __name__ == "__main__":
    run()
