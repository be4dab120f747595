"""LoRA / LyCORIS adapters applied on the fly, one layer at a time.

While `LoraAdapter.enabled()` is active, every patched module runs with its
merged weight W' = W + multiplier * dW, built just before its forward and
dropped right after it; outside the context the model is untouched.
The math follows A1111's extensions-builtin/Lora (scale, then DoRA, then
multiplier).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import logger as log
from .lora_keys import LoraError, ModelIndex, Target, stem_and_suffix

Shape = tuple[int, ...]

_EXAMPLES = 5
_KNOWN_SUFFIXES = {
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input",
}  # fmt: skip

SUPPORTED = "LoRA/LoCon, LoHa, LoKr, DoRA, IA3, norm and full diff (kohya, LyCORIS, diffusers and PEFT keys)"


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Reads a .safetensors adapter to CPU; other formats belong to the host's safe loader."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise LoraError(f"Only .safetensors adapters can be read directly, not {os.path.basename(path)!r}.")
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file not found: {path}")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises several error types for bad files
        raise LoraError(f"LoRA file is not a valid safetensors file: {path} ({exc})") from exc


@dataclass(frozen=True)
class KeyReport:
    matched: int
    unmatched: int
    skipped_text_encoder: int
    unmatched_examples: tuple[str, ...]
    skipped_types: int = 0  # keys of module types this extension does not apply (OFT, GLoRA, ...)


# ---------------------------------------------------------------- math


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Rebuilds (out, in, k, k) from a Tucker core and its (rank, out) / (rank, in) factors."""
    return torch.einsum("ij...,jr,ip->pr...", core, _matrix(w_b), _matrix(w_a))


def _kind(parts: dict[str, torch.Tensor]) -> str | None:
    if {"lora_up.weight", "lora_down.weight"} <= parts.keys():
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts.keys():
        return "loha"
    has_w1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts.keys()
    has_w2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts.keys()
    if has_w1 and has_w2:
        return "lokr"
    if "diff" in parts:
        return "full"
    if "w_norm" in parts:
        return "norm"
    return "ia3" if {"weight", "on_input"} <= parts.keys() else None


