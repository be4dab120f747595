"""A1111 glue: LoRA adapters, bad input, interrupts, and what is left behind after a run."""

from __future__ import annotations

import copy
import math
import re

import pytest
import safetensors.torch
import torch
from test_a1111_sampling import ds, generate
from tinyldm import CTX, DIM, TinyLDM

from lib_delta import DeltaError
from lib_delta.lora import LoraAdapter


def write_lora(webui, name: str = "style", seed: int = 3, keys=None) -> str:
    g = torch.Generator().manual_seed(seed)
    shapes = keys or {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (DIM, CTX),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v": (DIM, CTX),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (CTX, CTX),
    }
    sd = {}
    for key, (out_f, in_f) in shapes.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(2, in_f, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.5
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    path = webui.tmp / f"{name}.safetensors"
    safetensors.torch.save_file(sd, str(path))
    webui.networks.register(name, str(path), shorthash=f"{seed:012d}")
    return str(path)


def lora_ds(**kw):
    return ds(adapter_kind="lora", adapter="style", adapted_prompt="", **kw)


def source_modules(webui):
    state_source = next(iter(webui.a1111.CACHE.entries.values()))
    return list(state_source.model.modules())


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM"])
def test_source_equals_target_lora_at_lambda_one_equals_native_lora(webui, sampler):
    path = write_lora(webui)
    on, _, processed = generate(webui, lora_ds(strength=1.0), sampler_name=sampler)
    # the LoRA lives on the cached source only while the adapted branch runs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in source_modules(webui))
    merged = copy.deepcopy(webui.shared.sd_model)
    LoraAdapter.from_state_dict(safetensors.torch.load_file(path), merged, 1.0).merge_into_(merged)
    webui.shared.sd_model = merged
    native, _, _ = generate(webui, sampler_name=sampler)
    torch.testing.assert_close(on, native, rtol=1e-4, atol=1e-4)
    assert processed.infotexts[0]["DS adapter"] == "style [000000000003]"
    assert webui.a1111.CACHE.entries  # turning DS off keeps the source cached (in RAM)


def test_second_generation_loads_nothing(webui):
    write_lora(webui)
    generate(webui, lora_ds())
    adapters = next(iter(webui.a1111.CACHE.entries.values())).adapters.copy()
    generate(webui, lora_ds())
    assert webui.loads == ["sd15_a [0000000001]"]
    assert next(iter(webui.a1111.CACHE.entries.values())).adapters == adapters


def run_fails(webui, settings, match, **kw):
    with pytest.raises(DeltaError, match=match):
        generate(webui, settings, **kw)
    assert webui.a1111.ACTIVE == []
    import re

    import gradio

    assert gradio.warnings and re.search(match, gradio.warnings[-1])
    # the next generation works
    ok, _, _ = generate(webui, ds())
    assert torch.isfinite(ok).all()


def test_missing_source_checkpoint(webui):
    run_fails(webui, ds(source="nope"), "was not found")


def test_source_deleted_between_runs(webui):
    generate(webui, ds(source="sd15_b"))
    import os

    os.remove(webui.checkpoints["sd15_b"].filename)
    with pytest.raises(DeltaError, match="missing"):
        generate(webui, ds(source="sd15_b"))


def test_corrupt_source_file(webui):
    with open(webui.checkpoints["sd15_b"].filename, "wb") as f:
        f.write(b"\x00garbage" * 10)
    with pytest.raises(DeltaError, match="sd15_b"):
        generate(webui, ds(source="sd15_b"))


def test_lora_for_another_architecture_is_refused_with_counts(webui):
    write_lora(webui, keys={"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
                            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (DIM, CTX)})
    run_fails(webui, lora_ds(), r"3 of 6 keys matched, 3 unmatched")


def test_non_safetensors_lora_is_read_weights_only_before_any_host_loader(webui):
    path = write_lora(webui)
    via_safetensors, _, _ = generate(webui, lora_ds())
    pt_path = webui.tmp / "style_pt.pt"
    torch.save(safetensors.torch.load_file(path), pt_path)
    webui.networks.register("style", str(pt_path), shorthash="000000000003")
    via_pt, _, _ = generate(webui, lora_ds())
    assert torch.equal(via_pt, via_safetensors) and webui.sd_models.safe_loads == []
    pt_path.write_bytes(b"not a pickle")
    webui.a1111.CACHE.clear()
    run_fails(webui, lora_ds(), "LoRA 'style_pt.pt' is corrupt")


def test_out_of_memory_while_loading_the_source(webui, monkeypatch):
    def no_memory(info, state_dict):
        raise MemoryError

    monkeypatch.setattr(webui.models, "_instantiate", no_memory)
    monkeypatch.setattr(webui.models, "load_source", webui.real_load_source)
    with pytest.raises(DeltaError, match="out of memory while loading the source"):
        generate(webui, ds(source="sd15_b"))


@pytest.mark.parametrize("lam", [math.nan, 11.0])
def test_bad_lambda_is_refused(webui, lam):
    run_fails(webui, ds(strength=lam), "lambda")


def test_unsupported_pair_is_refused(webui):
    webui.shared.sd_model.is_sd3 = True  # a 16-channel flow target
    with pytest.raises(DeltaError, match="cannot pair"):
        generate(webui, ds())


def test_non_finite_delta_stops_the_generation(webui):
    nan_model = TinyLDM(seed=1)
    with torch.no_grad():
        nan_model.model.diffusion_model.out[2].weight.fill_(math.nan)
    path = webui.tmp / "models" / "broken.safetensors"
    safetensors.torch.save_file(nan_model.state_dict(), str(path))
    webui.sd_models.CheckpointInfo(str(path), "9999999999").register()
    run_fails(webui, ds(adapter_kind="checkpoint", adapter="broken"), "non-finite")


def interrupt_at_call(host, n: int, register) -> list:
    """Register (with `register`, an on_cfg_* function) a callback that interrupts at its n-th call."""
    calls = []

    def interrupt(params):
        calls.append(1)
        if len(calls) == n:
            host.shared.state.interrupted = True

    register(interrupt)
    return calls


def test_interrupt_mid_sampling_leaves_nothing_behind(webui):
    write_lora(webui)
    calls = interrupt_at_call(webui, 3, webui.callbacks.on_cfg_after_cfg)
    before = registered(webui)
    _, p, _ = generate(webui, lora_ds(), steps=8)
    assert len(calls) == 3
    assert getattr(p, webui.a1111.STATE_ATTR) is None and webui.a1111.ACTIVE == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in source_modules(webui))
    assert registered(webui) == before


