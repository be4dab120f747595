"""The settings spec: one frozen table drives the UI, infotext, paste parsing, X/Y/Z axes and API args."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import DeltaError

SPEC_VERSION = 3  # v2: LoRA stacks, units 2.., ControlNet; v3: IP-Adapter (older values still read)
INFOTEXT_KEY = "Delta Sampling"  # the compact, versioned value (unit 1; unit n: "Delta Sampling n")
UNITS = 3  # DS units in the panel: target += sum of lambda_i * delta_i
UNITS_SINCE = 2  # the infotext version that introduced units 2..
ADAPTER_KINDS = ("lora", "checkpoint", "prompt")
SCHEDULES = ("constant", "linear", "cosine", "exponential", "sigmoid")
STRENGTH_MODES = ("fixed", "auto")
SPEEDS = ("exact", "balanced", "fast", "custom")
LAMBDA_RANGE = (-2.0, 10.0)
MALFORMED = "[malformed DS infotext] "  # source value standing for a paste that could not be read


@dataclass(frozen=True)
class Field:
    attr: str  # DeltaSettings attribute; X/Y/Z writes p.ds_<attr>
    label: str  # UI label and readable infotext key
    short: str  # key inside the compact infotext value
    kind: type
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    readable: bool = False  # also written as its own infotext key
    tooltip: str = ""
    empty_label: str = ""  # what a dropdown shows for the empty value; submitting it means empty
    since: int = 1  # the infotext version that introduced it
    infotext: bool = True  # False: never written to or read from infotext (an image)


FIELDS: tuple[Field, ...] = (
    Field("enabled", "Delta Sampling", "on", bool, False, tooltip="Turn Delta Sampling on for this generation."),
    Field("source", "DS source", "src", str, "", readable=True, empty_label="(choose a source)",
          tooltip="Base checkpoint the adapter was made for (e.g. SD1.5). Runs beside the active checkpoint."),
    Field("adapter_kind", "DS adapter kind", "kind", str, "lora", choices=ADAPTER_KINDS,
          tooltip="lora: LoRA/LyCORIS file on the source; checkpoint: a fine-tune of the source; "
                  "prompt: the same source with the adapted prompt only."),
    Field("adapter", "DS adapter", "adp", str, "", readable=True, empty_label="(choose an adapter)",
          tooltip="The LoRA/LyCORIS file or fine-tuned checkpoint whose effect is transferred."),
    Field("adapter_weight", "DS adapter weight", "w", float, 1.0, -4.0, 4.0, 0.05,
          tooltip="LoRA multiplier applied on the source side."),
    Field("strength", "DS lambda", "lam", float, 1.0, LAMBDA_RANGE[0], LAMBDA_RANGE[1], 0.05, readable=True,
          tooltip="lambda: how much of the adapter's effect to add. ~1 within a family, 2-4.5 for "
                  "SD1.5->SDXL. Negative pushes away from the adapter's effect."),
    Field("schedule", "DS schedule", "sch", str, "constant", choices=SCHEDULES, readable=True,
          tooltip="How lambda changes over the active window of the sampling steps."),
    Field("start", "DS start", "st", float, 0.0, 0.0, 1.0, 0.01, tooltip="Fraction of sampling where DS starts."),
    Field("end", "DS end", "en", float, 1.0, 0.0, 1.0, 0.01, tooltip="Fraction of sampling where DS stops."),
    Field("base_prompt", "DS base prompt", "bp", str, "",
          tooltip="Prompt for the source base model; {prompt} stands for each image's own prompt. "
                  "Empty: the target's prompt."),
    Field("adapted_prompt", "DS adapted prompt", "ap", str, "",
          tooltip="Prompt for the adapted source model (add trigger words here); {prompt} stands for each "
                  "image's own prompt, e.g. '{prompt}, pixel art'. Empty: the base prompt."),
    Field("negative_prompt", "DS negative prompt", "np", str, "",
          tooltip="Negative prompt for both source models; {prompt} stands for each image's own negative "
                  "prompt. Empty: the target's negative prompt."),
    Field("source_cfg", "DS source CFG", "cfg", float, 0.0, 0.0, 30.0, 0.5,
          tooltip="CFG scale for the source pair. 0: the target's CFG scale."),
    Field("strength_mode", "DS strength mode", "sm", str, "fixed", choices=STRENGTH_MODES, readable=True,
          tooltip="fixed: lambda as set. auto: lambda is relative to the target's own guidance: each step "
                  "scales the delta to lambda x the size of the target's CFG update (start at 1)."),
    Field("cap", "DS cap", "cap", float, 0.0, 0.0, 10.0, 0.05,
          tooltip="Limit the added lambda x delta to this multiple of the target's CFG update (against "
                  "over-saturation at large lambda). 0: no limit."),
    Field("speed", "DS speed", "spd", str, "exact", choices=SPEEDS, readable=True,
          tooltip="exact: same result as the plain method. balanced / fast: shortcuts with a measured cost "
                  "(README, Performance). custom: the knobs below."),
    Field("batched", "DS batched pair", "bat", bool, True,
          tooltip="custom: run base and adapted as one batch where they share weights (same result, more "
                  "memory per step)."),
    Field("cond_only", "DS cond-only delta", "co", bool, False,
          tooltip="custom: skip the source's uncond passes (half the source cost, approximate for LoRA)."),
    Field("reuse", "DS delta every", "ru", float, 1.0, 1.0, 4.0, 1.0,
          tooltip="custom: compute the delta every k model calls and reuse it in between."),
    Field("native_size", "DS native-size source", "ns", bool, False,
          tooltip="custom: run the source at its own trained resolution (e.g. SD1.5 at ~512 px under a "
                  "1024 px SDXL target) and scale the delta up."),
    Field("loras", "DS more LoRAs", "lx", str, "", since=2,
          tooltip="More LoRA/LyCORIS files on the adapted side, on top of the adapter (any kind): "
                  "'name:weight, name:weight' or <lora:name:weight>. With a checkpoint adapter: a fine-tune plus "
                  "LoRAs in one adapted branch."),
    Field("control_model", "DS ControlNet", "cn", str, "", since=2, empty_label="(no ControlNet)",
          tooltip="A ControlNet made for the source (e.g. an SD1.5 canny model), on the adapted side only: its "
                  "effect reaches your image through the delta. Empty: none."),
    Field("control_weight", "DS ControlNet weight", "cnw", float, 1.0, 0.0, 2.0, 0.05, since=2,
          tooltip="How strongly the ControlNet steers the adapted source."),
    Field("control_start", "DS ControlNet start", "cns", float, 0.0, 0.0, 1.0, 0.01, since=2,
          tooltip="Fraction of sampling where the ControlNet starts (on the source's noise levels)."),
    Field("control_end", "DS ControlNet end", "cne", float, 1.0, 0.0, 1.0, 0.01, since=2,
          tooltip="Fraction of sampling where the ControlNet stops."),
    Field("control_preprocessor", "DS ControlNet preprocessor", "cnp", str, "canny", choices=("canny", "none"),
          since=2, tooltip="canny: edges of the control image (OpenCV, thresholds 100/200); none: the image is "
                           "already a control map."),
    Field("control_image", "DS ControlNet image", "", object, None, since=2, infotext=False,
          tooltip="The control image (not stored in the infotext). Empty in img2img: the img2img input."),
    Field("ipadapter_model", "DS IP-Adapter", "ip", str, "", since=3, empty_label="(no IP-Adapter)",
          tooltip="An IP-Adapter made for the source (e.g. ip-adapter_sd15), on the adapted side only: the "
                  "reference image steers your image through the delta. Uses the WebUI's CLIP image encoder."),
    Field("ipadapter_weight", "DS IP-Adapter weight", "ipw", float, 1.0, 0.0, 2.0, 0.05, since=3,
          tooltip="How strongly the reference image steers the adapted source."),
    Field("ipadapter_image", "DS IP-Adapter image", "", object, None, since=3, infotext=False,
          tooltip="The reference image (not stored in the infotext). Empty in img2img: the img2img input."),
)
POSITIONAL_STRIDES = {2: 27}  # fields per unit in positional args of older versions (v2: before IP-Adapter)
SPEED_KNOBS = ("batched", "cond_only", "reuse", "native_size")
PRESETS: dict[str, dict[str, Any]] = {  # what each speed preset sets; README, Performance, has their costs
    "exact": {"batched": True, "cond_only": False, "reuse": 1.0, "native_size": False},
    "balanced": {"batched": True, "cond_only": False, "reuse": 2.0, "native_size": False},
    "fast": {"batched": True, "cond_only": True, "reuse": 2.0, "native_size": True},
}
FIELD_BY_ATTR: dict[str, Field] = {f.attr: f for f in FIELDS}
XYZ_ATTRS = ("strength", "schedule", "source", "adapter", "enabled", "speed", "strength_mode", "cap")


@dataclass(frozen=True)
class DeltaSettings:
    enabled: bool = False
    source: str = ""
    adapter_kind: str = "lora"
    adapter: str = ""
    adapter_weight: float = 1.0
    strength: float = 1.0
    schedule: str = "constant"
    start: float = 0.0
    end: float = 1.0
    base_prompt: str = ""
    adapted_prompt: str = ""
    negative_prompt: str = ""
    source_cfg: float = 0.0
    strength_mode: str = "fixed"
    cap: float = 0.0
    speed: str = "exact"
    batched: bool = True
    cond_only: bool = False
    reuse: float = 1.0
    native_size: bool = False
    loras: str = ""
    control_model: str = ""
    control_weight: float = 1.0
    control_start: float = 0.0
    control_end: float = 1.0
    control_preprocessor: str = "canny"
    control_image: Any = dataclasses.field(default=None, compare=False, repr=False)
    ipadapter_model: str = ""
    ipadapter_weight: float = 1.0
    ipadapter_image: Any = dataclasses.field(default=None, compare=False, repr=False)

    def knob(self, attr: str) -> Any:
        """A speed knob's effective value: the preset's, or the field's own under speed 'custom'."""
        return getattr(self, attr) if self.speed == "custom" else PRESETS[self.speed][attr]

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> DeltaSettings:
        """From positional UI/API args, in FIELDS order; missing trailing args take defaults."""
        if len(args) > len(FIELDS):
            raise DeltaError(f"Delta Sampling takes {len(FIELDS)} args, got {len(args)}")
        values = {f.attr: coerce(f, v) for f, v in zip(FIELDS, args, strict=False)}
        return cls(**values)

    def to_args(self) -> list[Any]:
        return [getattr(self, f.attr) for f in FIELDS]

    def replace(self, **changes: Any) -> DeltaSettings:
        return dataclasses.replace(self, **{k: coerce(FIELD_BY_ATTR[k], v) for k, v in changes.items()})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DeltaSettings:
        """The API's unit form: {attr: value}; a unit given this way is enabled unless it says otherwise."""
        unknown = sorted(set(values) - set(FIELD_BY_ATTR))
        if unknown:
            raise DeltaError(f"Delta Sampling: unknown unit keys {unknown}; the keys are {[f.attr for f in FIELDS]}")
        return cls(**{"enabled": True, **{k: coerce(FIELD_BY_ATTR[k], v) for k, v in values.items()}})

    def stacked_loras(self) -> tuple[tuple[str, float], ...]:
        """DS more LoRAs as (name, weight) pairs."""
        return parse_loras(self.loras)

    def with_overrides(self, obj: Any, prefix: str = "ds_") -> DeltaSettings:
        """Apply X/Y/Z-style overrides stored as attributes `ds_<attr>` on `obj` (the WebUI's `p`)."""
        found = {f.attr: getattr(obj, prefix + f.attr) for f in FIELDS if hasattr(obj, prefix + f.attr)}
        return self.replace(**found) if found else self

    def validate(self) -> DeltaSettings:
        """Raise DeltaError for settings that would give a wrong image; return self."""
        if not self.enabled:
            return self
        if not self.source:
            raise DeltaError("Delta Sampling: DS source is empty: choose a source base checkpoint.")
        if self.source.startswith(MALFORMED):
            raise DeltaError(self.source[len(MALFORMED):])
        if self.adapter_kind not in ADAPTER_KINDS:
            raise DeltaError(f"Delta Sampling: unknown adapter kind {self.adapter_kind!r}; use one of {ADAPTER_KINDS}.")
        if self.adapter_kind != "prompt" and not self.adapter:
            raise DeltaError(f"Delta Sampling: DS adapter is empty: choose a {self.adapter_kind} adapter file.")
        if self.adapter_kind == "prompt" and not (self.adapted_prompt or self.stacked_loras()):
            raise DeltaError("Delta Sampling: DS adapted prompt is empty: a prompt adapter needs an adapted prompt "
                             "(or LoRAs in DS more LoRAs).")
        for f in FIELDS:
            if f.choices and getattr(self, f.attr) not in f.choices:
                raise DeltaError(f"Delta Sampling: {f.label} must be one of {', '.join(f.choices)}, "
                                 f"got {getattr(self, f.attr)!r}")
        if self.reuse != int(self.reuse):
            raise DeltaError(f"Delta Sampling: DS delta every must be a whole number of model calls, got {self.reuse}")
        for f in FIELDS:
            value = getattr(self, f.attr)
            if f.kind is float and not math.isfinite(value):
                raise DeltaError(f"Delta Sampling: {f.label} must be a finite number, got {value}.")
            if f.kind is float and f.minimum is not None and not f.minimum <= value <= f.maximum:
                raise DeltaError(f"Delta Sampling: {f.label} = {value} is outside [{f.minimum}, {f.maximum}].")
        self.stacked_loras()  # raises on a bad weight
        if self.control_model and self.control_start >= self.control_end:
            raise DeltaError(f"Delta Sampling: DS ControlNet start ({self.control_start}) must be before its end "
                             f"({self.control_end}).")
        if self.start >= self.end:
            raise DeltaError(f"Delta Sampling: DS start ({self.start}) must be before DS end ({self.end}).")
        return self

    # -- infotext ---------------------------------------------------------------------------------
    def to_infotext(self, unit: int = 1, version: int | None = None) -> dict[str, str]:
        """One compact versioned value ("v1; lam=2.5; ...", defaults left out) plus readable parts (unit 1).
        The version is the oldest that holds these settings, so older installs still read plain ones."""
        if not self.enabled:
            return {}
        version = version or self.version()
        parts = [f"v{version}"]
        for f in FIELDS[1:]:
            value = getattr(self, f.attr)
            if f.infotext and value != f.default:
                parts.append(f"{f.short}={_escape(repr(value) if f.kind is float else str(value))}")
        entries = {unit_key(unit): "; ".join(parts)}
        for f in FIELDS if unit == 1 else ():
            if f.readable and getattr(self, f.attr) != "":  # A1111 cannot parse an empty value
                entries[f.label] = format_value(getattr(self, f.attr))
        return entries

    def version(self) -> int:
        return max([1, *(f.since for f in FIELDS if f.infotext and getattr(self, f.attr) != f.default)])

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any], unit: int = 1) -> DeltaSettings:
        """Parse pasted infotext params. No DS key means DS off. Malformed values raise DeltaError."""
        key = unit_key(unit)
        raw = params.get(key)
        if raw is None:
            return cls()
        version, *parts = str(raw).split(";")
        if not re.fullmatch(r"v\d+", version.strip()):
            raise DeltaError(f"Malformed '{key}' infotext value {str(raw)[:80]!r}: it must start with a version.")
        if int(version.strip()[1:]) > SPEC_VERSION:
            raise DeltaError(f"Unsupported '{key}' version {version.strip()}: the image was made by a "
                             f"newer Delta Sampling (this one reads up to v{SPEC_VERSION}). Update the extension; its "
                             "settings were not applied.")
        by_short = {f.short: f for f in FIELDS if f.infotext}
        values: dict[str, Any] = {}
        for part in parts:
            k, sep, value = part.strip().partition("=")
            if not sep or k not in by_short or by_short[k].attr in values:
                problem = "unknown or repeated key" if sep else "expected key=value"
                raise DeltaError(f"Malformed '{key}' infotext value: {problem} in {part.strip()[:60]!r}")
            values[by_short[k].attr] = coerce(by_short[k], _unescape(value))
        return cls(enabled=True, **values).validate()


