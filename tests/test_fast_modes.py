"""Fast DS and adaptive strength: what is exact stays exact, what is a shortcut does what it says.

The batched pair runs through a real LoRA on a real (tiny) LDM and the k-diffusion Euler loop; the cap,
auto strength, delta reuse and the native-size source run through the Gaussian identities.
"""

from __future__ import annotations

import math

import pytest
import torch
from gaussian import SHAPE, MiniCFGDenoiser, gaussian_model, make_pair, plain_conds, sample_k, total_calls
from k_diffusion import external, sampling
from tinyldm import TinyLDM

from lib_delta import DeltaError, latent
from lib_delta.delta import DeltaRun, StepInput
from lib_delta.lora import LoraAdapter
from lib_delta.schedules import progress_from_calls
from lib_delta.source import Branch, CfgSourcePair
from lib_delta.spec import PRESETS, DeltaSettings

CFG = 5.0


def settings(lam: float = 1.0, **kw) -> DeltaSettings:
    return DeltaSettings(enabled=True, source="src", adapter="a", strength=lam, **kw)


def custom(batched: bool = False, cond_only: bool = False, reuse: float = 1.0, native_size: bool = False,
           **kw) -> DeltaSettings:
    return settings(speed="custom", batched=batched, cond_only=cond_only, reuse=reuse, native_size=native_size, **kw)


# -- the batched pair on a real LoRA -------------------------------------------------------------
def lora_for(model: torch.nn.Module, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "diffusion_model" in name:
            key = "lora_unet_" + name.split("diffusion_model.", 1)[1].replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.2
    return sd


def ldm_branch(model, prompts, negatives, **kw) -> Branch:
    den = external.CompVisDenoiser(model)
    c, u = model.get_learned_conditioning(prompts), model.get_learned_conditioning(negatives)
    conds_list = [[(i, 1.0)] for i in range(len(prompts))]
    return Branch(lambda x, s, cond: den(x, s, cond={"c_crossattn": [cond]}), lambda step: (conds_list, c, u), **kw)


@pytest.fixture(scope="module")
def ldm():
    torch.manual_seed(0)
    return TinyLDM(seed=3).eval(), TinyLDM(seed=4).eval()


def counting(branch: Branch, calls: list[int]) -> Branch:
    fn = branch.model_fn

    def model_fn(x, s, c):
        calls.append(x.shape[0])
        return fn(x, s, c)

    branch.model_fn = model_fn
    return branch


def lora_pair(source, prompts=("a fox", "a cat")) -> tuple[CfgSourcePair, list[int]]:
    adapter = LoraAdapter.from_state_dict(lora_for(source), source, 1.0)
    base = ldm_branch(source, list(prompts), ["", ""])
    adapted = Branch(base.model_fn, base.conds_at, adapter.enabled, adapter.rows)
    calls: list[int] = []
    counting(base, calls)
    adapted.model_fn = base.model_fn
    return CfgSourcePair(latent.SD1, base, adapted, CFG), calls


def prompt_pair(source) -> tuple[CfgSourcePair, list[int]]:
    base = ldm_branch(source, ["a fox", "a cat"], ["blurry", "blurry"])
    adapted = ldm_branch(source, ["a fox, pixel art", "a cat, pixel art"], ["blurry", "blurry"])
    calls: list[int] = []
    counting(base, calls)
    adapted.model_fn = base.model_fn
    return CfgSourcePair(latent.SD1, base, adapted, CFG, shares_uncond=True), calls


def sample_ldm(target, run: DeltaRun | None, steps: int = 6, sampler=sampling.sample_euler) -> torch.Tensor:
    tb = ldm_branch(target, ["a fox", "a cat"], ["", ""])
    calls = [0]

    def denoise(x, sigma):
        if run is not None:
            run.capture(StepInput(x, sigma, calls[0], progress_from_calls(calls[0], run.total)))
        rows = tb.rows(x, sigma, calls[0], uncond=True)
        out = rows.run(tb.model_fn)
        d = rows.combine(out, CFG)
        calls[0] += 1
        return run.apply(d, out[-x.shape[0]:]) if run is not None else d

    sigmas = external.CompVisDenoiser(target).get_sigmas(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    return sampler(denoise, x, sigmas, disable=True)


def ds_run(s: DeltaSettings, pair, total: int = 6) -> DeltaRun:
    run = DeltaRun(s, pair, latent.SD1)
    run.total = total
    return run


@pytest.mark.parametrize("make", [lora_pair, prompt_pair], ids=["lora", "prompt"])
def test_batched_pair_equals_separate_passes_through_a_sampler(ldm, make):
    target, source = ldm
    with torch.no_grad():
        pair, calls = make(source)
        separate = sample_ldm(target, ds_run(custom(batched=False), pair))
        separate_calls = list(calls)
        calls.clear()
        batched = sample_ldm(target, ds_run(settings(), pair))  # `exact` batches
        plain = sample_ldm(target, None)
    assert PRESETS["exact"]["batched"] is True
    assert torch.equal(batched, separate), float((batched - separate).abs().max())
    assert float((batched - plain).abs().max()) > 1e-2  # the delta is not nothing
    assert len(calls) == len(separate_calls) // 2  # one call per step instead of two
    shared_uncond = make is prompt_pair
    assert calls[0] == (6 if shared_uncond else 8)  # rows: cond x2 + cond x2 + uncond x2 (+ adapted uncond x2)


def test_batched_lora_leaves_the_model_as_it_was(ldm):
    _, source = ldm
    before = {k: v.clone() for k, v in source.state_dict().items()}
    pair, _ = lora_pair(source)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"), pair.adapted.rows_context(4):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in source.modules())
    with torch.no_grad():
        pair.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=True)
    assert all("forward" not in m.__dict__ for m in source.modules())
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())


