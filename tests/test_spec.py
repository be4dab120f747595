"""The settings spec: args, validation, infotext round trip, schedules."""

from __future__ import annotations

import math

import pytest

from lib_delta import DeltaError, schedules
from lib_delta.spec import (
    FIELDS,
    INFOTEXT_KEY,
    UNITS,
    DeltaSettings,
    parse_loras,
    units_from_args,
    units_infotext,
)

FULL = DeltaSettings(
    enabled=True, source="sd15 [abcdef1234]", adapter_kind="lora", adapter="style, v2 [1234]",
    adapter_weight=0.8, strength=2.5, schedule="cosine", start=0.1, end=0.9,
    base_prompt="a cat", adapted_prompt='a cat, "ink": sketch; {x=1}', negative_prompt="blurry", source_cfg=6.5,
)


def test_args_round_trip_in_field_order():
    assert DeltaSettings.from_args(FULL.to_args()) == FULL
    assert [f.attr for f in FIELDS] == list(DeltaSettings.__dataclass_fields__)


def test_missing_trailing_args_take_defaults():
    s = DeltaSettings.from_args([True, "sd15", "prompt"])
    assert s.enabled and s.adapter_kind == "prompt" and s.strength == 1.0


def test_infotext_round_trip_and_readable_parts():
    entries = FULL.to_infotext()
    assert entries["DS lambda"] == "2.5" and entries["DS schedule"] == "cosine"
    assert entries["DS source"] == "sd15 [abcdef1234]"
    assert DeltaSettings.from_infotext(entries) == FULL


def test_compact_value_omits_defaults_and_is_versioned():
    entries = DeltaSettings(enabled=True, source="s [1a]", adapter="a", strength=0.1 + 0.2).to_infotext()
    assert entries[INFOTEXT_KEY] == "v1; src=s [1a]; adp=a; lam=0.30000000000000004"  # floats round-trip exactly


def test_prompts_with_separators_round_trip():
    settings = FULL.replace(adapted_prompt="a=b; c%d\nnext line, (x:1.2)", base_prompt=";;==")
    assert DeltaSettings.from_infotext(settings.to_infotext()) == settings


def test_empty_readable_parts_are_left_out():
    entries = DeltaSettings(enabled=True, source="s", adapter_kind="prompt", adapted_prompt="x").to_infotext()
    assert "DS adapter" not in entries and entries["DS source"] == "s"


def test_no_ds_key_means_off_and_off_writes_nothing():
    assert DeltaSettings.from_infotext({"Steps": "20"}) == DeltaSettings()
    assert DeltaSettings().to_infotext() == {}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "must start with a version"),
        ("", "must start with a version"),
        ("v9; src=s", "Unsupported 'Delta Sampling' version v9"),
        ("v1; src=s; adp=a; zzz=1", "unknown or repeated key in 'zzz=1'"),
        ("v1; src=s; adp=a; lam=1; lam=2", "unknown or repeated key in 'lam=2'"),
        ("v1; src=s; adp", "expected key=value in 'adp'"),
        ("v1; src=s; adp=a; lam=abc", "bad value 'abc' for DS lambda"),
        ("v1; src=s; adp=a; sch=zigzag", "must be one of"),
        ("v1; src=s; adp=a; lam=1e9", "outside"),
    ],
)
def test_malformed_infotext_is_a_clear_error(raw, message):
    with pytest.raises(DeltaError, match=message):
        DeltaSettings.from_infotext({INFOTEXT_KEY: raw})


@pytest.mark.parametrize("lam", [math.nan, math.inf, 10.5, -2.5])
def test_bad_lambda_is_refused(lam):
    with pytest.raises(DeltaError):
        FULL.replace(strength=lam).validate()


def test_negative_lambda_is_allowed():
    assert FULL.replace(strength=-1.0).validate().strength == -1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [({"source": ""}, "source base checkpoint"), ({"adapter": ""}, "adapter file"),
     ({"adapter_kind": "prompt", "adapted_prompt": ""}, "adapted prompt"), ({"start": 0.9, "end": 0.2}, "before DS end")],
)
def test_incomplete_settings_are_refused(change, message):
    with pytest.raises(DeltaError, match=message):
        FULL.replace(**change).validate()


def test_xyz_overrides_come_from_p_attributes():
    class P:
        ds_strength = "3.5"
        ds_schedule = "linear"

    s = FULL.with_overrides(P())
    assert s.strength == 3.5 and s.schedule == "linear" and s.source == FULL.source


@pytest.mark.parametrize("name", ["constant", "linear", "cosine", "exponential", "sigmoid"])
def test_schedules_start_at_full_strength_and_respect_the_window(name):
    assert schedules.lambda_at(0.2, 2.0, name, 0.2, 0.8) == pytest.approx(2.0)
    assert schedules.lambda_at(0.1, 2.0, name, 0.2, 0.8) == 0.0
    assert schedules.lambda_at(0.9, 2.0, name, 0.2, 0.8) == 0.0
    inside = [schedules.lambda_at(0.2 + 0.06 * i, 2.0, name, 0.2, 0.8) for i in range(11)]
    assert all(a >= b - 1e-12 for a, b in zip(inside, inside[1:], strict=False))  # non-increasing


def test_schedule_values():
    assert schedules.lambda_at(0.5, 1.0, "linear") == pytest.approx(0.5)
    assert schedules.lambda_at(0.5, 1.0, "cosine") == pytest.approx(0.5)
    assert schedules.lambda_at(0.5, 1.0, "sigmoid") == pytest.approx(0.5)
    assert schedules.lambda_at(1.0, 1.0, "sigmoid") == pytest.approx(0.0)