def test_exception_inside_the_sampler_leaves_nothing_behind(webui, monkeypatch):
    write_lora(webui)
    target = webui.shared.sd_model
    original = target.apply_model
    count = []

    def explode(*args, **kwargs):
        count.append(1)
        if len(count) == 3:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, "apply_model", explode)
    with pytest.raises(RuntimeError, match="device lost"):
        generate(webui, lora_ds())
    assert webui.a1111.ACTIVE == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in source_modules(webui))


def registered(webui) -> dict[str, int]:
    return {k: len(v) for k, v in webui.callbacks.callback_map.items() if v}


def test_callbacks_are_registered_once_and_inert_when_off(webui):
    counts = registered(webui)
    assert counts["callbacks_cfg_denoiser"] == 1 and counts["callbacks_cfg_after_cfg"] == 1
    first_off, _, _ = generate(webui)
    for _ in range(2):
        on, _, _ = generate(webui, ds(strength=2.0))
        generate(webui)
    assert registered(webui) == counts
    assert not torch.equal(on, first_off)
    assert torch.equal(generate(webui)[0], first_off)  # inert when off: the DS-off image never changes
    assert webui.shared.sd_model.training is False


@pytest.mark.parametrize(("refiner_sdxl", "fails"), [(False, False), (True, True)])
def test_refiner_switch_is_followed_or_refused(webui, refiner_sdxl, fails):
    """A1111's refiner swaps shared.sd_model mid-sampling; DS follows it only within one latent format."""
    refiner = TinyLDM(seed=2).eval().requires_grad_(False)
    refiner.is_sdxl = refiner_sdxl
    calls = []

    def switch_after_two_steps(params):
        calls.append(1)
        if len(calls) == 2:
            webui.shared.sd_model = refiner

    webui.callbacks.on_cfg_after_cfg(switch_after_two_steps)
    if fails:
        run_fails(webui, ds(), "refiner switched to a SDXL model")
    else:
        out, _, _ = generate(webui, ds(), steps=4)
        assert torch.isfinite(out).all() and len(calls) == 4


