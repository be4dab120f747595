"""Bad input through every entry point a user has: API args, an X/Y/Z axis, a pasted infotext. Each case
is an error that names the field (or the file and its role) and the value, gives no image, and leaves the
next generation as it was. Nothing falls back to a default."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_a1111_lifecycle import write_lora
from test_a1111_sampling import PROMPT, ds, generate
from test_a1111_ui import infotext_line, paste

from lib_delta import DeltaError
from lib_delta.spec import FIELD_BY_ATTR, FIELDS, DeltaSettings

# name: (changes to valid prompt-adapter settings, the compact infotext parts, an X/Y/Z axis value, message)
CASES = {
    "lambda not a number": ({"strength": "abc"}, "lam=abc", ("strength", "abc"),
                            r"bad value 'abc' for DS lambda: expected a number in \[-2.0, 10.0\]"),
    "lambda NaN": ({"strength": math.nan}, "lam=nan", ("strength", "nan"), "DS lambda must be a finite number, got nan"),
    "lambda inf": ({"strength": math.inf}, "lam=inf", ("strength", "inf"), "DS lambda must be a finite number, got inf"),
    "lambda out of range": ({"strength": 11.0}, "lam=11.0", ("strength", "11"),
                            r"DS lambda = 11.0 is outside \[-2.0, 10.0\]"),
    "unknown schedule": ({"schedule": "bogus"}, "sch=bogus", ("schedule", "bogus"),
                         "DS schedule must be one of constant, linear, cosine, exponential, sigmoid, got 'bogus'"),
    "unknown adapter kind": ({"adapter_kind": "bogus"}, "kind=bogus", None,
                             "DS adapter kind must be one of lora, checkpoint, prompt, got 'bogus'"),
    "enabled not a boolean": ({"enabled": "maybe"}, None, ("enabled", "maybe"),
                              "bad value 'maybe' for Delta Sampling: expected true or false"),
    "start after end": ({"start": 0.8, "end": 0.2}, "st=0.8; en=0.2", None,
                        r"DS start \(0.8\) must be before DS end \(0.2\)"),
    "negative source CFG": ({"source_cfg": -1.0}, "cfg=-1.0", None, r"DS source CFG = -1.0 is outside \[0.0, 30.0\]"),
    "missing source": ({"source": "nope"}, "src=nope", ("source", "nope"), "checkpoint 'nope' was not found"),
    "missing LoRA": ({"adapter_kind": "lora", "adapter": "nope", "adapted_prompt": ""}, "kind=lora; adp=nope; ap=",
                     None, "LoRA 'nope' was not found"),
    "prompt adapter without a prompt": ({"adapted_prompt": ""}, "ap=", None,
                                        "DS adapted prompt is empty: a prompt adapter needs an adapted prompt"),
}
VALID = ds(strength=2.0)


def raw_args(changes: dict) -> list:
    """The valid settings' API args with raw (uncoerced) values put in, as a client would send them."""
    args = VALID.to_args()
    for attr, value in changes.items():
        args[[f.attr for f in FIELDS].index(attr)] = value
    return args


def run(webui, args) -> torch.Tensor:
    p = webui.processing.StableDiffusionProcessing(prompt=PROMPT, negative_prompt="blurry", scripts=[webui.script],
                                                   script_args=tuple(args))
    return torch.cat(webui.processing.process_images(p).samples)


@pytest.fixture
def good(webui):
    write_lora(webui)
    return generate(webui, VALID)[0]


def assert_refused(webui, good, message, attempt) -> None:
    with pytest.raises(DeltaError, match=message):
        attempt()
    assert torch.equal(generate(webui, VALID)[0], good)  # the next generation is unaffected


@pytest.mark.parametrize("case", CASES)
def test_api_args(webui, good, case):
    changes, _, _, message = CASES[case]
    assert_refused(webui, good, message, lambda: run(webui, raw_args(changes)))


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
def test_xyz_axis(webui, good, case):
    """X/Y/Z applies its values to p, and the generation reads them back through the same coercion."""
    from delta_hosts.xyz import apply_field

    attr, value = CASES[case][2]

    def attempt():
        p = webui.processing.StableDiffusionProcessing(prompt=PROMPT, negative_prompt="blurry",
                                                       scripts=[webui.script], script_args=tuple(VALID.to_args()))
        apply_field(attr)(p, value, None)
        return torch.cat(webui.processing.process_images(p).samples)

    assert_refused(webui, good, CASES[case][3], attempt)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]])
def test_pasted_infotext(webui, good, case):
    """A pasted infotext warns at paste; the panel keeps DS on and Generate fails with the same message."""
    import gradio

    _, parts, _, message = CASES[case]
    values = {"src": "sd15_a", "kind": "prompt", "ap": "a blue fox in snow", "lam": "2.0"}
    values |= dict(part.strip().split("=", 1) for part in parts.split(";"))
    compact = "; ".join(["v1", *(f"{k}={v}" for k, v in values.items())])
    pasted = paste(webui, webui.script.ui(False), infotext_line(webui, {"Delta Sampling": compact}))

    def attempt():
        if any(w.startswith("Delta Sampling") for w in gradio.warnings):
            assert re.search(message, gradio.warnings[-1]), gradio.warnings[-1]
        values = {a: v for a, v in pasted.items() if v is not None}
        return run(webui, DeltaSettings().replace(**values).to_args())

    gradio.warnings.clear()
    assert_refused(webui, good, message, attempt)


def test_a_newer_infotext_version_is_refused_and_says_so(webui, good):
    import gradio

    gradio.warnings.clear()
    pasted = paste(webui, webui.script.ui(False), infotext_line(webui, {"Delta Sampling": "v9; src=sd15_a; lam=2"}))
    assert "made by a newer Delta Sampling" in gradio.warnings[-1]
    settings = DeltaSettings().replace(enabled=True, source=pasted["source"])
    assert_refused(webui, good, "newer Delta Sampling", lambda: generate(webui, settings))


def test_too_few_args_take_the_defaults_of_the_missing_fields(webui, good):
    """A1111's API fills missing script args from the panel's defaults; so does a direct call."""
    assert_refused(webui, good, "DS source is empty", lambda: run(webui, [True]))
    assert torch.equal(run(webui, VALID.to_args()[:11]), good)  # negative prompt and source CFG: defaults


@pytest.mark.parametrize(("attr", "value", "expected"), [("strength", "2.5", 2.5), ("enabled", 1, True),
                                                         ("enabled", "on", True), ("start", 0, 0.0)])
def test_coercions_a_user_would_expect(attr, value, expected):
    assert getattr(VALID.replace(**{attr: value}).validate(), attr) == expected
    assert type(expected) is FIELD_BY_ATTR[attr].kind
