"""DS units and LoRA stacks through every host's glue (A1111, Forge, Neo, the ldm_patched forks): the
identities that hold exactly in a real sampler loop, infotext v2, the API's unit dicts and X/Y/Z."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_a1111_sampling import PROMPT, ds

from lib_delta import source as core_source
from lib_delta.spec import FIELDS, UNITS, DeltaSettings

HOSTS = ["webui", "forge", "neo", "ldm_patched"]


@pytest.fixture(params=HOSTS)
def host(request):
    return request.getfixturevalue(request.param)


def generate(host, units: list[DeltaSettings] | None = None, args: list | None = None, **kw):
    """Units as the UI sends them: every unit's fields in FIELDS order, unit after unit."""
    units = units or []
    flat = [v for u in units for v in u.to_args()] + DeltaSettings().to_args() * (UNITS - len(units))
    kw = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, **kw}
    p = host.processing.StableDiffusionProcessing(scripts=[host.script], script_args=tuple(args or flat), **kw)
    processed = host.processing.process_images(p)
    return torch.cat(processed.samples), p, processed


def test_two_units_of_one_adapter_add_their_lambdas(host):
    write_lora(host)
    single, _, _ = generate(host, [lora_ds(strength=2.0)])
    two, _, processed = generate(host, [lora_ds(strength=0.8), lora_ds(strength=1.2)])
    torch.testing.assert_close(two, single, rtol=1e-5, atol=1e-5)
    info = processed.infotexts[0]
    assert info["Delta Sampling"].startswith("v2;") and info["Delta Sampling 2"].startswith("v2;")
    assert "lam=1.2" in info["Delta Sampling 2"] and info["DS lambda"] == "0.8"


def test_two_units_equal_the_sum_of_their_single_unit_shifts(host):
    """One Euler step: the image is the step's prediction, so the identity is exact up to rounding."""
    write_lora(host)
    lora, prompt = lora_ds(strength=1.5), ds(strength=-0.7, adapted_prompt="a blue fox in snow")
    off, _, _ = generate(host, steps=1)
    one, _, _ = generate(host, [lora], steps=1)
    other, _, _ = generate(host, [prompt], steps=1)
    both, _, _ = generate(host, [lora, prompt], steps=1)
    assert (one - off).abs().mean() > 1e-3 and (other - off).abs().mean() > 1e-3
    torch.testing.assert_close(both - off, (one - off) + (other - off), rtol=1e-5, atol=1e-5)


def test_a_disabled_unit_is_no_unit(host):
    write_lora(host)
    alone, _, processed_alone = generate(host, [lora_ds(strength=1.5)])
    broken = DeltaSettings(enabled=False, source="no such model", adapter_kind="lora", adapter="missing", strength=9)
    with_off, _, processed = generate(host, [lora_ds(strength=1.5), broken])
    assert torch.equal(alone, with_off)
    assert processed.infotexts[0]["Delta Sampling"] == processed_alone.infotexts[0]["Delta Sampling"]
    assert processed.infotexts[0]["Delta Sampling"].startswith("v1;") and "Delta Sampling 2" not in processed.infotexts[0]


def test_units_with_one_base_run_it_once_per_step(host, monkeypatch):
    write_lora(host)
    write_lora(host, "ink", seed=5)
    counts = {"computed": 0, "reused": 0}
    store, recall = core_source.BaseMemo.store, core_source.BaseMemo.recall

    def counting_store(self, *a):
        counts["computed"] += 1
        return store(self, *a)

    def counting_recall(self, *a):
        out = recall(self, *a)
        counts["reused"] += out is not None
        return out

    monkeypatch.setattr(core_source.BaseMemo, "store", counting_store)
    monkeypatch.setattr(core_source.BaseMemo, "recall", counting_recall)
    separate = [generate(host, [lora_ds(strength=s).replace(adapter=a)])[0] for s, a in ((1.0, "style"), (0.6, "ink"))]
    off, _, _ = generate(host)
    assert counts == {"computed": 0, "reused": 0}  # one unit: no memo
    both, _, _ = generate(host, [lora_ds(strength=1.0), lora_ds(strength=0.6).replace(adapter="ink")])
    assert counts == {"computed": 4, "reused": 4}  # Euler, 4 steps: unit 2 reuses unit 1's base each step
    assert (both - off).abs().mean() > (separate[0] - off).abs().mean() * 0.5