def test_prompts_of_different_lengths_fall_back_to_separate_passes(ldm):
    _, source = ldm
    pair, calls = lora_pair(source, prompts=("a fox " * 60, "a cat " * 60))  # 2 chunks vs 1-chunk negatives
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    with torch.no_grad():
        batched = pair.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=True)
        separate = pair.denoise_pair(x, sigma, step=0, skip_uncond=False, batched=False)
    assert all(torch.equal(a, b) for a, b in zip(batched, separate, strict=True))


def test_cond_only_is_exact_for_a_prompt_adapter(ldm):
    """One model and one negative prompt: CFG'd delta = scale x cond delta, without any uncond pass."""
    target, source = ldm
    with torch.no_grad():
        pair, calls = prompt_pair(source)
        exact = sample_ldm(target, ds_run(custom(batched=True), pair))
        calls.clear()
        fast = sample_ldm(target, ds_run(custom(batched=True, cond_only=True), pair))
    assert calls[0] == 4  # the two cond rows of each side, no uncond
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)  # float rounding of the CFG algebra


MU_T = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(9))


# -- delta reuse --------------------------------------------------------------------------------
def gaussian_run(s: DeltaSettings, name: str = "euler", pair=None, mu_t=None, steps: int = 8):
    mu_t = MU_T if mu_t is None else mu_t
    pair = pair or make_pair(torch.zeros(SHAPE[1:]), torch.full(SHAPE[1:], 0.5), CFG)
    run = DeltaRun(s, pair, latent.SD1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    den = MiniCFGDenoiser(gaussian_model(mu_t, torch.zeros_like(mu_t)), CFG, run, total_calls(name, steps))
    return sample_k(name, den, noise, steps), run


@pytest.mark.parametrize("name,every", [("euler", 2), ("heun", 2), ("dpmpp_2m", 3)])
def test_delta_reuse_computes_one_delta_per_k_model_calls(name, every):
    exact, run_exact = gaussian_run(settings(), name)
    reused, run = gaussian_run(custom(reuse=every), name)
    assert run.applied_steps == run_exact.applied_steps
    assert run.source_calls == math.ceil(run_exact.source_calls / every)
    effect = float((exact - gaussian_run(settings(0.0), name)[0]).norm())
    assert float((reused - exact).norm()) < 0.2 * effect  # 8 steps: 0.08-0.19 (reused as a noise difference)


def test_reuse_one_is_exact():
    exact, _ = gaussian_run(settings())
    assert torch.equal(gaussian_run(custom(reuse=1.0, batched=True))[0], exact)


# -- cap and auto strength ----------------------------------------------------------------------
def test_a_cap_that_is_not_reached_changes_nothing():
    off, _ = gaussian_run(settings(2.0))
    capped, run = gaussian_run(settings(2.0, cap=10.0))
    assert torch.equal(capped, off) and run.guidance is not None


def test_a_reached_cap_bounds_the_update_by_the_target_guidance():
    pair = make_pair(torch.zeros(SHAPE[1:]), torch.full(SHAPE[1:], 3.0), CFG)
    run = DeltaRun(settings(4.0, cap=0.5), pair, latent.SD1)
    x, sigma = torch.randn(SHAPE) * 2, torch.full((SHAPE[0],), 2.0)
    x0, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
    run.capture(StepInput(x, sigma, 0, 0.5))
    update = run.apply(x0, uncond) - x0
    rms = update.flatten(1).pow(2).mean(1).sqrt()
    guidance = (x0 - uncond).flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, 0.5 * guidance)


