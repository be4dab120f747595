"""Finding the user's files through the host's registries (the same on A1111 and every Forge)."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace
from typing import Any

import torch

from lib_delta import DeltaError, weights


def split_title(title: str) -> tuple[str, str | None]:
    """'name [hash]' -> (name, hash); a title without a bracketed hash -> (title, None)."""
    if title.endswith("]") and " [" in title:
        name, _, short_hash = title[:-1].rpartition(" [")
        return name, short_hash
    return title, None


def find_checkpoint(title: str) -> Any:
    """CheckpointInfo for a title like 'name [hash]'; the hash wins when the name differs."""
    from modules import sd_models

    if not title:
        raise DeltaError("Delta Sampling: no source checkpoint selected.")
    info = sd_models.get_closet_checkpoint_match(title)
    short_hash = split_title(title)[1]
    if info is None and short_hash:
        info = sd_models.checkpoint_aliases.get(short_hash)
    if info is None:
        raise DeltaError(f"Delta Sampling: checkpoint '{title}' was not found. Check the name or refresh the list.")
    if not os.path.isfile(info.filename):
        raise DeltaError(f"Delta Sampling: checkpoint file is missing: {info.filename}")
    return info


def hashed(info: Any) -> Any:
    """A checkpoint DS loads gets its short hash (A1111 hashes lazily, through its hash cache), so the
    infotext names it 'name [hash]' and a paste finds it again under another name."""
    if not getattr(info, "shorthash", None) and hasattr(info, "calculate_shorthash"):
        info.calculate_shorthash()
    return info


def read_weights(filename: str, role: str) -> dict[str, torch.Tensor]:
    """The tensors of a file chosen as `role`, read before any host loader sees it and without running
    code: safetensors validated and parsed, pickles weights-only (lib_delta.weights)."""
    return weights.read_weights(filename, role, pickle_fallback=_restricted_unpickle)


def _restricted_unpickle(filename: str) -> Any:
    """For torch < 2.4 only: the host's restricted unpickler (A1111's modules.safe, which Forge and its
    forks keep) reads the whole pickle, whatever --disable-safe-unpickle says."""
    try:
        from modules import safe

        find_class = safe.RestrictedUnpickler.find_class
    except (ImportError, AttributeError):
        raise weights.WeightFileError(f"Delta Sampling: {os.path.basename(filename)} cannot be read safely by this "
                                      "PyTorch (2.4+ is needed). " + weights.CONVERT_HINT) from None
    # only its allowlist: torch's loader supplies the storages (A1111's own persistent_load only checks)
    unpickler = type("RestrictedLoad", (pickle.Unpickler,), {"find_class": find_class, "extra_handler": None})
    restricted = SimpleNamespace(Unpickler=unpickler, load=lambda f, **kw: unpickler(f, **kw).load(),
                                 __name__="restricted_pickle")
    try:
        with open(filename, "rb") as f:
            return torch.serialization.load(f, map_location="cpu", pickle_module=restricted, weights_only=False)
    except Exception as e:  # the unpickler raises a plain Exception for a forbidden global
        raise pickle.UnpicklingError(str(e)) from e


def find_lora(name: str) -> tuple[str, str]:
    """(file, 'name [hash]') of a LoRA by name, alias or 'name [hash]'; the hash wins when names differ."""
    networks = _networks()
    bare, wanted_hash = split_title(name)
    entry = networks.available_networks.get(bare) or networks.available_network_aliases.get(bare)
    if wanted_hash and (entry is None or entry.shorthash != wanted_hash):
        entry = getattr(networks, "available_network_hash_lookup", {}).get(wanted_hash, entry)
    if entry is None:
        raise DeltaError(f"Delta Sampling: LoRA '{name}' was not found. Check the name or refresh the list.")
    entry.read_hash()
    return entry.filename, f"{entry.name} [{entry.shorthash}]" if entry.shorthash else entry.name


def _networks() -> Any:
    try:
        import networks  # the built-in Lora extension's registry (loaded before user extensions)
    except ImportError as e:
        raise DeltaError("Delta Sampling: the built-in Lora extension is disabled, so LoRA names cannot be "
                         "resolved. Enable it in Extensions.") from e
    return networks