def unit_key(unit: int) -> str:
    return INFOTEXT_KEY if unit == 1 else f"{INFOTEXT_KEY} {unit}"


def units_from_args(args: Sequence[Any]) -> list[DeltaSettings]:
    """Every unit's settings from the script args: the UI's (and the old API's) positional values, unit after
    unit in FIELDS order, or the API's unit form, one {attr: value} dict per unit (the rest is ignored)."""
    if args and isinstance(args[0], Mapping):
        units = [DeltaSettings.from_dict(a) for a in itertools.takewhile(lambda a: isinstance(a, Mapping), args)]
        if len(units) > UNITS:
            raise DeltaError(f"Delta Sampling takes at most {UNITS} units, got {len(units)}")
        return units
    n = len(FIELDS)
    if len(args) > n * UNITS:
        raise DeltaError(f"Delta Sampling takes {n} args per unit, {n * UNITS} in all; got {len(args)}")
    older = [k for k in POSITIONAL_STRIDES.values() if len(args) in (k * 2, k * 3)]
    n = older[0] if older else n  # 54 or 81 args: v2's units 2 and 3 at 27 and 54
    return [DeltaSettings.from_args(args[i : i + n]) for i in range(0, max(len(args), 1), n)]


def units_infotext(units: Sequence[DeltaSettings]) -> dict[str, str]:
    """Infotext of every enabled unit, numbered by position; unit 1's version says whether more follow."""
    entries: dict[str, str] = {}
    several = any(u.enabled for u in units[1:])  # an older install must not read unit 1 alone
    version = max([UNITS_SINCE, *(u.version() for u in units if u.enabled)]) if several else None
    for i, settings in enumerate(units, 1):
        entries |= settings.to_infotext(i, version)
    return entries


