"""No reload churn, on every host: with DS off the sources leave the device but stay cached, so turning DS
back on (or an X/Y/Z [DS] Enabled sweep) loads nothing; the Free button, a source switch beyond the cache
size and low system RAM really release them."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_a1111_sampling import PROMPT, ds, generate

from lib_delta.spec import DeltaSettings

HOSTS = ["webui", "forge", "neo", "ldm_patched"]


@pytest.fixture(params=HOSTS)
def host(request):
    return request.getfixturevalue(request.param)


def loads(host) -> list[str]:
    return list(host.loads) if hasattr(host, "loads") else list(host.loader.loads)


def cache(host):
    return host.a1111.CACHE if hasattr(host, "a1111") else host.generation.CACHE


def cached_source(host):
    return next(iter(cache(host).entries.values()))


def source_modules(source) -> list[torch.nn.Module]:
    if hasattr(source, "denoiser"):  # A1111
        return [source.model]
    if hasattr(source, "engine"):  # Forge, Neo
        return [source.unet.model, source.engine.forge_objects.clip.cond_stage_model]
    return [p.model for p in source.patchers()]  # ldm_patched: base and LoRA copy


def on_device_list(host, source) -> bool:
    """Whether the host's memory manager holds one of the source's modules as loaded (A1111 has none)."""
    if not hasattr(host, "memory"):
        return False
    ids = {id(m) for m in source_modules(source)}
    loaded = [getattr(entry.model, "model", None) for entry in host.memory.current_loaded_models if entry.model]
    return any(id(m) in ids for m in loaded)


def sweep_cell(host, settings: DeltaSettings, enabled: str) -> torch.Tensor:
    """One X/Y/Z cell with the [DS] Enabled axis applied to `p`, the accordion on."""
    from delta_hosts.xyz import apply_field

    p = host.processing.StableDiffusionProcessing(prompt=PROMPT, negative_prompt="blurry", scripts=[host.script],
                                                  script_args=tuple(settings.to_args()))
    apply_field("enabled")(p, enabled, None)
    return torch.cat(host.processing.process_images(p).samples)


def test_on_off_on_loads_the_source_once_and_off_leaves_the_device(host):
    write_lora(host)
    first, _, _ = generate(host, lora_ds(strength=1.0))
    loaded = loads(host)
    assert on_device_list(host, cached_source(host)) == hasattr(host, "memory")
    off, _, _ = generate(host)
    source = cached_source(host)
    assert not on_device_list(host, source)  # off the device, still cached
    assert all(p.device.type == "cpu" for m in source_modules(source) for p in m.parameters())
    again, _, _ = generate(host, lora_ds(strength=1.0))
    assert loads(host) == loaded and cached_source(host) is source
    assert torch.equal(first, again) and not torch.equal(first, off)
    assert torch.equal(generate(host)[0], off)


def test_an_xyz_enabled_sweep_loads_the_source_once(host):
    cells = [sweep_cell(host, ds(strength=2.0), enabled) for enabled in ("True", "False", "True")]
    assert len(loads(host)) == 1
    assert torch.equal(cells[0], cells[2]) and not torch.equal(cells[0], cells[1])
    assert torch.equal(cells[1], generate(host)[0])


def test_free_button_releases_the_cached_source(host):
    generate(host, ds(strength=1.0))
    generate(host)  # DS off: still cached
    modules = [weakref.ref(m) for m in source_modules(cached_source(host))]
    from delta_hosts import generation

    assert generation.free_sources() == "Released 1 source model(s)."
    gc.collect()
    assert not cache(host).entries and all(ref() is None for ref in modules)
    generate(host, ds(strength=1.0))
    assert len(loads(host)) == 2  # freed means loaded again


def test_low_ram_releases_the_sources_when_ds_is_off(host, monkeypatch):
    from delta_hosts import generation

    generate(host, ds(strength=1.0))
    modules = [weakref.ref(m) for m in source_modules(cached_source(host))]
    monkeypatch.setattr(generation, "low_ram", lambda: True)
    generate(host)
    gc.collect()
    assert not cache(host).entries and all(ref() is None for ref in modules)


def test_low_ram_reads_the_systems_available_memory(webui, monkeypatch):
    import builtins
    import io
    import sys

    from delta_hosts import generation

    monkeypatch.setitem(sys.modules, "psutil", None)  # the /proc/meminfo path
    meminfo = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    {} kB\n"
    real_open = builtins.open
    for available, low in ((3_000_000, False), (2_000_000, True)):
        monkeypatch.setattr(builtins, "open", lambda path, *a, _v=available, **k: io.StringIO(meminfo.format(_v))
                            if path == "/proc/meminfo" else real_open(path, *a, **k))
        assert generation.low_ram() is low
