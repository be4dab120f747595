"""The A1111 source loader itself (a1111_models.load_source / _instantiate), through fakes of the host
pieces it calls: config choice, meta init, dtype conversion, VAE drop, text-encoder hijack, alphas."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from test_a1111_sampling import ds, generate


@pytest.fixture
def loader(webui, monkeypatch):
    monkeypatch.setattr(webui.models, "load_source", webui.real_load_source)
    return webui


@pytest.mark.parametrize("no_half", [True, False])
def test_the_loader_builds_an_independent_model_in_the_unet_dtype_on_the_cpu(loader, monkeypatch, no_half):
    from modules import devices, sd_hijack, sd_unet, shared
    from omegaconf import OmegaConf

    monkeypatch.setattr(shared.cmd_opts, "no_half", no_half)
    monkeypatch.setattr(devices, "dtype_unet", torch.float32 if no_half else torch.float16)
    active_clip, active_layers, active_forward = object(), [object()], object()
    monkeypatch.setattr(sd_hijack.model_hijack, "clip", active_clip)
    monkeypatch.setattr(sd_hijack.model_hijack, "layers", active_layers)
    monkeypatch.setattr(sd_unet, "original_forward", active_forward)
    info = loader.checkpoints["sd15_b"]
    source = loader.models.load_source(info)
    model = source.model
    assert OmegaConf.loaded[-1] == "configs/v1-inference.yaml" and model.is_sd1
    assert model is not shared.sd_model and isinstance(model.first_stage_model, loader.models.NoVae)
    weights = safetensors.torch.load_file(info.filename)
    unet_weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert unet_weight.dtype == devices.dtype_unet and unet_weight.device.type == "cpu"
    torch.testing.assert_close(unet_weight.float(), weights["model.diffusion_model.input_blocks.0.0.weight"],
                               rtol=0, atol=0 if no_half else 1e-3)
    assert model.alphas_cumprod.dtype == torch.float32  # never downcast by the conversion
    assert type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords" and not model.training
    # the host's hijack globals describe the active model, not the source
    assert (sd_hijack.model_hijack.clip, sd_hijack.model_hijack.layers, sd_unet.original_forward) == (
        active_clip, active_layers, active_forward)
    assert id(model) in loader.sd_models.alpha_overrides
    assert source.latent_format.name == "SD1" and not source.on_device


def test_ds_through_the_real_loader_gives_the_tiny_loaders_image(webui, monkeypatch):
    tiny, _, _ = generate(webui, ds(source="sd15_b", strength=2.0))
    webui.a1111.CACHE.clear()
    monkeypatch.setattr(webui.models, "load_source", webui.real_load_source)
    real, _, _ = generate(webui, ds(source="sd15_b", strength=2.0))
    assert torch.equal(real, tiny)


def test_repeated_load_and_release_leaves_nothing_of_the_source(loader, monkeypatch):
    """Source switch, DS off + Free, and Free: after each release nothing of the model survives, the
    hijacked text encoder and the k-diffusion denoiser included (weak references die)."""
    import gc
    import weakref

    from test_a1111_lifecycle import lora_ds, write_lora

    from delta_hosts import generation

    write_lora(loader)
    refs = []
    for cycle in range(3):
        generate(loader, lora_ds(strength=1.0, source="sd15_b"))
        source = next(iter(generation.CACHE.entries.values()))
        refs.append([weakref.ref(o) for o in (source, source.model, source.denoiser, source.model.cond_stage_model,
                                              source.model.model.diffusion_model, *source.adapters.values())])
        del source
        if cycle == 0:
            generate(loader, lora_ds(strength=1.0, source="sd15_a"))  # a switch beyond the cache size of 1
        else:
            generate(loader)  # DS off keeps it cached ...
            generation.free_sources()  # ... Free releases it
        gc.collect()
        assert [r() for r in refs[-1]] == [None] * len(refs[-1]), cycle
    generation.free_sources()


@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_low_vram_set_up_works_on_a_hijacked_source(loader, monkeypatch, mode):
    """A1111 sets up low VRAM before it wraps the text encoder; a source is wrapped when it loads, so its
    set-up must see the unwrapped encoder (the wrapper has no `.transformer`), and every hook lands."""
    from modules import lowvram, shared

    plain, _, _ = generate(loader, ds(source="sd15_b", strength=2.0))
    loader.a1111.CACHE.clear()
    monkeypatch.setattr(shared.cmd_opts, mode, True)
    monkeypatch.setattr(lowvram, "module_in_gpu", None)
    low, _, _ = generate(loader, ds(source="sd15_b", strength=2.0))
    model = next(iter(loader.a1111.CACHE.entries.values())).model
    unet = model.model.diffusion_model
    hooked = [model.model] if mode == "medvram" else [unet.time_embed, *unet.input_blocks]
    assert model.lowvram and all(part._forward_pre_hooks for part in hooked)
    assert model.cond_stage_model.wrapped.transformer._forward_pre_hooks  # the text encoder's hook
    assert type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords"
    assert torch.equal(low, plain)
