"""Reading weight files without running code and without touching them.

`.safetensors` files are validated (header, tensor sizes against the file length) and then parsed here;
anything else is read only by torch's weights-only unpickler. Every failure is a `WeightFileError` that
names the file and its role ("source checkpoint", "LoRA", ...). Hosts get tensors, never paths.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import re
import struct
from collections.abc import Callable

import torch

from . import DeltaError

SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
    "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
CONVERT_HINT = ("Use the model's .safetensors release, or convert the file to .safetensors with a tool you "
                "trust, on a file you trust.")
# Pickled checkpoints from PyTorch Lightning carry these harmless objects beside the weights; they are read
# as inert placeholders (never imported) so that plain SD .ckpt files keep working.
BENIGN_PICKLE_CLASSES = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
NUMPY_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.dtypes.")
# how torch (2.4+: "GLOBAL x", older: "Unsupported class x") and A1111's unpickler ("global 'x/y'") name it
GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)|global '([\w./]+)'")


class WeightFileError(DeltaError):
    """A weight file that is missing, corrupt, or would need code to load."""


def read_weights(path: str, role: str, pickle_fallback: Callable[[str], dict] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The tensors of `path`. `pickle_fallback` (a host's restricted unpickler) is tried only where this
    torch cannot read a pickle weights-only with placeholders (torch < 2.4)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"Delta Sampling: the {role} file is missing: {path}")
    if path.lower().endswith(".safetensors"):
        check_safetensors(path, role)
        return _read_safetensors(path, role)
    try:
        try:
            weights = _read_pickle_weights_only(path)
        except _NeedsPlaceholders:
            if pickle_fallback is None:
                raise WeightFileError(f"Delta Sampling: the {role} '{name}' needs PyTorch 2.4+ to be read safely. "
                                      + CONVERT_HINT) from None
            weights = pickle_fallback(path)
    except WeightFileError:
        raise
    except pickle.UnpicklingError as e:
        found = _global_in(e)
        if not found and not re.search(r"call reduce|Can only build", str(e)):
            raise WeightFileError(f"Delta Sampling: the {role} '{name}' is corrupt or not a PyTorch weight file "
                                  "(its pickle cannot be read).") from e
        asks = f"'{found}'" if found else "objects that are not weights"
        raise WeightFileError(f"Delta Sampling: refused to read the {role} '{name}': it is a pickle that asks for "
                              f"{asks}, which could run code. Delta Sampling reads weights only. "
                              + CONVERT_HINT) from e
    except Exception as e:
        raise WeightFileError(f"Delta Sampling: the {role} '{name}' is corrupt or not a PyTorch weight file "
                              f"({type(e).__name__}: {_first_line(e)}).") from e
    return _tensors(weights, role, name)


def check_safetensors(path: str, role: str) -> None:
    """Raise unless the header parses and every tensor lies inside the file with its dtype's size."""
    name = os.path.basename(path)

    def corrupt(why: str) -> WeightFileError:
        return WeightFileError(f"Delta Sampling: the {role} '{name}' is corrupt: {why}. Download or export it "
                               "again; the file was left as it is.")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"it has {size} bytes, too few for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise corrupt(f"its header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a table of tensors")
    data_len, end_max = size - 8 - header_len, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            expected = count * SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor '{key}' has a malformed entry") from None
        if not (0 <= begin <= end) or end - begin != math.ceil(expected):
            raise corrupt(f"tensor '{key}' has {end - begin} bytes for a {entry['dtype']} of shape {entry['shape']}")
        end_max = max(end_max, end)
    if end_max > data_len:
        raise corrupt(f"it is truncated: its tensors need {end_max} bytes of data, the file holds {data_len}")


def _read_safetensors(path: str, role: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open  # not safetensors.torch.load_file, which some hosts wrap

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:
        raise WeightFileError(f"Delta Sampling: the {role} '{os.path.basename(path)}' is not a valid safetensors "
                              f"file ({_first_line(e)}).") from e


class _NeedsPlaceholders(Exception):
    pass


def _read_pickle_weights_only(path: str) -> object:
    """torch's weights-only unpickler, called directly: hosts may replace `torch.load` with a wrapper."""
    load = torch.serialization.load
    if "weights_only" not in inspect.signature(load).parameters:
        raise _NeedsPlaceholders
    allow = getattr(torch.serialization, "safe_globals", None)
    with open(path, "rb") as f:
        if allow is None:
            try:
                return load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                found = _global_in(e)
                if found and found.startswith(BENIGN_PICKLE_CLASSES + NUMPY_GLOBALS):
                    raise _NeedsPlaceholders from e
                raise
        with allow(_benign_globals()):
            return load(f, map_location="cpu", weights_only=True)


def _benign_globals() -> list:
    """Inert placeholders for BENIGN_PICKLE_CLASSES, and the numpy scalars and dtypes that Lightning
    checkpoints store (for example `global_step`). torch 2.6+ takes (object, pickled name) pairs."""
    import numpy as np

    pairs: list[tuple[object, str]] = []
    for full in BENIGN_PICKLE_CLASSES:
        module, _, qualname = full.rpartition(".")
        placeholder = type(qualname, (), {"__module__": module, "__qualname__": qualname,
                                          "__setstate__": lambda self, state: None})
        pairs.append((placeholder, full))
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    pairs += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
              (np.dtype, "numpy.dtype")]
    for kind in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16, np.float32, np.float64):
        dtype_class = type(np.dtype(kind))
        pairs.append((dtype_class, f"numpy.dtypes.{dtype_class.__name__}"))
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 6):
        return pairs
    return list({id(obj): obj for obj, _ in pairs}.values())  # older torch names them by __module__


def _tensors(weights: object, role: str, name: str) -> dict[str, torch.Tensor]:
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict):
        raise WeightFileError(f"Delta Sampling: the {role} '{name}' holds a {type(weights).__name__}, "
                              "not a table of weights.")
    return _flat(weights)


def _flat(table: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a table, nested tables' under "outer.inner" names (an IP-Adapter .bin nests two)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in table.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
    return out


def _global_in(e: BaseException) -> str | None:
    """The Python name an unpickler refused, as its error message gives it."""
    found = GLOBAL_IN_ERROR.search(str(e))
    return next((g for g in found.groups() if g), None) if found else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
