"""Finding the user's files through the host's registries (the same on A1111 and every Forge)."""

from __future__ import annotations

import os
from typing import Any

import torch

from lib_delta import DeltaError
from lib_delta.lora import read_safetensors


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


def read_weights(filename: str) -> dict[str, torch.Tensor]:
    """safetensors are parsed directly; anything else goes through the host's safe unpickler."""
    from modules import sd_models

    if not os.path.isfile(filename):
        raise DeltaError(f"Delta Sampling: file is missing: {filename}")
    if filename.lower().endswith(".safetensors"):
        return read_safetensors(filename)
    try:
        return sd_models.read_state_dict(filename, map_location="cpu")
    except Exception as e:
        raise DeltaError(f"Delta Sampling: cannot read {os.path.basename(filename)}: {e}") from e


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
