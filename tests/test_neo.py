"""Forge Neo glue through fake Neo backend files (tests/fake_neo): the shared Forge post-CFG patch on Neo's
ComfyUI-style patcher, online LoRA through Neo's weight functions, global flags, release, and the SDXL
variants Neo loads (v-prediction, zero terminal SNR, rectified flow) under an SD1.5 source."""

from __future__ import annotations

import gc
import weakref

import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import interrupt_at_call, lora_ds, write_lora
from test_a1111_sampling import PROMPT, ds, generate
from test_forge import assert_host_clean, generate_calling_the_hook_twice

from lib_delta import DeltaError

SAMPLERS = ["Euler", "Euler a", "DPM++ 2M"]


def assert_neo_clean(neo) -> None:
    """No DS patch on the target, and no weight function or cast flag left on any source or target layer."""
    assert_host_clean(neo)
    sources = [s.engine for s in neo.generation.CACHE.entries.values()]
    for engine in [neo.shared.sd_model, *sources]:
        for root in (engine.forge_objects.unet.model, engine.forge_objects.clip.cond_stage_model):
            for m in root.modules():
                assert not m.__dict__.get("weight_function") and not m.__dict__.get("bias_function")


def native_lora(neo, path: str, weight: float = 1.0) -> None:
    """What Neo's sd_forge_lora does for <lora:...>: offline patches on clones of the original objects."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    engine = neo.shared.sd_model
    objects = engine.forge_objects_original.shallow_copy()
    unet, clip = objects.unet.clone(), objects.clip.clone()
    unet_patches, rest = load_lora(safetensors.torch.load_file(path), model_lora_keys_unet(unet.model, {}))
    clip_patches, _ = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
    unet.add_patches(filename=path, patches=unet_patches, strength_patch=weight, online_mode=False)
    clip.add_patches(filename=path, patches=clip_patches, strength_patch=weight, online_mode=False)
    objects.unet, objects.clip = unet, clip
    engine.forge_objects_after_applying_lora = objects


def use_target(neo, name: str, state_dict: dict) -> None:
    """Make a checkpoint file `name` (Neo's loader reads markers from it) the active model."""
    path = neo.tmp / "models" / f"{name}.safetensors"
    safetensors.torch.save_file(state_dict, str(path))
    info = neo.sd_models.CheckpointInfo(str(path), f"{abs(hash(name)) % 10**10:010d}").register()
    neo.shared.sd_model = neo.loader.forge_loader(str(path))
    neo.shared.sd_model.sd_checkpoint_info = info


def sd15_weights(neo) -> dict:
    return safetensors.torch.load_file(neo.checkpoints["sd15_a"].filename)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_lambda_zero_and_base_equals_adapted_are_bit_identical(neo, sampler):
    off, _, _ = generate(neo, sampler_name=sampler)
    zero, _, processed = generate(neo, ds(strength=0.0), sampler_name=sampler)
    same, _, _ = generate(neo, ds(strength=3.0, adapted_prompt=PROMPT), sampler_name=sampler)
    on, _, _ = generate(neo, ds(strength=2.0), sampler_name=sampler)
    assert torch.equal(off, zero) and torch.equal(off, same) and (on - off).abs().mean() > 1e-3
    assert "Delta Sampling" in processed.infotexts[0] and neo.processing.script_errors == []
    assert_neo_clean(neo)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_source_equals_target_lora_at_lambda_one_equals_neos_own_lora(neo, sampler):
    path = write_lora(neo)
    plain, _, _ = generate(neo, sampler_name=sampler)
    on, _, processed = generate(neo, lora_ds(strength=1.0), sampler_name=sampler)
    assert processed.infotexts[0]["DS adapter"] == "style [000000000003]"
    assert_neo_clean(neo)
    native_lora(neo, path)
    native, _, _ = generate(neo, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-5, atol=1e-5)
    assert (native - plain).abs().mean() > 1e-3


def test_lora_switching_never_reloads_merges_or_moves_the_source(neo):
    """Both branches run on one module per step: no load(), no unpatch, weights untouched."""
    write_lora(neo)
    generate(neo, lora_ds(strength=1.0))
    source = next(iter(neo.generation.CACHE.entries.values()))
    unet, clip = source.unet.model, source.engine.forge_objects.clip.cond_stage_model
    before = {k: v.clone() for k, v in {**unet.state_dict(), **clip.state_dict()}.items()}
    counts = (unet.loads, unet.unpatches, clip.loads, clip.unpatches)
    calls = interrupt_at_call(neo, 10**9, neo.callbacks.on_cfg_denoiser)
    generate(neo, lora_ds(strength=1.0))
    # the text encoder is loaded once per encode (base, adapted) and unloaded after it; nothing per step
    assert len(calls) == 6 and (unet.loads, unet.unpatches, clip.loads, clip.unpatches) == (
        counts[0], counts[1], counts[2] + 2, counts[3] + 2)
    assert all(torch.equal(v, before[k]) for k, v in {**unet.state_dict(), **clip.state_dict()}.items())
    assert neo.loader.loads == [neo.checkpoints["sd15_a"].filename]  # loaded once, cached
    assert_neo_clean(neo)


def test_hook_called_twice_applies_ds_once(neo):
    once, _, _ = generate(neo, ds(strength=2.0))
    assert torch.equal(once, generate_calling_the_hook_twice(neo, ds(strength=2.0)))


def test_hires_pass_is_patched_and_cleaned(neo):
    kw = {"enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 3}
    off, _, _ = generate(neo, **kw)
    zero, _, _ = generate(neo, ds(strength=0.0), **kw)
    on, _, _ = generate(neo, ds(strength=2.0), **kw)
    assert torch.equal(off, zero) and (on - off).abs().mean() > 1e-3
    assert_neo_clean(neo)


def test_loading_a_source_leaves_the_targets_global_flags_alone(neo):
    flags, marker = neo.dynamic_args, torch.ones(1)
    flags.kontext, flags.concat_latent = True, marker
    references = flags.ref_latents
    references.append(marker)
    generate(neo, ds(strength=1.0, source="sd15_b"))  # Neo's loader resets and rewrites these
    assert flags.kontext is True and flags.concat_latent is marker
    assert flags.ref_latents is references and references == [marker]


def test_interrupts_and_errors_leave_no_patch_and_the_flags_unchanged(neo, monkeypatch):
    neo.dynamic_args.kontext = True
    calls = interrupt_at_call(neo, 3, neo.callbacks.on_cfg_denoiser)
    try:
        out, p, _ = generate(neo, lora_ds(strength=2.0) if write_lora(neo) else None)
    finally:
        neo.shared.state.interrupted = False
    assert torch.isfinite(out).all() and len(calls) == 3 and getattr(p, neo.generation.STATE_ATTR) is None
    assert_neo_clean(neo)
    source = next(iter(neo.generation.CACHE.entries.values()))
    monkeypatch.setattr(source, "model_fn", lambda x, s, c: torch.full_like(x, float("nan")))
    with pytest.raises(DeltaError, match="non-finite"):
        generate(neo, ds(strength=1.0))
    assert_neo_clean(neo) or neo.dynamic_args.kontext is True


def test_free_releases_the_source_with_neos_unload(neo):
    write_lora(neo)
    generate(neo, lora_ds(strength=1.0))
    source = next(iter(neo.generation.CACHE.entries.values()))
    assert any(m.model is source.unet for m in neo.memory.current_loaded_models)
    unet_module = weakref.ref(source.unet.model)
    clip_module = weakref.ref(source.engine.forge_objects.clip.cond_stage_model)
    del source
    generate(neo)  # DS off: cached, off the device
    neo.generation.free_sources()
    gc.collect()
    assert neo.generation.CACHE.entries == {}
    assert unet_module() is None and clip_module() is None
    assert all(m.model is None or m.model.model is not unet_module() for m in neo.memory.current_loaded_models)


VARIANTS = {  # SDXL files as Neo detects them: a v_pred key, a ztsnr key, 'rectified' in the path
    "sdxl_vpred": {"v_pred": torch.zeros(0)},
    "sdxl_vpred_ztsnr": {"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)},
    "sdxl_rectified": {},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd15_source_under_neos_sdxl_variants(neo, variant):
    use_target(neo, variant, {**sd15_weights(neo), **VARIANTS[variant]})
    fmt = neo.models.target_format(neo.shared.sd_model)
    assert fmt.vae == "sd" and fmt.scale == 0.13025 and fmt.family == ("flow" if "rectified" in variant else "vp")
    seen = []
    off, _, _ = generate(neo)
    zero, _, _ = generate(neo, ds(strength=0.0))
    source = next(iter(neo.generation.CACHE.entries.values()))
    original = source.model_fn
    source.model_fn = lambda x, s, c: seen.append(float(s.max())) or original(x, s, c)
    on, _, _ = generate(neo, ds(strength=2.0))
    assert torch.equal(off, zero) and torch.isfinite(on).all() and (on - off).abs().mean() > 1e-3
    assert source.sigma_max == pytest.approx(14.6146, abs=1e-3) and max(seen) <= source.sigma_max + 1e-4
    if variant != "sdxl_vpred":  # the target starts above the source's range: re-noised to its sigma_max
        assert max(seen) == pytest.approx(source.sigma_max)
    assert_neo_clean(neo)


def test_pairs_neo_cannot_map_are_refused_naming_both_models(neo):
    latent_class = type("Flux", (), {"latent_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159})
    neo.shared.sd_model.model_config.latent_format = latent_class
    with pytest.raises(DeltaError, match=r"cannot pair the SD1 source 'sd15_a .*' .* the Flux target 'sd15_a"):
        generate(neo, ds(strength=1.0))
    assert_neo_clean(neo)
