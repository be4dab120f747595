"""Analytic Gaussian denoisers and a minimal A1111-ordered CFG loop for core tests."""

from __future__ import annotations

import torch
from k_diffusion import sampling

from lib_delta import latent
from lib_delta.delta import DeltaRun, StepInput, combine_cfg
from lib_delta.schedules import progress_from_calls
from lib_delta.source import Branch, CfgSourcePair

SHAPE = (2, 4, 4, 4)
TAU = 0.8


def gaussian_model(mean_cond: torch.Tensor, mean_uncond: torch.Tensor, tau: float = TAU):
    """x0 prediction of data ~ N(mean, tau^2 I): mean + tau^2/(tau^2+sigma^2) (x - mean).

    The cond rows carry a scalar 1.0 (cond) or 0.0 (uncond) that picks the mean.
    """

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        flag = cond.reshape(-1, 1, 1, 1).to(x.dtype)
        mean = flag * mean_cond + (1 - flag) * mean_uncond
        k = (tau**2 / (tau**2 + sigma**2)).reshape(-1, 1, 1, 1)
        return mean + k * (x - mean)

    return model_fn


def plain_conds(batch: int):
    conds_list = [[(i, 1.0)] for i in range(batch)]
    return lambda step: (conds_list, torch.ones(batch, 1), torch.zeros(batch, 1))


def make_pair(mean_base, mean_adapted, cfg: float, fmt=latent.SD1, uncond_mean=None) -> CfgSourcePair:
    uncond = torch.zeros_like(mean_base) if uncond_mean is None else uncond_mean
    batch = SHAPE[0]
    base = Branch(gaussian_model(mean_base, uncond), plain_conds(batch))
    adapted = Branch(gaussian_model(mean_adapted, uncond), plain_conds(batch))
    return CfgSourcePair(fmt, base, adapted, cfg)


class MiniCFGDenoiser(torch.nn.Module):
    """k-diffusion model wrapper with A1111's CFG order: capture -> model -> CFG -> apply delta."""

    def __init__(self, model_fn, cfg: float, run: DeltaRun | None, total_calls: int, eps_alphas=None):
        super().__init__()
        self.model_fn, self.cfg, self.run, self.total = model_fn, cfg, run, total_calls
        self.eps_alphas = eps_alphas  # timestep mode: model returns eps, sigma is a timestep
        self.step = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        conds_list, cond, uncond = plain_conds(batch)(self.step)
        if self.run is not None:
            self.run.capture(StepInput(x, sigma, self.step, progress_from_calls(self.step, self.total)))
        x_in, s_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        if self.eps_alphas is not None:  # eps model: x is DDPM-scaled, sigma an integer timestep
            a = self.eps_alphas[s_in.long()].reshape(-1, 1, 1, 1)
            ks = ((1 - a) / a).sqrt()
            x0 = self.model_fn(x_in / a.sqrt(), ks.flatten(), torch.cat([cond, uncond]))
            out = (x_in - a.sqrt() * x0) / (1 - a).sqrt()
        else:
            out = self.model_fn(x_in, s_in, torch.cat([cond, uncond]))
        denoised = combine_cfg(out, conds_list, self.cfg)
        if self.run is not None:
            denoised = self.run.apply(denoised, out[-batch:])
        self.step += 1
        return denoised


SAMPLERS = {
    "euler": (sampling.sample_euler, 1),
    "heun": (sampling.sample_heun, 2),
    "dpmpp_2m": (sampling.sample_dpmpp_2m, 1),
}


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(torch.float32)


def sample_k(name: str, denoiser: MiniCFGDenoiser, noise: torch.Tensor, steps: int = 8) -> torch.Tensor:
    fn, _ = SAMPLERS[name]
    sigmas = sampling.get_sigmas_karras(steps, 0.03, 14.6)
    return fn(denoiser, noise * sigmas[0], sigmas, disable=True)


def sample_ddim(denoiser: MiniCFGDenoiser, noise: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """DDIM (eta 0) over integer timesteps, the update of A1111's sd_samplers_timesteps_impl.ddim."""
    ac = denoiser.eps_alphas
    timesteps = torch.arange(1, 1000, 1000 // steps) + 1  # 1..., like A1111's ddim_timesteps + 1
    alphas = ac[timesteps].double()
    alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    x = noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = denoiser(x, timesteps[index].item() * ones)
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev) ** 0.5 * e_t
    return x


def total_calls(name: str, steps: int = 8) -> int:
    return SAMPLERS[name][1] * steps if name in SAMPLERS else steps
