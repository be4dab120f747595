"""Host adapters: the thin glue between lib_delta and a WebUI (these import the WebUI's `modules`)."""

from __future__ import annotations

import importlib.util

from lib_delta import logger

A1111, FORGE, LDM_PATCHED = "a1111", "forge", "ldm_patched"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_host() -> str:
    """Decided once at import: new Forge (backend/), the ldm_patched forks (reForge, Classic), or A1111."""
    if _has("backend") and _has("backend.sampling.sampling_function"):
        return FORGE
    if _has("ldm_patched") or _has("modules_forge"):
        return LDM_PATCHED
    return A1111


HOST = detect_host()
logger.info("host: %s", HOST)
