"""Host adapters: the thin glue between lib_delta and a WebUI (these import the WebUI's `modules`).

The host is decided once, here: new Forge (`backend/`), the ldm_patched forks (reForge, Forge Classic),
or A1111. `load_adapter` returns that host's adapter module, or None with a reason for the panel.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lib_delta import logger

A1111, FORGE, LDM_PATCHED = "a1111", "forge", "ldm_patched"
ADAPTERS = {A1111: "a1111", FORGE: "forge", LDM_PATCHED: "forge"}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_host() -> str:
    if _has("backend") and _has("backend.sampling.sampling_function"):
        return FORGE
    if _has("ldm_patched") or _has("modules_forge"):
        return LDM_PATCHED
    return A1111


def load_adapter(host: str) -> tuple[ModuleType | None, str | None]:
    """(adapter module, None), or (None, why this WebUI cannot run Delta Sampling)."""
    try:
        return importlib.import_module(f"{__name__}.{ADAPTERS[host]}"), None
    except ImportError as e:
        reason = (f"Delta Sampling does not support this WebUI ({host}): a module it needs is missing ({e}). "
                  "Supported: AUTOMATIC1111 1.10+, Forge (2024+), reForge and Forge Classic.")
        logger.error("%s", reason)
        return None, reason


HOST = detect_host()
logger.info("host: %s", HOST)
