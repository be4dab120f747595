"""Several DS units: target += sum_i lambda_i * delta_i, through real sampler loops.

Gaussian pairs make each delta independent of the state, so the identities are exact up to rounding: the
mean moves by the sum of lambda_i * (mu_a_i - mu_b), the result is linear in each lambda_i, and two units
equal the sum of their single-unit shifts. A base branch shared by units runs once per step.
"""

from __future__ import annotations

import pytest
import torch
from gaussian import (
    SHAPE,
    MiniCFGDenoiser,
    alphas_cumprod,
    gaussian_model,
    plain_conds,
    sample_ddim,
    sample_k,
    total_calls,
)
from test_fast_modes import CFG, ldm_branch, lora_for
from tinyldm import TinyLDM

from lib_delta import latent
from lib_delta.delta import DeltaRun, DeltaUnits
from lib_delta.lora import LoraAdapter
from lib_delta.source import BaseMemo, Branch, CfgSourcePair
from lib_delta.spec import DeltaSettings


def means(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(seed))


MU_T, MU_B, MU_A1, MU_A2 = means(11), means(12), means(13), means(14)


def unit(lam: float, **kw) -> DeltaSettings:
    return DeltaSettings(enabled=True, source="src", adapter="a", strength=lam, **kw)


def branch(mean: torch.Tensor, calls: list[str] | None = None, name: str = "", memo: BaseMemo | None = None) -> Branch:
    fn = gaussian_model(mean, torch.zeros_like(mean))

    def model_fn(x, sigma, cond):
        if calls is not None:
            calls.append(name)
        return fn(x, sigma, cond)

    return Branch(model_fn, plain_conds(SHAPE[0]), memo=memo)


def sample(name: str, units: list[tuple[DeltaSettings, CfgSourcePair]]) -> tuple[torch.Tensor, DeltaUnits | None]:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    alphas = alphas_cumprod() if name == "ddim" else None
    runs = DeltaUnits([DeltaRun(s, pair, latent.SD1, alphas_cumprod=alphas) for s, pair in units]) if units else None
    den = MiniCFGDenoiser(gaussian_model(MU_T, torch.zeros_like(MU_T)), CFG, runs, total_calls(name),
                          eps_alphas=alphas)
    return (sample_ddim(den, noise) if name == "ddim" else sample_k(name, den, noise)), runs


def pair(mean_adapted: torch.Tensor, base: Branch | None = None) -> CfgSourcePair:
    return CfgSourcePair(latent.SD1, base or branch(MU_B), branch(mean_adapted), CFG)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ddim"])
