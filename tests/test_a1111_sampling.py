"""A1111 glue through fake host modules: process -> CFG callbacks -> delta, identities and features."""

from __future__ import annotations

import pytest
import torch

from lib_delta.spec import DeltaSettings

SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M", "DDIM", "DDIM CFG++"]
PROMPT = "a red fox in snow"


def ds(**kw) -> DeltaSettings:
    base = {"enabled": True, "source": "sd15_a", "adapter_kind": "prompt", "adapted_prompt": "a blue fox in snow"}
    return DeltaSettings(**{**base, **kw})


def generate(webui, settings: DeltaSettings | None = None, **kw):
    args = tuple((settings or DeltaSettings()).to_args())
    kw = {"prompt": PROMPT, "negative_prompt": "blurry", **kw}
    p = webui.processing.StableDiffusionProcessing(scripts=[webui.script], script_args=args, **kw)
    processed = webui.processing.process_images(p)
    return torch.cat(processed.samples), p, processed


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_lambda_zero_is_bit_identical_to_ds_off(webui, sampler):
    off, _, _ = generate(webui, sampler_name=sampler)
    on, p, processed = generate(webui, ds(strength=0.0), sampler_name=sampler)
    assert torch.equal(off, on)
    assert "Delta Sampling" in processed.infotexts[0]
    assert webui.processing.script_errors == [] and webui.callbacks.reported == []


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_base_equals_adapted_is_bit_identical(webui, sampler):
    off, _, _ = generate(webui, sampler_name=sampler)
    on, _, _ = generate(webui, ds(adapted_prompt=PROMPT, strength=2.0), sampler_name=sampler)
    assert torch.equal(off, on)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_source_equals_target_prompt_adapter_reproduces_adapted_prompt(webui, sampler):
    """D_t(p) + 1*(D_s(p') - D_s(p)) with source == target is D_t(p'): the image of prompt p'."""
    native, _, _ = generate(webui, sampler_name=sampler, prompt="a blue fox in snow")
    on, _, _ = generate(webui, ds(strength=1.0), sampler_name=sampler)
    off, _, _ = generate(webui, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(off, native, atol=1e-3)


def test_ngms_and_skip_early_cfg_are_mirrored(webui):
    webui.shared.opts.skip_early_cond = 0.3
    native, _, _ = generate(webui, prompt="a blue fox in snow", s_min_uncond=5.0, steps=8)
    on, p, _ = generate(webui, ds(), s_min_uncond=5.0, steps=8)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    assert "NGMS" in p.extra_generation_params and "Skip Early CFG" in p.extra_generation_params


def test_batch_with_different_prompts_and_and_subprompts(webui):
    """Per-image base prompts (with AND and weights) must line up with the target's rows exactly."""
    prompts = ["a red fox AND snow:0.5", "a cat"]
    native, _, _ = generate(webui, prompts_list=["a blue fox in snow"] * 2, batch_size=2)
    on, _, _ = generate(webui, ds(), prompts_list=prompts, batch_size=2)
    off, _, _ = generate(webui, prompts_list=prompts, batch_size=2)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(off, native, atol=1e-3)


def test_prompt_placeholder_follows_each_image_of_a_batch(webui):
    """`{prompt}` in a DS prompt box is each image's own prompt (per-image prompts, wildcards): with
    source == target at lambda 1, image i is the native image of its own filled-in adapted prompt."""
    prompts = ["a red fox in snow", "a cat on a roof"]
    settings = ds(adapted_prompt="{prompt}, oil painting", strength=1.0)
    native, _, _ = generate(webui, prompts_list=[f"{t}, oil painting" for t in prompts], batch_size=2)
    on, _, _ = generate(webui, settings, prompts_list=prompts, batch_size=2)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    fixed, _, _ = generate(webui, ds(adapted_prompt="a red fox in snow, oil painting", strength=1.0),
                           prompts_list=prompts, batch_size=2)
    assert not torch.allclose(fixed[1], native[1], atol=1e-3)  # one prompt for the batch: image 2 is wrong


def test_batch_count_reuses_the_cached_source(webui):
    generate(webui, ds(), n_iter=2)
    generate(webui, ds())
    assert webui.loads == ["sd15_a [0000000001]"]


def test_img2img_inpainting_keeps_masked_pixels(webui):
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0  # 1 = keep
    out, _, _ = generate(webui, ds(strength=3.0), init_latent=init, mask=mask, nmask=1 - mask,
                         denoising_strength=0.75, steps=8)
    torch.testing.assert_close(out[..., :2], init[..., :2].expand_as(out[..., :2]), rtol=0, atol=1e-5)
    off, _, _ = generate(webui, init_latent=init, mask=mask, nmask=1 - mask, denoising_strength=0.75, steps=8)
    assert not torch.allclose(out[..., 2:], off[..., 2:], atol=1e-3)


def test_hires_fix_applies_delta_in_both_passes(webui, monkeypatch):
    runs = []
    original = webui.a1111.generation.DeltaRun

    class Recording(original):
        def __post_init__(self):
            super().__post_init__()
            runs.append(self)

    monkeypatch.setattr(webui.a1111.generation, "DeltaRun", Recording)
    generate(webui, ds(), enable_hr=True, steps=4)
    assert len(runs) == 2 and all(r.applied_steps > 0 for r in runs)
    runs.clear()
    generate(webui, ds(start=0.0, end=0.5), enable_hr=True, steps=4)
    assert [r.history[-1] for r in runs] == [0.0, 0.0]


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_checkpoint_adapter_at_lambda_one_reproduces_the_fine_tune(webui, sampler):
    """Source == target (sd15_a), adapter = sd15_b: D_a + (D_b' - D_a) is the fine-tune's own image."""
    from tinyldm import TinyLDM

    webui.shared.opts.data["delta_sampling_cache_size"] = 1  # both models must still stay for the generation
    on, _, processed = generate(webui, ds(adapter_kind="checkpoint", adapter="sd15_b", adapted_prompt=""),
                                sampler_name=sampler)
    assert webui.loads == ["sd15_a [0000000001]", "sd15_b [0000000002]"]
    webui.shared.sd_model = TinyLDM(seed=2).eval().requires_grad_(False)
    native, _, _ = generate(webui, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    assert "sd15_b [0000000002]" in processed.infotexts[0]["Delta Sampling"]