def _raw_delta(kind: str, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    """Unscaled dW in the adapter's own layout, and the rank that alpha divides by."""
    if kind == "lora":
        up, down = _matrix(p["lora_up.weight"]), _matrix(p["lora_down.weight"])
        if "lora_mid.weight" in p:  # CP / Tucker LoCon
            return torch.einsum("nm...,in,mj->ij...", p["lora_mid.weight"], up, down), down.shape[0]
        return up @ down, down.shape[0]
    if kind == "loha":
        halves = []
        for i in ("1", "2"):
            w_a, w_b, core = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"], p.get(f"hada_t{i}")
            half = _tucker(core, w_a, w_b) if core is not None else _matrix(w_a) @ _matrix(w_b)
            halves.append(_matrix(half))
        return halves[0] * halves[1], p["hada_w1_b"].shape[0]
    if kind == "lokr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else _matrix(p["lokr_w1_a"]) @ _matrix(p["lokr_w1_b"])
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = _matrix(p["lokr_w2_a"]) @ _matrix(p["lokr_w2_b"])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        rank_of = p.get("lokr_w2_b", p.get("lokr_w1_b"))  # A1111: w2's rank wins
        return torch.kron(w1, w2.contiguous()), rank_of.shape[0] if rank_of is not None else None
    if kind == "norm":
        return p["w_norm"], None
    return p["diff"], None


def _dora_by_row(magnitude: Shape, weight: Shape) -> bool:
    """DoRA's axis, by ComfyUI's rule: per output row when the magnitude's first dimension is the number of
    outputs ((out,) from PEFT, (out, 1, ...) from LyCORIS wd_on_out), else per input column ((1, in, ...))."""
    return len(magnitude) >= 1 and magnitude[0] == weight[0] and (len(magnitude) == 1 or weight[0] > 1)


def _decompose(delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: rescale W + dW to the stored magnitude, per output row or per input column."""
    merged = weight + delta
    ones = [1] * (weight.dim() - 1)
    if _dora_by_row(tuple(magnitude.shape), tuple(weight.shape)):
        norm = _matrix(merged).norm(dim=1).reshape(weight.shape[0], *ones)
    else:
        columns = merged.transpose(0, 1).reshape(weight.shape[1], -1)
        norm = columns.norm(dim=1, keepdim=True).reshape(weight.shape[1], *ones).transpose(0, 1)
    return merged * (magnitude.reshape(norm.shape) / norm) - weight


def _matrix_shape(shape: Shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _product_shape(a: Shape, b: Shape) -> tuple[int, int]:  # of _matrix(a) @ _matrix(b)
    (rows, inner), (inner_b, cols) = _matrix_shape(a), _matrix_shape(b)
    if inner != inner_b:
        raise ValueError(f"factors {a} and {b} do not chain")
    return rows, cols


def _tucker_shape(core: Shape, w_a: Shape, w_b: Shape) -> Shape:
    (i, p), (j, r) = _matrix_shape(w_a), _matrix_shape(w_b)
    if tuple(core[:2]) != (i, j):
        raise ValueError(f"Tucker core {core} does not fit factors {w_a}, {w_b}")
    return (p, r, *core[2:])


def _check_shapes(kind: str, s: dict[str, Shape], weight: Shape) -> None:
    """Raises ValueError unless _raw_delta on factors of these shapes fits the weight: mirrors it."""
    if kind == "lora":
        up, down = _matrix_shape(s["lora_up.weight"]), _matrix_shape(s["lora_down.weight"])
        if "lora_mid.weight" in s:
            delta = _tucker_shape(s["lora_mid.weight"], (up[1], up[0]), down)
        else:
            delta = _product_shape(up, down)
    elif kind == "loha":
        halves = []
        for i in ("1", "2"):
            w_a, w_b, core = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"], s.get(f"hada_t{i}")
            halves.append(
                _matrix_shape(_tucker_shape(core, w_a, w_b) if core is not None else _product_shape(w_a, w_b))
            )
        if halves[0] != halves[1]:
            raise ValueError(f"LoHa halves differ: {halves}")
        delta = halves[0]
    elif kind == "lokr":
        w1 = s["lokr_w1"] if "lokr_w1" in s else _product_shape(s["lokr_w1_a"], s["lokr_w1_b"])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = _tucker_shape(s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"])
        else:
            w2 = _product_shape(s["lokr_w2_a"], s["lokr_w2_b"])
        delta = (w1[0] * w2[0], math.prod(w1[1:]) * math.prod(w2[1:]))
    elif kind == "ia3":
        if len(weight) != 2 or math.prod(s["weight"]) not in weight:  # Linear layers, as A1111
            raise ValueError(f"IA3 scale {s['weight']} does not fit a weight of shape {tuple(weight)}")
        delta = weight
    else:
        delta = s["diff" if kind == "full" else "w_norm"]
    if delta[0] != weight[0] or math.prod(delta) != math.prod(weight):
        raise ValueError(f"dW of shape {tuple(delta)} does not fit a weight of shape {tuple(weight)}")
    if "dora_scale" in s:
        magnitude = s["dora_scale"]
        by_row = _dora_by_row(magnitude, weight)
        if len(weight) < 2 or math.prod(magnitude) != weight[0 if by_row else 1]:
            raise ValueError(f"dora_scale {magnitude} does not fit a weight of shape {tuple(weight)}")
    for bias in ("diff_b", "b_norm"):
        if bias in s and math.prod(s[bias]) != weight[0]:
            raise ValueError(f"{bias} {s[bias]} does not fit {weight[0]} outputs")


@dataclass
class _Patch:
    """One adapted weight: its factors (CPU), scalars, where it applies, and a cast copy for the last device."""

    target: Target
    kind: str
    parts: dict[str, torch.Tensor]
    alpha: float | None
    fixed_scale: float | None
    on_input: bool = False  # IA3: scale the input columns instead of the output rows
    weight: float = 1.0  # its file's multiplier within a stack of LoRAs (LoraAdapter.stack)
    _cast: tuple[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] | None = field(default=None)

    def factors(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (like.device, like.dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, {k: v.to(device=like.device, dtype=like.dtype) for k, v in self.parts.items()})
        return self._cast[1]

    def deltas(self, weight: torch.Tensor, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(multiplier * dW shaped like weight, multiplier * bias diff or None)."""
        multiplier *= self.weight
        p = self.factors(weight)
        if self.kind == "ia3":  # dW = W * w, per output row or input column
            w = p["weight"].reshape(1, -1) if self.on_input else p["weight"].reshape(-1, 1)
            raw, rank = _matrix(weight) * w, None
        else:
            raw, rank = _raw_delta(self.kind, p)
        scale = self.fixed_scale
        if scale is None:
            scale = self.alpha / rank if self.alpha is not None and rank else 1.0
        delta = raw.reshape(weight.shape) * scale  # a fresh tensor: safe to modify in place below
        if "dora_scale" in p:
            delta = _decompose(delta, weight, p["dora_scale"])
        bias = p.get("diff_b", p.get("b_norm"))
        if bias is not None:
            bias = bias.reshape(weight.shape[0]) * multiplier
        return delta.mul_(multiplier), bias


# ---------------------------------------------------------------- adapter


class LoraAdapter:
    """An adapter bound to one source model; apply it with `enabled()`."""

    def __init__(self, patches: dict[str, list[_Patch]], multiplier: float, report: KeyReport,
                 model: nn.Module) -> None:
        self._patches = patches  # hooked module name -> its patches
        self._model = model
        self._modules = {name: model.get_submodule(name) for name in patches}
        self.multiplier = multiplier
        self.report = report
        self.module_names: tuple[str, ...] = tuple(patches)
        self._active = False

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], model: nn.Module, multiplier: float = 1.0
    ) -> LoraAdapter:
        index = ModelIndex.of(model)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in sd.items():
            base, suffix = stem_and_suffix(key)
            if base == "bundle_emb":  # embeddings bundled for the prompt, not weights
                continue
            groups.setdefault(base, {})[suffix] = tensor
        total = sum(len(g) for g in groups.values())
        patches: dict[str, list[_Patch]] = {}
        matched = skipped = 0
        unmatched: list[str] = []
        unsupported: dict[str, int] = {}  # type (its keys) -> key count
        for base, parts in groups.items():
            if index.skips(base):
                skipped += len(parts)
                continue
            if _kind(parts) is None or set(parts) - _KNOWN_SUFFIXES:
                kind = "+".join(sorted(set(parts) - {"alpha", "scale", "dora_scale"})) or "alpha only"
                unsupported[kind] = unsupported.get(kind, 0) + len(parts)
                continue
            target = index.resolve(base)
            patch = _make_patch(base, parts, target, model) if target else None
            if patch is None:
                unmatched += [base] * len(parts)
                continue
            patches.setdefault(target.module, []).append(patch)
            matched += len(parts)
        unknown = sum(unsupported.values())
        report = KeyReport(matched, len(unmatched), skipped, tuple(dict.fromkeys(unmatched))[:_EXAMPLES], unknown)
        if skipped:
            log.warning("LoRA: %d text-encoder keys skipped (the source has no such text encoder)", skipped)
        types = ", ".join(f"{kind} ({n} keys)" for kind, n in unsupported.items())
        if unknown:
            log.warning("LoRA: %d keys of module types this extension does not apply were skipped: %s "
                        "(supported: %s)", unknown, types, SUPPORTED)
        if unmatched or not matched:
            examples = f" (e.g. {', '.join(report.unmatched_examples)})" if unmatched else ""
            skips = f", {skipped} text-encoder keys skipped" if skipped else ""
            skips += f", {unknown} keys of unsupported module types skipped: {types}" if unknown else ""
            raise LoraError(
                f"LoRA does not fit the source model ({index.family}): {matched} of {total} keys matched, "
                f"{len(unmatched)} unmatched{examples}{skips}. Supported module types: {SUPPORTED}."
            )
        log.info("LoRA: %d modules patched from %d of %d keys", len(patches), matched, total)
        return cls(patches, multiplier, report, model)

    @classmethod
    def stack(cls, adapters: Sequence[LoraAdapter]) -> LoraAdapter:
        """Several adapters of one model as one, each at its own multiplier: the sum of their weight deltas,
        each taken against the original weight (A1111's order for several LoRAs)."""
        if len(adapters) == 1:
            return adapters[0]
        patches: dict[str, list[_Patch]] = {}
        for adapter in adapters:
            for name, own in adapter._patches.items():
                patches.setdefault(name, []).extend(
                    dataclasses.replace(p, weight=p.weight * adapter.multiplier) for p in own)
        reports = [a.report for a in adapters]
        report = KeyReport(sum(r.matched for r in reports), sum(r.unmatched for r in reports),
                           sum(r.skipped_text_encoder for r in reports), reports[0].unmatched_examples,
                           sum(r.skipped_types for r in reports))
        return cls(patches, 1.0, report, adapters[0]._model)

    def merged_params(self, module_name: str) -> dict[str, torch.Tensor]:
        """{parameter path below the module: merged value} for one patched module (its dtype and device)."""
        return _merged(self._patches[module_name], self._modules[module_name], self.multiplier)

    def merged_weight(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', bias' or None) for a module patched in its own `weight`."""
        merged = self.merged_params(module_name)
        return merged["weight"], merged.get("bias")

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """Patched modules run with merged weights inside; all hooks are gone on exit."""
        if self._active:
            raise RuntimeError("LoraAdapter.enabled() is already active")
        saved: dict[nn.Module, list[tuple[nn.Module, str, nn.Parameter | None]]] = {}

        def restore(module: nn.Module) -> None:
            for owner, leaf, original in reversed(saved.pop(module, [])):
                owner._parameters[leaf] = original

        def swap_in(patches: list[_Patch], module: nn.Module, _args: object) -> None:
            restore(module)  # a previous forward that raised left its swap behind
            merged = _merged(patches, module, self.multiplier)
            swaps = saved.setdefault(module, [])
            for path, value in merged.items():
                owner, leaf = _owner(module, path)
                swaps.append((owner, leaf, owner._parameters.get(leaf)))
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)

        def swap_out(module: nn.Module, _args: object, _output: object) -> None:
            restore(module)

        handles = []
        self._active = True
        try:
            for name, patches in self._patches.items():
                module = self._modules[name]
                handles.append(module.register_forward_pre_hook(functools.partial(swap_in, patches)))
                # prepended, so that stacked adapters restore in reverse order (LIFO)
                handles.append(module.register_forward_hook(swap_out, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in list(saved):
                restore(module)
            self._active = False

    @contextlib.contextmanager
    def rows(self, first_row: int) -> Iterator[None]:
        """Batched pair: patched modules run rows ..first_row with their own weights and the rest with merged
        weights, each as a separate call, so both halves equal an unbatched call of the same rows."""
        if self._active:
            raise RuntimeError("LoraAdapter.rows() inside enabled()")
        overridden: list[tuple[nn.Module, object]] = []

        def split(module: nn.Module, patches: list[_Patch], forward: Callable[..., torch.Tensor]):
            def forward_split(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
                if x.shape[0] <= first_row:
                    raise RuntimeError(f"batched pair: {x.shape[0]} rows, the adapted rows start at {first_row}")
                head = forward(x[:first_row], *args, **kwargs)
                originals = []
                try:
                    for path, value in _merged(patches, module, self.multiplier).items():
                        owner, leaf = _owner(module, path)
                        originals.append((owner, leaf, owner._parameters.get(leaf)))
                        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    tail = forward(x[first_row:], *args, **kwargs)
                finally:
                    for owner, leaf, original in reversed(originals):
                        owner._parameters[leaf] = original
                return torch.cat([head, tail])

            return forward_split

        self._active = True
        try:
            for name, patches in self._patches.items():
                module = self._modules[name]
                overridden.append((module, module.__dict__.get("forward")))
                module.forward = split(module, patches, module.forward)
            yield
        finally:
            for module, own in reversed(overridden):
                if own is None:
                    del module.forward
                else:
                    module.forward = own
            self._active = False

    def merge_into_(self, model: nn.Module) -> None:
        """Adds the adapter to `model`'s weights in place (builds reference models for tests)."""
        for name, patches in self._patches.items():
            module = model.get_submodule(name)
            for path, value in _merged(patches, module, self.multiplier).items():
                owner, leaf = _owner(module, path)
                with torch.no_grad():
                    if owner._parameters.get(leaf) is None:
                        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    else:
                        owner._parameters[leaf].copy_(value)


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the module holding a parameter, its name there) for a dotted path below `module`."""
    prefix, _, leaf = path.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def _bias_path(weight_path: str) -> str:
    prefix, _, leaf = weight_path.rpartition(".")
    bias = "in_proj_bias" if leaf == "in_proj_weight" else "bias"
    return f"{prefix}.{bias}" if prefix else bias


def _make_patch(base: str, parts: dict[str, torch.Tensor], target: Target, model: nn.Module) -> _Patch | None:
    """The patch for one target, or None when the factor shapes do not fit its weight."""
    kind = _kind(parts)
    assert kind is not None
    scalars = {k: float(parts[k].item()) for k in ("alpha", "scale", "on_input") if k in parts}
    tensors = {k: v for k, v in parts.items() if k not in scalars}
    try:
        owner, leaf = _owner(model.get_submodule(target.module), target.param)
        weight = owner._parameters[leaf]
        shape = tuple(weight.shape)
        if target.rows is not None:
            shape = (target.rows[1] - target.rows[0], *shape[1:])
        _check_shapes(kind, {k: tuple(v.shape) for k, v in tensors.items()}, shape)
    except (AttributeError, KeyError, ValueError) as exc:
        log.debug("LoRA %s does not fit %s: %s", base, target, exc)
        return None
    return _Patch(target, kind, tensors, scalars.get("alpha"), scalars.get("scale"), bool(scalars.get("on_input")))


def _merged(patches: list[_Patch], module: nn.Module, multiplier: float) -> dict[str, torch.Tensor]:
    """W + m*dW (and bias + m*diff_b) for each parameter the patches touch, in the weight's dtype on its
    device. One patch per parameter (the usual case) reuses dW's memory: the peak stays near one layer."""
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for patch in patches:
            path, rows = patch.target.param, patch.target.rows
            owner, leaf = _owner(module, path)
            current = owner._parameters[leaf]
            region = slice(*rows) if rows else slice(None)
            delta, bias_delta = patch.deltas(current[region], multiplier)
            if path not in merged and rows is None:
                merged[path] = delta.add_(current)
            else:
                merged.setdefault(path, current.detach().clone())[region] += delta
            if bias_delta is not None:
                bias_path = _bias_path(path)
                if bias_path not in merged:
                    bias_owner, bias_leaf = _owner(module, bias_path)
                    bias = bias_owner._parameters.get(bias_leaf)
                    merged[bias_path] = bias.detach().clone() if bias is not None else \
                        current.new_zeros(current.shape[0])
                merged[bias_path][region] += bias_delta
    return merged