def test_progress_helpers():
    assert schedules.progress_from_calls(0, 20) == 0.0
    assert schedules.progress_from_calls(19, 20) == 1.0
    assert schedules.progress_from_calls(25, 20) == 1.0


# -- v2: units and LoRA stacks ---------------------------------------------------------------------
def test_plain_settings_still_write_v1_and_v1_values_read():
    assert FULL.to_infotext()[INFOTEXT_KEY].startswith("v1;")
    v1 = "v1; src=sd15; kind=prompt; ap=a blue fox; lam=2.0"
    assert DeltaSettings.from_infotext({INFOTEXT_KEY: v1}).strength == 2.0


def test_a_lora_stack_or_a_second_unit_writes_v2_and_round_trips():
    stacked = FULL.replace(loras="ink [5555]:0.5, paper")
    assert stacked.to_infotext()[INFOTEXT_KEY].startswith("v2;")
    assert DeltaSettings.from_infotext(stacked.to_infotext()) == stacked
    second = DeltaSettings(enabled=True, source="sd21", adapter_kind="prompt", adapted_prompt="ink", strength=-0.5)
    entries = units_infotext([FULL, DeltaSettings(), second])
    assert entries[INFOTEXT_KEY].startswith("v2;") and "Delta Sampling 2" not in entries
    assert entries["Delta Sampling 3"].startswith("v2;") and "DS lambda" in entries  # readable keys: unit 1 only
    assert DeltaSettings.from_infotext(entries) == FULL
    assert DeltaSettings.from_infotext(entries, 3) == second
    assert DeltaSettings.from_infotext(entries, 2) == DeltaSettings()  # no key: that unit is off


def test_a_newer_value_is_refused_naming_the_unit():
    with pytest.raises(DeltaError, match="'Delta Sampling 2' version v4.*newer"):
        DeltaSettings.from_infotext({"Delta Sampling 2": "v4; src=x"}, 2)


def test_an_ip_adapter_writes_v3_and_the_rest_keeps_the_oldest_version():
    ip = FULL.replace(ipadapter_model="ip-adapter_sd15", ipadapter_weight=0.6, ipadapter_image="not stored")
    text = ip.to_infotext()[INFOTEXT_KEY]
    assert text.startswith("v3;") and "ip=ip-adapter_sd15; ipw=0.6" in text and "not stored" not in text
    assert DeltaSettings.from_infotext(ip.to_infotext()) == ip.replace(ipadapter_image=None)
    second = DeltaSettings(enabled=True, source="sd21", adapter_kind="prompt", adapted_prompt="ink")
    assert units_infotext([FULL, second])[INFOTEXT_KEY].startswith("v2;")  # units alone need v2, not v3
    assert units_infotext([ip, second])["Delta Sampling 2"].startswith("v3;")


def test_v2_positional_args_of_two_and_three_units_keep_their_places():
    v2 = [f.default for f in FIELDS if f.since <= 2]
    assert len(v2) == 27
    first, second = list(v2), list(v2)
    first[:6] = [True, "sd15", "lora", "ink", 1.0, 2.0]
    second[:6] = [True, "sd15", "prompt", "", 1.0, -1.0]
    second[10] = "ink style"
    for args in (first + second, first + second + v2):
        units = units_from_args(args)
        assert [u.strength for u in units[:2]] == [2.0, -1.0] and units[1].adapted_prompt == "ink style"
    full = units_from_args(DeltaSettings(enabled=True, strength=3.0).to_args() * 2)
    assert [u.strength for u in full] == [3.0, 3.0]


@pytest.mark.parametrize(("text", "parsed"), [
    ("", ()),
    ("ink", (("ink", 1.0),)),
    ("ink:0.5, paper [abc]:-1", (("ink", 0.5), ("paper [abc]", -1.0))),
    ("<lora:ink:0.5> <lora:paper>", (("ink", 0.5), ("paper", 1.0))),
    ("<lora:ink:0.5:0.2>", (("ink", 0.5),)),  # a separate text-encoder weight is not supported: the UNet's
])
def test_more_loras_parse(text, parsed):
    assert parse_loras(text) == parsed


@pytest.mark.parametrize("text", ["ink:abc", "ink:nan", "<lora:ink:inf>"])
def test_bad_more_loras_are_refused(text):
    with pytest.raises(DeltaError, match="DS more LoRAs"):
        DeltaSettings(enabled=True, source="s", adapter="a", loras=text).validate()


def test_units_from_positional_args_and_from_dicts():
    n = len(FIELDS)
    assert units_from_args(FULL.to_args()) == [FULL]  # the old flat API: unit 1
    both = units_from_args(FULL.to_args() + DeltaSettings(enabled=True, strength=3).to_args())
    assert [u.strength for u in both] == [2.5, 3.0]
    dicts = units_from_args([{"source": "a", "strength": "2"}, {"source": "b", "enabled": False}, True, "x"])
    assert [(u.enabled, u.source, u.strength) for u in dicts] == [(True, "a", 2.0), (False, "b", 1.0)]
    with pytest.raises(DeltaError, match="unknown unit keys \\['lambda'\\]"):
        units_from_args([{"lambda": 2}])
    with pytest.raises(DeltaError, match=f"{n * UNITS} in all"):
        units_from_args([False] * (n * UNITS + 1))
    with pytest.raises(DeltaError, match="at most 3 units"):
        units_from_args([{}] * 4)
