"""Noise levels the source never saw, and sources on a target with another schedule (VP <-> rectified flow),
through the real k-diffusion Euler loop with analytic Gaussian denoisers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from gaussian import SHAPE, TAU, MiniCFGDenoiser, gaussian_model, make_pair, plain_conds
from k_diffusion import sampling

from lib_delta import latent
from lib_delta.delta import DeltaRun, StepInput
from lib_delta.source import Branch, CfgSourcePair
from lib_delta.spec import DeltaSettings

CFG = 5.0
SD15_SIGMA_MAX = 14.6
ZTSNR_SIGMA_MAX = 4500.0


def means(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))


MU_T, MU_B, MU_A = means(11), means(12), means(13)


def settings(lam: float) -> DeltaSettings:
    return DeltaSettings(enabled=True, source="src", adapter="a", strength=lam)


def eps_model_trained_up_to(mean_cond, mean_uncond, sigma_max: float):
    """An eps network that never saw noise above sigma_max: its noise estimate is the one for sigma_max,
    and x0 = x - sigma * eps multiplies that error by sigma (the measured 307x inflation)."""
    exact = gaussian_model(mean_cond, mean_uncond)

    def model_fn(x, sigma, cond):
        seen = sigma.clamp(max=sigma_max)
        eps = (x - exact(x, seen, cond)) / seen.reshape(-1, 1, 1, 1)
        return x - sigma.reshape(-1, 1, 1, 1) * eps

    return model_fn


def flow_gaussian_model(mean_cond, mean_uncond, tau: float = TAU):
    """x0 prediction of data ~ N(mean, tau^2) under rectified flow x = (1 - s) x0 + s eps."""

    def model_fn(x, s, cond):
        flag = cond.reshape(-1, 1, 1, 1).to(x.dtype)
        mean = flag * mean_cond + (1 - flag) * mean_uncond
        s = s.reshape(-1, 1, 1, 1)
        gain = (1 - s) * tau**2 / ((1 - s) ** 2 * tau**2 + s**2)
        return mean + gain * (x - (1 - s) * mean)

    return model_fn


def pair_of(model_factory, fmt=latent.SD1, sigma_max=math.inf) -> CfgSourcePair:
    zeros = torch.zeros_like(MU_B)
    base = Branch(model_factory(MU_B, zeros), plain_conds(SHAPE[0]))
    adapted = Branch(model_factory(MU_A, zeros), plain_conds(SHAPE[0]))
    return CfgSourcePair(fmt, base, adapted, CFG, sigma_max=sigma_max)


def sample(target_model, sigmas, pair=None, target_format=latent.SD1, lam=1.0):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    run = DeltaRun(settings(lam), pair, target_format) if pair is not None else None
    den = MiniCFGDenoiser(target_model, CFG, run, len(sigmas) - 1)
    start = noise * sigmas[0] if target_format.family == "vp" else noise
    return sampling.sample_euler(den, start, sigmas, disable=True), run


def one_step_delta(pair, sigma: float, target_format=latent.SD1) -> torch.Tensor:
    x0 = MU_T.expand(SHAPE).clone()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    x = x0 + sigma * noise if target_format.family == "vp" else (1 - sigma) * x0 + sigma * noise
    run = DeltaRun(settings(1.0), pair, target_format)
    run.capture(StepInput(x, torch.full((SHAPE[0],), sigma), 0, 0.0))
    return run.apply(x0) - x0


def test_above_the_sources_sigma_max_delta_is_not_inflated():
    """A zero-terminal-SNR target at sigma 4500 with a source trained up to 14.6."""
    true_delta = CFG * (MU_A - MU_B)  # the exact Gaussian denoisers' delta at any sigma >> tau
    raw = one_step_delta(pair_of(lambda c, u: eps_model_trained_up_to(c, u, SD15_SIGMA_MAX)), ZTSNR_SIGMA_MAX)
    renoised = one_step_delta(pair_of(lambda c, u: eps_model_trained_up_to(c, u, SD15_SIGMA_MAX),
                                      sigma_max=SD15_SIGMA_MAX), ZTSNR_SIGMA_MAX)
    inflation = (raw.abs().mean() / true_delta.abs().mean()).item()
    assert inflation > 250  # what happens without the rule (4500 / 14.6 = 308)
    expected = true_delta.expand(SHAPE) * (1 - TAU**2 / (TAU**2 + SD15_SIGMA_MAX**2))  # the delta at 14.6
    torch.testing.assert_close(renoised, expected, rtol=1e-4, atol=1e-4)


def test_ztsnr_sampling_with_a_limited_source_matches_an_exact_source():
    """Whole Euler run from sigma 4500: the re-noised limited source gives what an ideal source gives."""
    sigmas = sampling.get_sigmas_karras(10, 0.03, ZTSNR_SIGMA_MAX)
    target = gaussian_model(MU_T, torch.zeros_like(MU_T))
    limited = pair_of(lambda c, u: eps_model_trained_up_to(c, u, SD15_SIGMA_MAX), sigma_max=SD15_SIGMA_MAX)
    ideal, _ = sample(target, sigmas, pair_of(gaussian_model))
    with_limit, run = sample(target, sigmas, limited)
    off, _ = sample(target, sigmas)
    shift = (with_limit - off).mean().item()
    torch.testing.assert_close(with_limit, ideal, rtol=1e-3, atol=1e-3)  # the delta at 14.6 is 0.3% smaller
    assert abs(shift) > 0.1 and run.applied_steps == 10


def test_in_range_the_limit_changes_nothing():
    sigmas = sampling.get_sigmas_karras(8, 0.03, 10.0)
    target = gaussian_model(MU_T, torch.zeros_like(MU_T))
    unlimited, _ = sample(target, sigmas, pair_of(gaussian_model))
    limited, _ = sample(target, sigmas, pair_of(gaussian_model, sigma_max=SD15_SIGMA_MAX))
    assert torch.equal(unlimited, limited)


RF_SDXL = latent.SDXL.as_flow()


@pytest.mark.parametrize("source_format", [latent.SD1, latent.SDXL])
def test_vp_source_on_a_rectified_flow_target_equals_a_flow_source(source_format):
    """x = (1-s) x0 + s eps is x0 + sigma eps scaled by 1-s with sigma = s/(1-s): an eps/v source sees the
    same state at the same SNR, so its delta equals that of the same data under flow."""
    flows = torch.linspace(0.9, 0.0, 9)  # VP sigma up to 9, inside the source's range
    target = flow_gaussian_model(MU_T, torch.zeros_like(MU_T))
    via_vp, run = sample(target, flows, pair_of(gaussian_model, source_format, SD15_SIGMA_MAX), RF_SDXL)
    if source_format == latent.SDXL:
        via_flow, _ = sample(target, flows, pair_of(flow_gaussian_model, RF_SDXL), RF_SDXL)
        torch.testing.assert_close(via_vp, via_flow, rtol=1e-5, atol=1e-4)
    off, _ = sample(target, flows, None, RF_SDXL)
    assert run.applied_steps == 8 and (via_vp - off).abs().mean() > 0.1


def test_flow_target_first_step_at_pure_noise_is_finite():
    flows = torch.linspace(1.0, 0.0, 9)
    target = flow_gaussian_model(MU_T, torch.zeros_like(MU_T))
    out, _ = sample(target, flows, pair_of(gaussian_model, sigma_max=SD15_SIGMA_MAX), RF_SDXL)
    assert torch.isfinite(out).all()


def test_flow_source_on_a_vp_target_equals_a_vp_source():
    sigmas = sampling.get_sigmas_karras(8, 0.03, 14.0)
    target = gaussian_model(MU_T, torch.zeros_like(MU_T))
    via_flow, _ = sample(target, sigmas, pair_of(flow_gaussian_model, RF_SDXL))
    via_vp, _ = sample(target, sigmas, pair_of(gaussian_model, latent.SDXL))
    torch.testing.assert_close(via_flow, via_vp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("src", "tgt"),
    [(latent.SD1, latent.FLUX), (latent.FLUX, latent.WAN21), (latent.WAN21, latent.WAN_VIDEO),
     (latent.FLUX, latent.SD3), (latent.FLUX2, latent.FLUX)],
)
def test_pairs_of_different_vaes_are_refused_naming_both_models(src, tgt):
    with pytest.raises(Exception, match=r"cannot pair the .* source 'my_source' .* target 'my_target'"):
        DeltaRun(settings(1.0), replace(make_pair(MU_B, MU_A, CFG, fmt=src), title="my_source"), tgt,
                 target_title="my_target")