def test_auto_strength_at_zero_is_off():
    off, _ = gaussian_run(settings(0.0))
    auto, run = gaussian_run(settings(0.0, strength_mode="auto"))
    assert torch.equal(auto, off) and run.applied_steps == 0


def test_auto_strength_gives_one_effect_for_pairs_of_different_strength():
    """Fixed lambda: the shift follows each pair's delta (1x vs 4x). Auto: both move the same amount."""
    mu_t = MU_T
    direction = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(5))
    weak = make_pair(torch.zeros(SHAPE[1:]), 0.25 * direction, CFG)
    strong = make_pair(torch.zeros(SHAPE[1:]), 1.0 * direction, CFG)
    plain, _ = gaussian_run(settings(0.0), mu_t=mu_t)

    def shift(s, pair):
        return float((gaussian_run(s, pair=pair, mu_t=mu_t)[0] - plain).mean(0).norm())

    fixed = shift(settings(1.0), strong) / shift(settings(1.0), weak)
    auto = shift(settings(0.5, strength_mode="auto"), strong) / shift(settings(0.5, strength_mode="auto"), weak)
    assert fixed == pytest.approx(4.0, rel=0.02)
    assert auto == pytest.approx(1.0, abs=0.02)


def test_auto_strength_without_target_guidance_is_a_clear_error():
    pair = make_pair(torch.zeros(SHAPE[1:]), torch.ones(SHAPE[1:]), CFG)
    run = DeltaRun(settings(1.0, strength_mode="auto"), pair, latent.SD1)
    run.capture(StepInput(torch.randn(SHAPE), torch.full((SHAPE[0],), 2.0), 0, 0.5))
    with pytest.raises(DeltaError, match="auto strength"):
        run.apply(torch.randn(SHAPE), None)


# -- native-size source -------------------------------------------------------------------------
def test_native_size_keeps_aspect_and_area():
    assert latent.native_size(latent.SD1, (128, 128)) == (64, 64)  # SD1.5 under 1024 px SDXL
    assert latent.native_size(latent.SD1, (96, 160)) == (48, 80)
    assert latent.native_size(latent.SD1, (64, 64)) is None and latent.native_size(latent.SDXL, (128, 128)) is None


def test_a_constant_field_survives_the_round_trip_exactly():
    c = torch.full((1, 4, 96, 160), 0.7)
    x, x0 = latent.downsample_state(c, c, torch.tensor([1.5]), "vp", (48, 88))
    assert torch.equal(x0, torch.full((1, 4, 48, 88), 0.7)) and torch.equal(x, x0)
    assert torch.equal(latent.upsample(torch.full((1, 4, 48, 88), -0.3), (96, 160)), torch.full((1, 4, 96, 160), -0.3))


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (100, 70)])
def test_downsampled_noise_keeps_unit_variance(size):
    """sigma stays the noise level: averaging n pixels divides the variance by n, the rescale puts it back."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 2 * size[0] + 5, 2 * size[1] - 3, generator=g)
    x0 = torch.zeros_like(noise)
    x, _ = latent.downsample_state(x0 + 2.0 * noise, x0, torch.full((4,), 2.0), "vp", size)
    assert float((x / 2.0).std()) == pytest.approx(1.0, abs=0.02)


def test_native_size_source_runs_small_and_gives_the_full_size_delta():
    """A pair whose delta is spatially constant: the small source gives the same delta, at a quarter the area."""
    shapes = []
    big = (2, 4, 128, 128)
    base_fn = gaussian_model(torch.zeros(4, 1, 1), torch.zeros(4, 1, 1))
    adapted_fn = gaussian_model(torch.full((4, 1, 1), 0.5), torch.zeros(4, 1, 1))

    def recording(fn):
        return lambda x, s, c: shapes.append(tuple(x.shape[-2:])) or fn(x, s, c)

    pair = CfgSourcePair(latent.SD1, Branch(recording(base_fn), plain_conds(2)),
                         Branch(recording(adapted_fn), plain_conds(2)), CFG)
    x, sigma = torch.randn(big, generator=torch.Generator().manual_seed(1)), torch.full((2,), 0.5)
    x0 = torch.full(big, 0.1)
    deltas = {}
    for native in (False, True):
        run = DeltaRun(custom(native_size=native), pair, latent.SD1)
        run.capture(StepInput(x, sigma, 0, 0.5))
        deltas[native] = run.apply(x0, torch.zeros(big)) - x0
    assert shapes == [(128, 128), (128, 128), (64, 64), (64, 64)]
    assert deltas[True].shape == big
    torch.testing.assert_close(deltas[True], deltas[False], rtol=1e-5, atol=1e-5)
