"""reForge / Forge Classic glue on fake ldm_patched APIs: the same post-CFG patch as Forge, sources from
load_model_for_a1111, LoRA as a second copy patched by load_lora_for_models, identities and release."""

from __future__ import annotations

import gc
import weakref

import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_a1111_sampling import PROMPT, ds, generate
from test_forge import assert_host_clean, generate_calling_the_hook_twice

from lib_delta import DeltaError


def native_lora(host, path: str) -> None:
    """What these forks' Lora extension does for <lora:...>: load_lora_for_models on the active model."""
    from ldm_patched.modules.sd import load_lora_for_models

    engine = host.shared.sd_model
    objects = engine.forge_objects_original.shallow_copy()
    objects.unet, objects.clip = load_lora_for_models(objects.unet, objects.clip, safetensors.torch.load_file(path),
                                                      1.0, 1.0, path)
    engine.forge_objects_after_applying_lora = objects


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_lambda_zero_and_base_equals_adapted_are_bit_identical(ldm_patched, sampler):
    off, _, _ = generate(ldm_patched, sampler_name=sampler)
    zero, _, processed = generate(ldm_patched, ds(strength=0.0), sampler_name=sampler)
    same, _, _ = generate(ldm_patched, ds(strength=3.0, adapted_prompt=PROMPT), sampler_name=sampler)
    assert torch.equal(off, zero) and torch.equal(off, same)
    assert "Delta Sampling" in processed.infotexts[0] and ldm_patched.processing.script_errors == []
    assert_host_clean(ldm_patched)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_source_equals_target_lora_at_lambda_one_equals_native_lora(ldm_patched, sampler):
    path = write_lora(ldm_patched)
    plain, _, _ = generate(ldm_patched, sampler_name=sampler)
    on, _, _ = generate(ldm_patched, lora_ds(strength=1.0), sampler_name=sampler)
    assert_host_clean(ldm_patched)
    native_lora(ldm_patched, path)
    native, _, _ = generate(ldm_patched, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-5, atol=1e-5)
    assert (native - plain).abs().mean() > 1e-3


def test_two_copies_load_with_the_target_and_are_released(ldm_patched):
    write_lora(ldm_patched)
    generate(ldm_patched, lora_ds(strength=1.0))
    source = next(iter(ldm_patched.generation.CACHE.entries.values()))
    patchers = source.patchers()
    assert len(patchers) == 2 and len(ldm_patched.loader.loads) == 2  # base + LoRA copy
    assert all(any(m.model is p for m in ldm_patched.memory.current_loaded_models) for p in patchers)
    refs = [weakref.ref(p.model) for p in patchers]
    del source, patchers
    generate(ldm_patched)  # DS off: cached, off the device
    ldm_patched.generation.free_sources()
    gc.collect()
    assert ldm_patched.generation.CACHE.entries == {} and all(r() is None for r in refs)


def test_hook_called_twice_never_applies_ds_twice(ldm_patched):
    once, _, _ = generate(ldm_patched, ds(strength=2.0))
    assert torch.equal(once, generate_calling_the_hook_twice(ldm_patched, ds(strength=2.0)))


def test_wrong_architecture_lora_and_missing_source_fail_clearly(ldm_patched, tmp_path):
    path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({f"lora_unet_x{i}.lora_up.weight": torch.zeros(2, 2) for i in range(13)}, str(path))
    ldm_patched.networks.register("wrong", str(path), shorthash="000000000009")
    with pytest.raises(DeltaError, match="does not fit the source"):
        generate(ldm_patched, ds(adapter_kind="lora", adapter="wrong", adapted_prompt=""))
    with pytest.raises(DeltaError, match="was not found"):
        generate(ldm_patched, ds(source="nope"))
    assert_host_clean(ldm_patched)
