"""Where an A1111 source lives (memory.MemoryPolicy), on a fake device: Module.to records the device a
module was sent to instead of moving it, so placement is checked on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_a1111_sampling import ds, generate

GPU = torch.device("cuda", 0)


@pytest.fixture
def device(webui, monkeypatch):
    """A fake GPU: `where(module)` is the set of places its parameters were last sent to."""
    from modules import devices

    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = kwargs.pop("device", None)
        rest = []
        for arg in args:
            if isinstance(arg, torch.device | str):
                target = torch.device(arg)
            else:
                rest.append(arg)
        if target is not None:
            for tensor in [*self.parameters(), *self.buffers()]:
                tensor.ds_where = torch.device(target).type
        return real_to(self, *rest, **kwargs) if rest or kwargs else self

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(devices, "device", GPU)
    return lambda module: {getattr(p, "ds_where", "cpu") for p in module.parameters()}


def source(webui):
    return next(iter(webui.a1111.CACHE.entries.values()))


def moves_during_encode(webui, where) -> list[set]:
    seen = []
    text_model = source(webui).model.cond_stage_model
    original = text_model.forward
    text_model.forward = lambda texts: seen.append(where(text_model)) or original(texts)
    return seen


def test_text_encoder_is_on_the_device_only_while_encoding(webui, device):
    generate(webui, ds(strength=1.0))
    model = source(webui).model
    assert device(model.model) == {"cuda"}  # the UNet stays for the generation
    assert device(model.cond_stage_model) == {"cpu"}  # encoded, then sent back
    seen = moves_during_encode(webui, device)
    generate(webui, ds(strength=1.0))
    assert seen and all(s == {"cuda"} for s in seen)
    assert device(model.cond_stage_model) == {"cpu"}


def test_an_sdxl_source_keeps_its_conditioner_off_the_device(webui, device):
    """After A1111's hijack an SDXL model names its text encoders twice (`conditioner` and
    `cond_stage_model`): neither may carry them onto the device with the UNet."""
    generate(webui, ds(strength=1.0))
    src = source(webui)
    src.offload()
    src.model.conditioner = src.model.cond_stage_model  # the SDXL layout after the hijack
    src.to_device()
    assert device(src.model.model) == {"cuda"} and device(src.model.conditioner) == {"cpu"}


def test_ds_off_moves_the_source_off_the_device_and_on_again_loads_nothing(webui, device):
    write_lora(webui)
    generate(webui, lora_ds(strength=1.0))
    model = source(webui).model
    generate(webui)
    assert device(model) == {"cpu"}
    generate(webui, lora_ds(strength=1.0))
    assert device(model.model) == {"cuda"} and webui.loads == ["sd15_a [0000000001]"]


@pytest.mark.parametrize("mode", ["medvram", "lowvram"])
def test_low_vram_keeps_one_big_part_on_the_device_at_a_time(webui, device, mode, monkeypatch):
    """Under --medvram / --lowvram A1111's own hooks serve the source too: while the target's UNet runs,
    the source's UNet (medvram) or each of its blocks (lowvram) and its text encoder are on the CPU."""
    from modules import lowvram, shared

    normal, _, _ = generate(webui, ds(strength=2.0))
    webui.a1111.CACHE.clear()
    monkeypatch.setattr(shared.cmd_opts, mode, True)
    monkeypatch.setattr(lowvram, "module_in_gpu", None)
    target = shared.sd_model
    target.first_stage_model = webui.models.NoVae()
    lowvram.setup_for_low_vram(target, mode == "medvram")  # what A1111 does to its own model
    generate(webui, ds(strength=2.0))
    model = source(webui).model
    unet = model.model.diffusion_model
    big_parts = [model.model] if mode == "medvram" else [unet.time_embed, *unet.input_blocks]
    seen = []
    target.model.diffusion_model.out.register_forward_pre_hook(
        lambda m, a: seen.append((set().union(*map(device, big_parts)), device(model.cond_stage_model))))
    low, _, _ = generate(webui, ds(strength=2.0))
    assert model.lowvram is True and torch.equal(low, normal)
    assert seen and all(parts == {"cpu"} and text == {"cpu"} for parts, text in seen)
    assert device(model.cond_stage_model) == {"cpu"}


@pytest.fixture(params=["forge", "neo", "ldm_patched"])
def backend_host(request):
    return request.getfixturevalue(request.param)


def test_forge_family_reserves_the_source_activations_and_unloads_its_text_encoder(backend_host):
    """The target's patcher reserves one source branch's activations for the host's own load (Forge's
    `extra_preserved_memory_during_sampling`), and the source's text encoder leaves the device after encoding."""
    host = backend_host
    original = host.shared.sd_model.forge_objects.unet
    host.memory.preserved.clear()
    _, p, _ = generate(host, ds(strength=1.0), batch_size=2)
    rows, cells = 3 * 2, (p.height // 8) * (p.width // 8)  # a prompt adapter's batched pair: one shared uncond
    assert max(v for v in host.memory.preserved if v) == int(1.28 * rows * cells * 4 * 16384)  # KModel's, fp32
    host.memory.preserved.clear()
    generate(host, ds(strength=1.0, speed="custom", batched=False), batch_size=2)
    assert max(v for v in host.memory.preserved if v) == int(1.28 * 2 * 2 * cells * 4 * 16384)  # one branch
    assert original.extra_preserved_memory_during_sampling == 0  # the user's patcher is untouched
    source = next(iter(host.generation.CACHE.entries.values()))
    text = source.engine.forge_objects.clip.cond_stage_model if hasattr(source, "engine") else \
        source.base.clip.cond_stage_model
    loaded = [getattr(entry.model, "model", None) for entry in host.memory.current_loaded_models if entry.model]
    assert all(m is not text for m in loaded)