def test_two_units_move_the_mean_by_the_sum_of_their_deltas(name):
    lam1, lam2 = 1.3, -0.7
    two, _ = sample(name, [(unit(lam1), pair(MU_A1)), (unit(lam2), pair(MU_A2))])
    native, _ = sample(name, [])
    shifted = MU_T + lam1 * (MU_A1 - MU_B) + lam2 * (MU_A2 - MU_B)
    den = MiniCFGDenoiser(gaussian_model(shifted, torch.zeros_like(MU_T)), CFG, None, total_calls(name),
                          eps_alphas=alphas_cumprod() if name == "ddim" else None)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    expected = sample_ddim(den, noise) if name == "ddim" else sample_k(name, den, noise)
    torch.testing.assert_close(two, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(two, native, atol=0.1)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddim"])
def test_two_units_equal_the_sum_of_their_single_unit_shifts(name):
    off, _ = sample(name, [])
    one, _ = sample(name, [(unit(1.3), pair(MU_A1))])
    other, _ = sample(name, [(unit(-0.7, schedule="cosine"), pair(MU_A2))])
    both, runs = sample(name, [(unit(1.3), pair(MU_A1)), (unit(-0.7, schedule="cosine"), pair(MU_A2))])
    torch.testing.assert_close(both - off, (one - off) + (other - off), rtol=1e-4, atol=1e-4)
    assert all(r.applied_steps > 0 for r in runs.runs)


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_the_result_is_linear_in_each_lambda(name):
    def run(lam1: float) -> torch.Tensor:
        return sample(name, [(unit(lam1), pair(MU_A1)), (unit(0.9), pair(MU_A2))])[0]

    x0, x1, x3 = run(0.0), run(1.0), run(3.0)
    torch.testing.assert_close(x3 - x0, 3 * (x1 - x0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_a_unit_at_lambda_zero_adds_nothing_bit_for_bit(name):
    one, _ = sample(name, [(unit(1.3), pair(MU_A1))])
    with_zero, _ = sample(name, [(unit(1.3), pair(MU_A1)), (unit(0.0), pair(MU_A2))])
    assert torch.equal(one, with_zero)
    off, _ = sample(name, [])
    all_zero, _ = sample(name, [(unit(0.0), pair(MU_A1)), (unit(0.0), pair(MU_A2))])
    assert torch.equal(off, all_zero)


def test_a_shared_base_runs_once_per_step_and_changes_nothing():
    calls: list[str] = []
    memo = BaseMemo()
    base = branch(MU_B, calls, "base", memo)
    shared = [(unit(1.3), CfgSourcePair(latent.SD1, base, branch(MU_A1, calls, "a1"), CFG)),
              (unit(0.6), CfgSourcePair(latent.SD1, base, branch(MU_A2, calls, "a2"), CFG))]
    x_shared, _ = sample("euler", shared)
    assert calls.count("base") == 8 and calls.count("a1") == 8 and calls.count("a2") == 8  # N + 1 = 3 per step
    assert (memo.computed, memo.reused) == (8, 8)
    calls.clear()
    apart = [(unit(1.3), CfgSourcePair(latent.SD1, branch(MU_B, calls, "base"), branch(MU_A1), CFG)),
             (unit(0.6), CfgSourcePair(latent.SD1, branch(MU_B, calls, "base"), branch(MU_A2), CFG))]
    x_apart, _ = sample("euler", apart)
    assert calls.count("base") == 16  # 2N
    assert torch.equal(x_shared, x_apart)


def test_a_shared_base_is_not_reused_across_different_inputs():
    """Units with different windows or a different source CFG must not take each other's base."""
    memo = BaseMemo()
    calls: list[str] = []
    base = branch(MU_B, calls, "base", memo)
    units = [(unit(1.0), CfgSourcePair(latent.SD1, base, branch(MU_A1), CFG)),
             (unit(1.0, source_cfg=3.0), CfgSourcePair(latent.SD1, base, branch(MU_A2), 3.0))]
    sample("euler", units)
    assert memo.reused == 0 and calls.count("base") == 16


def test_a_shared_base_with_batched_lora_pairs_matches_separate_units():
    """Two LoRA units on one source: base + adapted rows batched for the first, the second reuses the base."""
    source = TinyLDM(seed=4).eval()
    prompts = ["a fox", "a cat"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    sigma = torch.tensor([2.0, 2.0])

    def lora_unit(seed_scale: float, base: Branch) -> CfgSourcePair:
        sd = {k: v * seed_scale for k, v in lora_for(source).items()}
        adapter = LoraAdapter.from_state_dict(sd, source, 1.0)
        return CfgSourcePair(latent.SD1, base, Branch(base.model_fn, base.conds_at, adapter.enabled, adapter.rows), CFG)

    rows: list[int] = []
    shared_base = ldm_branch(source, prompts, ["", ""], memo=BaseMemo())
    fn = shared_base.model_fn
    shared_base.model_fn = lambda x, s, c: rows.append(x.shape[0]) or fn(x, s, c)
    p1, p2 = lora_unit(1.0, shared_base), lora_unit(0.5, shared_base)
    with torch.no_grad():
        b1, a1 = p1.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=True)
        b2, a2 = p2.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=True)
        alone = lora_unit(0.5, ldm_branch(source, prompts, ["", ""]))
        b2_alone, a2_alone = alone.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=True)
    assert b2 is b1
    assert rows == [8, 4]  # unit 1: base + adapted rows (2 cond + 2 uncond each); unit 2: its adapted rows
    torch.testing.assert_close(b2, b2_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a2, a2_alone, rtol=1e-5, atol=1e-5)