LORA_TOKEN = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?[^>]*>")


def parse_loras(text: str) -> tuple[tuple[str, float], ...]:
    """'name:weight, name' or A1111's '<lora:name:weight>' tokens (weight 1 when left out)."""
    text = text.strip()
    items = LORA_TOKEN.findall(text) if "<lora:" in text else [
        tuple(part.strip().rsplit(":", 1)) if ":" in part else (part.strip(), "") for part in text.split(",")]
    out = []
    for name, weight in items:
        name = name.strip()
        if not name:
            continue
        try:
            value = float(weight) if str(weight).strip() else 1.0
        except ValueError:
            raise DeltaError(f"Delta Sampling: DS more LoRAs: bad weight {weight!r} for {name!r}; write "
                             "'name:weight, name:weight'.") from None
        if not math.isfinite(value):
            raise DeltaError(f"Delta Sampling: DS more LoRAs: the weight of {name!r} must be a finite number.")
        out.append((name, value))
    return tuple(out)


ESCAPES = (("%", "%25"), (";", "%3B"), ("=", "%3D"), ("\n", "%0A"))


def _escape(text: str) -> str:
    for raw, escaped in ESCAPES:
        text = text.replace(raw, escaped)
    return text


def _unescape(text: str) -> str:
    for raw, escaped in reversed(ESCAPES):
        text = text.replace(escaped, raw)
    return text


