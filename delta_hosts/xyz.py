"""X/Y/Z plot axes. Values reach the script through `p.ds_<attr>` (unit n: `p.ds<n>_<attr>`), read in
Script.process."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from lib_delta import DeltaError, logger
from lib_delta.spec import FIELD_BY_ATTR, SCHEDULES, SPEEDS, STRENGTH_MODES, UNITS, coerce

from . import choices
from .generation import override_prefix

PREFIX = "[DS] "
# (attr, label, cost): model axes are costly so the grid loops over them outermost
AXES: tuple[tuple[str, str, float], ...] = (
    ("strength", "Lambda", 0.0),
    ("schedule", "Schedule", 0.0),
    ("source", "Source checkpoint", 1.0),
    ("adapter", "Adapter", 0.9),
    ("enabled", "Enabled", 0.0),
    ("speed", "Speed", 0.0),
    ("strength_mode", "Strength mode", 0.0),
    ("cap", "Cap", 0.0),
    ("control_weight", "ControlNet weight", 0.0),
    ("ipadapter_weight", "IP-Adapter weight", 0.0),
)
UNIT_AXES = ("strength",)  # units 2..: "[DS n] Lambda"
AXIS_CHOICES: dict[str, Callable[[], list[str]]] = {
    "schedule": lambda: list(SCHEDULES),
    "source": choices.checkpoints,
    "adapter": lambda: choices.adapters(None),
    "enabled": lambda: ["True", "False"],
    "speed": lambda: list(SPEEDS),
    "strength_mode": lambda: list(STRENGTH_MODES),
}


def apply_field(attr: str, unit: int = 1) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        setattr(p, override_prefix(unit) + attr, coerce(FIELD_BY_ATTR[attr], x))

    return apply


def confirm_field(attr: str) -> Callable[[Any, list[Any]], None]:
    field = FIELD_BY_ATTR[attr]

    def confirm(p: Any, xs: list[Any]) -> None:
        for x in xs:
            value = coerce(field, x)
            if field.kind is float and not (field.minimum <= value <= field.maximum):
                raise DeltaError(f"{PREFIX}{field.label}: {value} is outside [{field.minimum}, {field.maximum}]")

    return confirm


def find_xyz_module() -> ModuleType | None:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def register() -> None:
    """Add the DS axes once; safe to call at import and again from on_before_ui."""
    xyz = find_xyz_module()
    if xyz is None:
        logger.debug("X/Y/Z plot script not found; DS axes not registered")
        return
    if any(opt.label.startswith(PREFIX) for opt in xyz.axis_options):
        return
    axes = [(PREFIX, attr, label, cost, 1) for attr, label, cost in AXES]
    axes += [(f"[DS {n}] ", attr, label, cost, n) for n in range(2, UNITS + 1)
             for attr, label, cost in AXES if attr in UNIT_AXES]
    for prefix, attr, label, cost, unit in axes:
        kind = float if FIELD_BY_ATTR[attr].kind is float else str
        xyz.axis_options.append(xyz.AxisOption(
            prefix + label, kind, apply_field(attr, unit), confirm=confirm_field(attr), cost=cost,
            choices=AXIS_CHOICES.get(attr)))
