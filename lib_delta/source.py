"""The source pair: base and adapted branches run on the same input with their own prompts and CFG.

Host adapters supply a model function (x, sigma, cond) -> x0 rows and per-step conditioning; this
module batches the rows exactly like A1111's CFG denoiser and applies the source CFG scale.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from . import latent, logger
from .delta import CondsList, combine_cfg

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
StepConds = tuple[CondsList, Any, Any]  # (conds_list, cond rows, uncond rows) for one model call


def cat_conds(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def token_length(cond: Any) -> int:
    tensor = cond["crossattn"] if isinstance(cond, dict) else cond
    return tensor.shape[1]


@dataclass
class Branch:
    """One side of the pair: a model, its conditioning per step, and an optional context (LoRA on)."""

    model_fn: ModelFn
    conds_at: Callable[[int], StepConds]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, step: int, scale: float,
                skip_uncond: bool) -> torch.Tensor:
        conds_list, cond, uncond = self.conds_at(step)
        if len(conds_list) != x.shape[0]:
            raise ValueError(f"source conditioning has {len(conds_list)} images, the batch has {x.shape[0]}")
        repeats = [len(c) for c in conds_list]
        x_cond = torch.cat([x[i : i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)])
        s_cond = torch.cat([sigma[i : i + 1].expand(n) for i, n in enumerate(repeats)])
        with self.context():
            if skip_uncond or scale == 1.0:  # CFG 1 is the cond prediction: skip the uncond pass
                out = self.model_fn(x_cond, s_cond, cond)
                first_rows = [c[0][0] for c in conds_list]
                return combine_cfg(torch.cat([out, out[first_rows]]), conds_list, 1.0)
            if token_length(cond) == token_length(uncond):
                out = self.model_fn(torch.cat([x_cond, x]), torch.cat([s_cond, sigma]), cat_conds([cond, uncond]))
            else:
                out = torch.cat([self.model_fn(x_cond, s_cond, cond), self.model_fn(x, sigma, uncond)])
        return combine_cfg(out, conds_list, scale)


@dataclass
class CfgSourcePair:
    """Implements delta.SourcePair with two branches and a source CFG scale."""

    latent_format: latent.LatentFormat
    base: Branch
    adapted: Branch
    cfg_scale: float
    sigma_max: float = math.inf  # the source's highest trained noise level (VP sigma)
    title: str = ""
    cfg_multiplier: float = 1.0  # the target sampler's own CFG factor (A1111's DDIM CFG++: 1/12.5)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, *, adapted: bool, step: int,
                skip_uncond: bool) -> torch.Tensor:
        branch = self.adapted if adapted else self.base
        return branch.denoise(x, sigma, step, self.cfg_scale * self.cfg_multiplier, skip_uncond)


class ModelCache:
    """A small LRU of loaded source models, keyed by file hash. Evicted entries are released."""

    def __init__(self, capacity: int = 1, release: Callable[[Any], None] | None = None) -> None:
        self.capacity = capacity
        self.release = release
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.loads = 0

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        self.trim(self.capacity - 1)
        value = load()
        self.loads += 1
        self.entries[key] = value
        return value

    def trim(self, keep: int) -> None:
        while len(self.entries) > max(keep, 0):
            key, value = self.entries.popitem(last=False)
            logger.info("releasing source model %s", key)
            if self.release is not None:
                self.release(value)
            del value
        gc.collect()

    def clear(self) -> None:
        self.trim(0)
