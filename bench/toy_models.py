"""Models, data and training for bench/toy.py: a trained toy of Delta Sampling across architectures.

Data ("latents" are small RGB images, no VAE), values in [-1, 1] on a black (-0.8) background:
  A   one shape per image (disc, square or ring: the class label), random position and size, coloured
      red, green or blue;
  A'  the same shapes coloured yellow (a colour A never has: measurable per image).

Models, all VP k-diffusion denoisers (x = x0 + sigma * eps) with sigma_data preconditioning:
  base      eps-prediction, class-conditional, trained on A at 16x16 (A area-downsampled), latent = image;
  adapted   a kohya LoRA (lora_unet_* keys, every Conv2d/Linear of the UNet) trained on the frozen base
            with A' (bench/toy.py also applies it at a lower multiplier: the weaker second pair);
  target    v-prediction (sigma_data 1, k-diffusion's VDenoiser default, as SD 2.x v models), other widths
            and depth and a 2x2 pixel-unshuffle stem, trained on A at 32x32, latent = 0.5 * image. It is
            trained in a second process while this one trains the base and the LoRA (one thread each:
            on small CPUs two processes scale, two intra-op threads do not).

Conditioning is a (B, 1, K) one-hot label row (K = classes + 1; the last is the null label of CFG), so
lib_delta.source.token_length() sees one "token".
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

CLASSES = ("disc", "square", "ring")
NULL = len(CLASSES)  # the uncond label
BG = -0.8
A_COLOURS = {"red": (0.8, -0.8, -0.8), "green": (-0.8, 0.8, -0.8), "blue": (-0.8, -0.8, 0.8)}
A2_COLOURS = {"yellow": (0.8, 0.8, -0.8)}
SIGMA_MIN, SIGMA_MAX = 0.02, 20.0  # trained (and sampled) noise range, in each model's own latent units


# -- data ---------------------------------------------------------------------------------------------
def shapes(n: int, side: int, colours: dict[str, tuple[float, float, float]], g: torch.Generator,
           labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 3, side, side) in [-1, 1], labels (n,)). Geometry is drawn at 32x32 and area-averaged
    to `side`, so a 16x16 set is the 32x32 set downsampled; edges are anti-aliased (1 px ramp)."""
    big = 32
    labels = torch.randint(len(CLASSES), (n,), generator=g) if labels is None else labels
    radius = 5.0 + 6.0 * torch.rand(n, generator=g)
    centre = radius[:, None] + 1 + (big - 2 - 2 * radius[:, None]) * torch.rand(n, 2, generator=g)
    pick = torch.randint(len(colours), (n,), generator=g)
    palette = torch.tensor(list(colours.values()))[pick]  # (n, 3)
    ys, xs = torch.meshgrid(torch.arange(big) + 0.5, torch.arange(big) + 0.5, indexing="ij")
    dy, dx = ys[None] - centre[:, 0, None, None], xs[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    dist = (dx**2 + dy**2).sqrt()
    disc = (r - dist + 0.5).clamp(0, 1)
    square = (0.85 * r - torch.maximum(dx.abs(), dy.abs()) + 0.5).clamp(0, 1)
    ring = disc - (0.55 * r - dist + 0.5).clamp(0, 1)
    mask = torch.stack([disc, square, ring], 1)[torch.arange(n), labels][:, None]  # (n, 1, 32, 32)
    img = BG + mask * (palette[:, :, None, None] - BG)
    if side != big:
        img = F.adaptive_avg_pool2d(img, side)
    return img, labels


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, K) conditioning rows; label NULL is the uncond."""
    return F.one_hot(labels, NULL + 1).float()[:, None, :]


# -- networks -----------------------------------------------------------------------------------------
class Res(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)  # scale and shift
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(e)[:, :, None, None].chunk(2, 1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small conv UNet: `widths` per level (one Res block each, stride-2 conv down, nearest up), a middle
    block, skip concatenation; time (log sigma) and label embeddings scale/shift every block.
    `unshuffle`: the network works on 2x2 pixel blocks (PixelUnshuffle stem, PixelShuffle head)."""

    def __init__(self, widths: tuple[int, ...], emb: int = 48, channels: int = 3, unshuffle: bool = False) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        io = channels * 4 if unshuffle else channels
        self.time_embed = nn.Sequential(nn.Linear(16, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Linear(NULL + 1, emb, bias=False)
        self.conv_in = nn.Conv2d(io, widths[0], 3, padding=1)
        self.down = nn.ModuleList(Res(a, b, emb) for a, b in zip((widths[0], *widths), widths, strict=False))
        self.pool = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.mid = Res(widths[-1], widths[-1], emb)
        ups = list(reversed(widths))
        self.up = nn.ModuleList(Res(a + b, b, emb) for a, b in zip((ups[0], *ups), ups, strict=False))
        self.norm_out, self.conv_out = nn.GroupNorm(4, widths[0]), nn.Conv2d(widths[0], io, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.arange(8, dtype=torch.float32) * (-math.log(100.0) / 8))
        angles = c_noise.float()[:, None] * freqs[None] * 10.0
        e = self.time_embed(torch.cat([angles.sin(), angles.cos()], 1)) + self.label_emb(cond[:, 0])
        h = self.conv_in(F.pixel_unshuffle(x, 2) if self.unshuffle else x)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, e)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        h = self.mid(h, e)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), e)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, 2) if self.unshuffle else out