def write_sum_of(host, name: str, parts: list[str]) -> None:
    """One LoRA file whose delta is the sum of the parts' (rank-2, alpha 2) deltas: their factors stacked
    into one rank-2n LoRA with alpha 2n, so up @ down = sum of the parts' up @ down, at the same scale."""
    files = [safetensors.torch.load_file(str(host.tmp / f"{part}.safetensors")) for part in parts]
    stacked = {}
    for key in files[0]:
        if key.endswith("lora_down.weight"):
            stacked[key] = torch.cat([f[key] for f in files], 0)
        elif key.endswith("lora_up.weight"):
            stacked[key] = torch.cat([f[key] for f in files], 1)
        else:
            stacked[key] = torch.tensor(2.0 * len(files))
    path = host.tmp / f"{name}.safetensors"
    safetensors.torch.save_file(stacked, str(path))
    host.networks.register(name, str(path), shorthash="000000000077")


def test_a_lora_stack_sums_its_lora_deltas(host):
    """The adapter plus another file in DS more LoRAs is the one file holding both deltas."""
    write_lora(host)
    write_lora(host, "ink", seed=5)
    write_sum_of(host, "style_and_ink", ["style", "ink"])
    whole, _, _ = generate(host, [lora_ds(strength=1.5).replace(adapter="style_and_ink")])
    stacked, _, processed = generate(host, [lora_ds(strength=1.5, loras="ink:1")])
    torch.testing.assert_close(stacked, whole, rtol=1e-4, atol=1e-4)
    alone, _, _ = generate(host, [lora_ds(strength=1.5)])
    assert (stacked - alone).abs().mean() > 1e-3  # the second LoRA matters
    assert "lx=ink [000000000005]:1" in processed.infotexts[0]["Delta Sampling"]
    assert processed.infotexts[0]["Delta Sampling"].startswith("v2;")
    token, _, _ = generate(host, [lora_ds(strength=1.5, loras="<lora:ink:1>")])
    assert torch.equal(token, stacked)


def test_a_prompt_adapter_may_carry_only_loras(host):
    """Kind prompt with DS more LoRAs and no adapted prompt: the LoRA stack alone, as kind lora."""
    write_lora(host)
    as_lora, _, _ = generate(host, [lora_ds(strength=1.5)])
    stacked, _, _ = generate(host, [ds(strength=1.5, adapted_prompt="", loras="style")])
    torch.testing.assert_close(stacked, as_lora, rtol=1e-5, atol=1e-5)


def test_api_unit_dicts_equal_the_positional_args(host):
    write_lora(host)
    units = [lora_ds(strength=0.8), ds(strength=0.5)]
    positional, _, _ = generate(host, units)
    dicts = [{"source": "sd15_a", "adapter_kind": "lora", "adapter": "style", "strength": 0.8},
             {"source": "sd15_a", "adapter_kind": "prompt", "adapted_prompt": "a blue fox in snow", "strength": 0.5}]
    # A1111 fills the args after the dicts with the panel's defaults
    by_dict, _, _ = generate(host, args=[*dicts, *DeltaSettings().to_args()[: len(FIELDS) * UNITS - 2]])
    assert torch.equal(positional, by_dict)


def test_a_bad_unit_fails_naming_it(host):
    write_lora(host)
    bad = lora_ds().replace(adapter="missing_lora")
    host.processing.script_errors.clear() if hasattr(host.processing, "script_errors") else None
    with pytest.raises(Exception, match=r"missing_lora.*\(DS unit 2\)"):
        generate(host, [lora_ds(), bad])