@pytest.mark.parametrize(("index", "value", "message"), [
    (5, "abc", "bad value 'abc' for DS lambda"),
    (6, "bogus", "DS schedule must be one of constant, linear, cosine, exponential, sigmoid, got 'bogus'"),
    (2, "bogus", "DS adapter kind must be one of lora, checkpoint, prompt, got 'bogus'"),
])
def test_api_args_that_are_not_valid_values_fail_instead_of_falling_back(webui, index, value, message):
    """A1111 swallows exceptions raised in Script.process: the bad value must still stop the generation."""
    args = ds(strength=2.0).to_args()
    args[index] = value
    p = webui.processing.StableDiffusionProcessing(scripts=[webui.script], script_args=tuple(args), prompt="a fox")
    with pytest.raises(DeltaError, match=re.escape(message)):
        webui.processing.process_images(p)
    ok, _, _ = generate(webui, ds())
    assert torch.isfinite(ok).all()


def test_a_selected_sd_unet_never_answers_for_the_source(webui, monkeypatch):
    """TensorRT & co. redirect every UNetModel.forward to the target's engine: the source keeps its own."""
    from modules import sd_unet
    from tinyldm import TinyUNet

    settings = ds(strength=2.0, source="sd15_b")
    plain, _, _ = generate(webui, settings)
    target_unet, own_forward = webui.shared.sd_model.model.diffusion_model, TinyUNet.forward
    calls = []

    class TargetEngine:  # what a TensorRT engine of the target computes
        def forward(self, x, timesteps, context):
            calls.append(1)
            return own_forward(target_unet, x, timesteps, context)

    monkeypatch.setattr(TinyUNet, "forward", sd_unet.create_unet_forward(own_forward))
    monkeypatch.setattr(sd_unet, "current_unet", TargetEngine())
    redirected, _, _ = generate(webui, settings)
    assert calls and sd_unet.current_unet is not None  # the target ran on the engine; selection kept
    torch.testing.assert_close(redirected, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_batched_lora_pair_gives_the_separate_passes_image(webui, sampler):
    write_lora(webui)
    separate, _, _ = generate(webui, lora_ds(speed="custom", batched=False), sampler_name=sampler)
    batched, _, processed = generate(webui, lora_ds(), sampler_name=sampler)  # `exact` batches
    assert torch.equal(batched, separate)
    assert all("forward" not in m.__dict__ for m in source_modules(webui))  # the row split is gone
    assert "spd=" not in processed.infotexts[0]["Delta Sampling"]  # the default is left out


def test_auto_strength_and_cap_read_the_targets_uncond(webui):
    """on_cfg_denoised hands the uncond rows over: auto runs, and a cap that is never reached changes nothing."""
    write_lora(webui)
    plain, _, _ = generate(webui, lora_ds(strength=1.0))
    capped, _, _ = generate(webui, lora_ds(strength=1.0, cap=10.0))
    auto, _, processed = generate(webui, lora_ds(strength=0.5, strength_mode="auto"))
    assert torch.equal(capped, plain) and not torch.equal(auto, plain)
    assert processed.infotexts[0]["DS strength mode"] == "auto"
    assert webui.a1111.ACTIVE == []