def malformed_source(message: str) -> str:
    """The source value a UI/API paste sets for an unreadable DS infotext; validate() raises with it."""
    return MALFORMED + message


def coerce(field: Field, value: Any) -> Any:
    """Convert a UI/API/infotext/X-Y-Z value to the field's type, or raise DeltaError."""
    if field.kind is object:  # an image: decoded by the host
        return value
    try:
        if field.kind is bool:
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "on", "off"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1", "on")
            if not isinstance(value, int | float) or value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if field.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(value)
            return float(value)
        if not isinstance(value, str | None):
            raise ValueError(value)
        value = "" if value is None or (field.empty_label and value == field.empty_label) else value
    except (TypeError, ValueError) as e:
        raise DeltaError(f"Delta Sampling: bad value {value!r} for {field.label}: expected {_allowed(field)}") from e
    if field.choices and value not in field.choices:
        raise DeltaError(f"Delta Sampling: {field.label} must be one of {', '.join(field.choices)}, got {value!r}")
    return value


def _allowed(field: Field) -> str:
    if field.kind is bool:
        return "true or false (also 1/0, on/off)"
    if field.kind is float:
        bounds = f" in [{field.minimum}, {field.maximum}]" if field.minimum is not None else ""
        return f"a number{bounds} (a numeric string such as '2.5' is accepted)"
    return "text"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
