"""New-Forge glue through fake `backend` + `modules` (tests/fake_forge): the post-CFG patch, identities,
idempotent hooks, online LoRA through Forge's loader, errors, and memory release."""

from __future__ import annotations

import gc
import weakref

import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import interrupt_at_call, lora_ds, write_lora
from test_a1111_sampling import PROMPT, ds, generate

from lib_delta import DeltaError

SAMPLERS = ["Euler", "Euler a", "Heun", "DPM++ 2M"]


def ds_functions(unet) -> list:
    return [f for f in unet.model_options.get("sampler_post_cfg_function", []) if getattr(f, "delta_sampling", False)]


def assert_host_clean(forge) -> None:
    engine = forge.shared.sd_model
    for objects in (engine.forge_objects, engine.forge_objects_after_applying_lora, engine.forge_objects_original):
        assert ds_functions(objects.unet) == [] and objects.unet.extra_model_patchers_during_sampling == []
    assert not any(hasattr(m, "forge_online_loras") for m in engine.forge_objects.unet.model.modules())


def native_lora(forge, path: str, weight: float = 1.0) -> None:
    """What Forge's built-in Lora extension does for <lora:...>: patched clones as the after-LoRA objects."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    engine = forge.shared.sd_model
    objects = engine.forge_objects_original.shallow_copy()
    unet, clip = objects.unet.clone(), objects.clip.clone()
    unet_patches, rest = load_lora(safetensors.torch.load_file(path), model_lora_keys_unet(unet.model, {}))
    clip_patches, _ = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
    unet.add_patches(filename=path, patches=unet_patches, strength_patch=weight)
    clip.add_patches(filename=path, patches=clip_patches, strength_patch=weight)
    objects.unet, objects.clip = unet, clip
    engine.forge_objects_after_applying_lora = objects


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_lambda_zero_is_bit_identical_to_ds_off(forge, sampler):
    off, _, _ = generate(forge, sampler_name=sampler)
    on, _, processed = generate(forge, ds(strength=0.0), sampler_name=sampler)
    assert torch.equal(off, on)
    assert "Delta Sampling" in processed.infotexts[0] and forge.processing.script_errors == []
    assert_host_clean(forge)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_base_equals_adapted_is_bit_identical(forge, sampler):
    off, _, _ = generate(forge, sampler_name=sampler)
    on, p, _ = generate(forge, ds(strength=3.0, adapted_prompt=PROMPT), sampler_name=sampler)
    assert torch.equal(off, on)


def test_lambda_changes_the_image_and_is_applied_every_step(forge):
    off, _, _ = generate(forge)
    seen = []
    original = forge.adapter._post_cfg

    def spy(state, cfg):
        fn = original(state, cfg)

        def wrapped(args):
            seen.append(float(state.host["step"].progress))
            return fn(args)

        wrapped.delta_sampling = True
        return wrapped

    forge.adapter._post_cfg = spy
    try:
        on, _, _ = generate(forge, ds(strength=2.0))
    finally:
        forge.adapter._post_cfg = original
    assert (on - off).abs().mean() > 1e-3
    assert seen == [i / 5 for i in range(6)]  # Euler, 6 steps: one call per step, progress from the count


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_source_equals_target_lora_at_lambda_one_equals_native_lora(forge, sampler):
    path = write_lora(forge)
    plain, _, _ = generate(forge, sampler_name=sampler)
    on, _, processed = generate(forge, lora_ds(strength=1.0), sampler_name=sampler)
    assert processed.infotexts[0]["DS adapter"] == "style [000000000003]"
    assert_host_clean(forge)
    native_lora(forge, path)
    native, _, _ = generate(forge, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-5, atol=1e-5)
    assert (native - plain).abs().mean() > 1e-3  # the LoRA matters, so the match is not trivial


def test_online_lora_never_touches_the_source_weights(forge):
    write_lora(forge)
    generate(forge, lora_ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    before = {k: v.clone() for k, v in source.unet.model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in source.engine.forge_objects.clip.cond_stage_model.state_dict().items()}
    generate(forge, lora_ds(strength=1.0))
    for k, v in source.unet.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in source.engine.forge_objects.clip.cond_stage_model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    assert not any(hasattr(m, "forge_online_loras") for m in source.unet.model.modules())
    assert forge.loader.loads == [forge.checkpoints["sd15_a"].filename]  # loaded once, cached


def generate_calling_the_hook_twice(host, settings):
    """Generate with process_before_every_sampling run twice per pass; each call leaves one DS patch."""
    original = host.adapter.begin_pass

    def twice(p):
        original(p)
        original(p)
        unet = p.sd_model.forge_objects.unet
        assert len(ds_functions(unet)) == 1 and len(unet.extra_model_patchers_during_sampling) == 1

    host.module.ADAPTER.begin_pass = twice
    try:
        return generate(host, settings)[0]
    finally:
        host.module.ADAPTER.begin_pass = original


def test_hook_called_twice_never_applies_ds_twice(forge):
    once, _, _ = generate(forge, ds(strength=2.0))
    assert torch.equal(once, generate_calling_the_hook_twice(forge, ds(strength=2.0)))


def test_hires_pass_is_patched_once_per_pass(forge):
    off, _, _ = generate(forge, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=3)
    zero, _, _ = generate(forge, ds(strength=0.0), enable_hr=True, hr_scale=2.0, hr_second_pass_steps=3)
    on, _, _ = generate(forge, ds(strength=2.0), enable_hr=True, hr_scale=2.0, hr_second_pass_steps=3)
    assert torch.equal(off, zero) and off.shape[-1] == 8
    assert (on - off).abs().mean() > 1e-3
    assert_host_clean(forge)


def test_source_patchers_load_with_the_target(forge):
    generate(forge, ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    assert any(m.model is source.unet for m in forge.memory.current_loaded_models)


def test_free_releases_the_source_engine(forge):
    write_lora(forge)
    generate(forge, lora_ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    unet_module, clip_module = weakref.ref(source.unet.model), weakref.ref(source.engine.forge_objects.clip.cond_stage_model)
    del source
    generate(forge)  # DS off: cached, off the device
    forge.generation.free_sources()
    gc.collect()
    assert forge.generation.CACHE.entries == {}
    assert unet_module() is None and clip_module() is None  # nothing holds the weights any more
    assert all(m.model.model is not unet_module() for m in forge.memory.current_loaded_models)
    assert forge.memory.empty_cache_calls > 0


def test_online_lora_switching_keeps_forges_empty_cache_flag(forge):
    """Forge's LoRA refresh sets signal_empty_cache (a CUDA cache flush per step); DS switches its online
    patches twice per step and frees nothing, so the host's flag stays as it was."""
    write_lora(forge)
    generate(forge, lora_ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    lora = next(iter(source.loras.values()))
    refreshes = source.unet.lora_loader.refreshes
    forge.memory.signal_empty_cache = False
    with lora.enabled():
        source.encode([PROMPT], ["blurry"], 4, None, 64, 64)
    assert source.unet.lora_loader.refreshes == refreshes + 2  # the patches were switched in and out
    assert forge.memory.signal_empty_cache is False


def test_free_button_and_source_change_release(forge):
    generate(forge, ds(strength=1.0))
    first = weakref.ref(next(iter(forge.generation.CACHE.entries.values())).unet.model)
    generate(forge, ds(strength=1.0, source="sd15_b"))
    gc.collect()
    assert first() is None and len(forge.generation.CACHE.entries) == 1
    assert forge.generation.free_sources() == "Released 1 source model(s)."
    assert forge.generation.CACHE.entries == {}


def test_missing_source_and_bad_lora_fail_without_an_image(forge, tmp_path):
    with pytest.raises(DeltaError, match="was not found"):
        generate(forge, ds(source="nope"))
    bad = {"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 3),
           "lora_unet_nothing_here.lora_up.weight": torch.zeros(3, 2)}
    path = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file(bad, str(path))
    forge.networks.register("wrong", str(path), shorthash="000000000009")
    with pytest.raises(DeltaError, match="0 of 2 keys matched"):
        generate(forge, ds(adapter_kind="lora", adapter="wrong", adapted_prompt=""))
    with pytest.raises(DeltaError, match="lambda"):
        generate(forge, ds(strength=float("nan")))
    ok, _, _ = generate(forge, ds(strength=1.0))
    assert torch.isfinite(ok).all()
    assert_host_clean(forge)


def test_non_finite_delta_mid_sampling_stops_the_generation(forge, monkeypatch):
    generate(forge, ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    monkeypatch.setattr(source, "model_fn", lambda x, s, c: torch.full_like(x, float("nan")))
    with pytest.raises(DeltaError, match="non-finite"):
        generate(forge, ds(strength=1.0))
    assert_host_clean(forge)


def test_a_ds_error_stops_through_the_hosts_interrupt_and_restores_it(forge, monkeypatch):
    """Nothing but an Exception leaves DS: Forge's main_thread worker catches only Exception."""
    generate(forge, ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    calls = []
    monkeypatch.setattr(source, "model_fn", lambda x, s, c: calls.append(1) or torch.full_like(x, float("nan")))
    with pytest.raises(DeltaError, match="non-finite"):  # an Exception: what main_thread.Task.work catches
        generate(forge, ds(strength=1.0), steps=8)
    assert len(calls) == 1  # one step's pair (one batched call), then the sampler stopped at the next step
    assert forge.shared.state.interrupted is False  # the host's flag is put back
    assert_host_clean(forge)


def test_without_the_sampler_guard_no_base_exception_escapes(forge, monkeypatch):
    """Another script replaced p.sampler after DS guarded it: the run still stops through the host's
    interrupt, with the message, and nothing kills the generation thread."""
    import gradio

    generate(forge, ds(strength=1.0))
    source = next(iter(forge.generation.CACHE.entries.values()))
    monkeypatch.setattr(source, "model_fn", lambda x, s, c: torch.full_like(x, float("nan")))
    monkeypatch.setattr(forge.generation, "guard_sampler", lambda p, state, on_exit: None)
    try:
        generate(forge, ds(strength=1.0), steps=8)
    except Exception:  # noqa: S110 - only a BaseException would fail this test
        pass
    finally:
        interrupted, forge.shared.state.interrupted = forge.shared.state.interrupted, False
    assert interrupted is True and "non-finite" in gradio.warnings[-1]


def test_ckpt_source_is_read_weights_only(forge, tmp_path):
    path = tmp_path / "models" / "pickled.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(forge.checkpoints["sd15_a"].filename)}, str(path))
    forge.sd_models.CheckpointInfo(str(path), "00000000cc").register()
    via_ckpt, _, _ = generate(forge, ds(strength=1.0, source="pickled"))
    via_st, _, _ = generate(forge, ds(strength=1.0))
    assert torch.equal(via_ckpt, via_st)
    assert forge.utils.unsafe_loads == []


def test_interrupt_mid_sampling_leaves_the_host_clean(forge):
    calls = interrupt_at_call(forge, 3, forge.callbacks.on_cfg_denoiser)
    try:
        out, p, _ = generate(forge, ds(strength=2.0))
    finally:
        forge.shared.state.interrupted = False
    assert torch.isfinite(out).all() and len(calls) == 3
    assert getattr(p, forge.generation.STATE_ATTR) is None
    assert_host_clean(forge)


def test_pasted_source_resolves_to_the_label_forge_lists(forge, monkeypatch):
    from delta_hosts import choices

    # Forge's checkpoint_tiles() lists file names, A1111's lists 'name [hash]' titles
    monkeypatch.setattr(forge.sd_models, "checkpoint_tiles", lambda use_short=False: ["sd15_a", "sd15_b"])
    assert choices.resolve_checkpoint("renamed [0000000002]") == "sd15_b"
    assert choices.resolve_checkpoint("missing [ffff]") == "missing [ffff]"


@pytest.mark.parametrize("opt", [{"skip_early_cond": 0.5}, {"s_min_uncond": 5.0}])
def test_lora_identity_holds_when_the_host_skips_uncond_on_some_steps(forge, opt):
    """Skip-early-CFG / NGMS drop the target's uncond on some steps: the source must follow the host."""
    path = write_lora(forge)
    forge.shared.opts.data.update({k: v for k, v in opt.items() if k != "s_min_uncond"})
    kw = {"s_min_uncond": opt["s_min_uncond"]} if "s_min_uncond" in opt else {}
    on, _, _ = generate(forge, lora_ds(strength=1.0), **kw)
    native_lora(forge, path)
    native, _, _ = generate(forge, **kw)
    forge.shared.opts.data["skip_early_cond"] = 0.0
    torch.testing.assert_close(on, native, rtol=1e-5, atol=1e-5)


def test_auto_strength_reads_the_hosts_uncond_prediction(forge):
    plain, _, _ = generate(forge, ds(strength=1.0))
    capped, _, _ = generate(forge, ds(strength=1.0, cap=10.0))
    auto, _, processed = generate(forge, ds(strength=0.5, strength_mode="auto"))
    assert torch.equal(capped, plain) and not torch.equal(auto, plain)
    assert processed.infotexts[0]["DS strength mode"] == "auto"
    assert_host_clean(forge)