# ---------------------------------------------------------------- host (ComfyUI-style) patches

_COMFY_PARTS = {
    "lora": ("lora_up.weight", "lora_down.weight", "alpha", "lora_mid.weight", "dora_scale"),
    "loha": ("hada_w1_a", "hada_w1_b", "alpha", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "dora_scale"),
    "lokr": ("lokr_w1", "lokr_w2", "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
             "dora_scale"),
    "diff": ("diff",),
}  # fmt: skip


def _host_patch_parts(patch: object) -> tuple[str, tuple]:
    """(kind, values) of a host patch: Neo's WeightAdapter (.name, .weights) or a `(kind, values)` tuple."""
    name, weights = getattr(patch, "name", None), getattr(patch, "weights", None)
    if isinstance(name, str) and isinstance(weights, tuple):
        return name, weights
    if isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[0], str):
        return patch
    return "diff", tuple(patch) if isinstance(patch, tuple | list) else (patch,)


def host_patch_misfit(patch: object, weight_shape: Shape) -> str | None:
    """Why a Forge/ComfyUI-style LoRA patch cannot apply to a weight of this shape, or None when it fits
    (or is a kind this check does not know, which the host handles itself)."""
    kind, values = _host_patch_parts(patch)
    names = _COMFY_PARTS.get(kind)
    if names is None:
        return None
    shapes = {n: tuple(v.shape) for n, v in zip(names, values, strict=False)
              if isinstance(v, torch.Tensor) and n != "alpha"}
    try:
        _check_shapes("full" if kind == "diff" else kind, shapes, tuple(weight_shape))
    except (KeyError, ValueError) as exc:
        return str(exc)
    return None