class Denoiser(nn.Module):
    """k-diffusion-style wrapper: (x, sigma, cond) -> x0. `diffusion_model` is the UNet (LoRA keys resolve
    under it). eps: x0 = x - sigma * F; v: x0 = c_skip x + c_out F (k-diffusion VDenoiser)."""

    def __init__(self, unet: UNet, parameterization: str, sigma_data: float) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.parameterization, self.sigma_data = parameterization, sigma_data

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, sd = sigma.reshape(-1, 1, 1, 1), self.sigma_data
        c_in = 1 / (s**2 + sd**2).sqrt()
        if self.parameterization == "eps":
            return torch.ones_like(s), -s, c_in
        return sd**2 / (s**2 + sd**2), -s * sd / (s**2 + sd**2).sqrt(), c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        c_skip, c_out, c_in = self.scalings(sigma)
        args = (x * c_in, sigma.log() / 4, cond)
        out = self.diffusion_model(*args) if params is None else functional_call(self.diffusion_model, params, args)
        return c_skip * x + c_out * out

    def loss(self, x0: torch.Tensor, cond: torch.Tensor, g: torch.Generator,
             params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """MSE on the network output's own target (eps or v), sigma log-normal within the trained range."""
        n = x0.shape[0]
        sigma = torch.exp(-0.8 + 1.6 * torch.randn(n, generator=g)).clamp(SIGMA_MIN, SIGMA_MAX)
        noise = torch.randn(x0.shape, generator=g)
        x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
        c_skip, c_out, c_in = self.scalings(sigma)
        args = (x * c_in, sigma.log() / 4, cond)
        out = self.diffusion_model(*args) if params is None else functional_call(self.diffusion_model, params, args)
        return F.mse_loss(out, (x0 - c_skip * x) / c_out)


# -- training -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    """Everything that decides the trained weights (hashed for the cache)."""

    seed: int = 0
    base_widths: tuple[int, ...] = (12, 24, 48)
    target_widths: tuple[int, ...] = (24, 40, 56)
    base_steps: int = 1000
    target_steps: int = 900
    lora_steps: int = 300
    lora_rank: int = 4
    batch: int = 32
    lr: float = 2e-3
    lora_lr: float = 1e-2
    label_dropout: float = 0.15
    target_scale: float = 0.5  # target latent = scale * image
    target_sigma_data: float = 1.0
    version: int = 3

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


QUICK = ToyConfig(base_steps=250, target_steps=250, lora_steps=100)


@dataclass
class Trained:
    base: Denoiser
    target: Denoiser
    lora: dict[str, torch.Tensor]  # kohya state dict
    seconds: dict[str, float] = field(default_factory=dict)


def make_base(cfg: ToyConfig) -> Denoiser:
    return Denoiser(UNet(cfg.base_widths), "eps", sigma_data=0.5)


def make_target(cfg: ToyConfig) -> Denoiser:
    return Denoiser(UNet(cfg.target_widths, unshuffle=True), "v", sigma_data=cfg.target_sigma_data)


def _labels(labels: torch.Tensor, dropout: float, g: torch.Generator) -> torch.Tensor:
    drop = torch.rand(labels.shape, generator=g) < dropout
    return one_hot(torch.where(drop, torch.full_like(labels, NULL), labels))


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    warm = min(1.0, (step + 1) / 20)
    for group in opt.param_groups:
        group["lr"] = base * warm * 0.5 * (1 + math.cos(math.pi * step / total))


def train_denoiser(model: Denoiser, side: int, scale: float, steps: int, cfg: ToyConfig, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for step in range(steps):
        img, labels = shapes(cfg.batch, side, A_COLOURS, g)
        _cosine_lr(opt, cfg.lr, step, steps)
        loss = model.loss(img * scale, _labels(labels, cfg.label_dropout, g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)


def lora_modules(model: Denoiser) -> dict[str, nn.Module]:
    """{path under diffusion_model: module} of every Conv2d / Linear the LoRA adapts."""
    return {name: m for name, m in model.diffusion_model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def kohya_key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def train_lora(base: Denoiser, cfg: ToyConfig, seed: int) -> dict[str, torch.Tensor]:
    """A rank-r LoRA on the frozen base, trained on A' (16x16). Forward: W + up @ down (alpha = rank), run
    with torch.func.functional_call (LoraAdapter merges without gradients). Returns the kohya state dict."""
    g = torch.Generator().manual_seed(seed)
    rank = cfg.lora_rank
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, m in lora_modules(base).items():
        w = m.weight
        fan_in = math.prod(w.shape[1:])
        down = (torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(fan_in)).requires_grad_()
        up = torch.zeros(w.shape[0], rank, *([1] * (w.dim() - 2)), requires_grad=True)
        factors[path] = (down, up)
    opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=cfg.lora_lr)
    weights = {name: p for name, p in base.diffusion_model.named_parameters()}

    def params() -> dict[str, torch.Tensor]:
        merged = dict(weights)
        for path, (down, up) in factors.items():
            w = weights[f"{path}.weight"]
            merged[f"{path}.weight"] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        return merged

    def export() -> dict[str, torch.Tensor]:
        sd = {}
        for path, (down, up) in factors.items():
            sd[f"{kohya_key(path)}.lora_down.weight"] = down.detach().clone()
            sd[f"{kohya_key(path)}.lora_up.weight"] = up.detach().clone()
            sd[f"{kohya_key(path)}.alpha"] = torch.tensor(float(rank))
        return sd

    for step in range(cfg.lora_steps):
        img, labels = shapes(cfg.batch, 16, A2_COLOURS, g)
        _cosine_lr(opt, cfg.lora_lr, step, cfg.lora_steps)
        loss = base.loss(img, _labels(labels, cfg.label_dropout, g), g, params())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return export()


def _setup_process() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def train_target(cfg: ToyConfig) -> tuple[dict[str, torch.Tensor], float]:
    """(target state dict, seconds); runs in the second process."""
    _setup_process()
    t = time.perf_counter()
    torch.manual_seed(cfg.seed + 3)
    target = make_target(cfg)
    train_denoiser(target, 32, cfg.target_scale, cfg.target_steps, cfg, cfg.seed + 3)
    return target.state_dict(), time.perf_counter() - t


def train_all(cfg: ToyConfig, parallel: bool = True) -> Trained:
    """Base and LoRA here, the target in a second process (or here, after them, with parallel=False)."""
    _setup_process()
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if parallel else None
    try:
        pending = pool.submit(train_target, cfg) if pool is not None else None
        seconds = {}
        t = time.perf_counter()
        torch.manual_seed(cfg.seed + 1)
        base = make_base(cfg)
        train_denoiser(base, 16, 1.0, cfg.base_steps, cfg, cfg.seed + 1)
        seconds["base"] = time.perf_counter() - t
        t = time.perf_counter()
        lora = train_lora(base, cfg, cfg.seed + 2)
        seconds["lora"] = time.perf_counter() - t
        state, seconds["target"] = pending.result() if pending is not None else train_target(cfg)
    finally:
        if pool is not None:
            pool.shutdown()
    target = make_target(cfg)
    target.load_state_dict(state)
    target.eval().requires_grad_(False)
    return Trained(base, target, lora, seconds)


def load_or_train(cfg: ToyConfig, cache: Path, retrain: bool = False, parallel: bool = True) -> tuple[Trained, bool]:
    """(models, whether they came from the cache). The cache holds one entry per config hash."""
    entries = torch.load(cache, weights_only=True) if cache.exists() else {}
    key = cfg.key()
    if key in entries and not retrain:
        e = entries[key]
        base, target = make_base(cfg), make_target(cfg)
        base.load_state_dict(e["base"])
        target.load_state_dict(e["target"])
        for m in (base, target):
            m.eval().requires_grad_(False)
        return Trained(base, target, e["lora"], {}), True
    trained = train_all(cfg, parallel)
    entries[key] = {"base": trained.base.state_dict(), "target": trained.target.state_dict(), "lora": trained.lora}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(entries, cache)
    return trained, False