def patch_key_count(patch: object) -> int:
    """How many file keys one host patch was built from (its tensors, and its alpha)."""
    values = _host_patch_parts(patch)[1]
    return sum(isinstance(v, torch.Tensor) for v in values) + (len(values) > 2 and values[2] is not None)


def check_host_patches(name: str, source: str, total: int, unmatched_names: Iterable[str],
                       groups: Iterable[tuple[dict, Mapping[str, torch.Tensor]]]) -> KeyReport:
    """Refuse a LoRA that a host's loader matched by key names only: every patch must also fit the shape
    of its weight (`groups`: host patches and the state dict they target). Raises LoraError with counts."""
    matched, misfits = 0, []
    for patches, state in groups:
        for key, patch in patches.items():
            weight_key, offset = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
            weight = state.get(weight_key)
            shape = None if weight is None else tuple(weight.shape)
            if shape is not None and offset is not None:  # (dim, start, length): a slice of the weight
                shape = (*shape[: offset[0]], offset[2], *shape[offset[0] + 1 :])
            why = "no such weight" if shape is None else host_patch_misfit(patch, shape)
            if why is None:
                matched += patch_key_count(patch)
            else:
                misfits.append((weight_key, patch_key_count(patch)))
    rest = list(unmatched_names)
    unmatched = len(rest) + sum(n for _, n in misfits)
    examples = tuple(dict.fromkeys([k for k, _ in misfits] + rest))[:_EXAMPLES]
    report = KeyReport(matched, unmatched, 0, examples)
    if misfits or not matched:
        shapes = f", {len(misfits)} with shapes that do not fit" if misfits else ""
        raise LoraError(f"Delta Sampling: LoRA '{name}' does not fit the source '{source}': {matched} of {total} "
                        f"keys matched, {unmatched} unmatched{shapes} (e.g. {', '.join(examples)}). "
                        "It was made for another architecture.")
    return report
