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


def slice_conds(cond: Any, start: int, stop: int | None = None) -> Any:
    if isinstance(cond, dict):
        return {k: v[start:stop] for k, v in cond.items()}
    return cond[start:stop]


def token_length(cond: Any) -> int:
    tensor = cond["crossattn"] if isinstance(cond, dict) else cond
    return tensor.shape[1]


@dataclass
class Branch:
    """One side of the pair: a model, its conditioning per step, and an optional context (LoRA on).
    `rows_context(first_row)`, where offered, applies the same adaptation only to rows first_row.. of a batch
    run through the shared model (the batched pair)."""

    model_fn: ModelFn
    conds_at: Callable[[int], StepConds]
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    rows_context: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None
    memo: BaseMemo | None = None  # a base branch shared by several units: its outputs of the current step
    marks_uncond: bool = False  # model_fn takes `uncond_rows`: its model treats negative-prompt rows apart

    def rows(self, x: torch.Tensor, sigma: torch.Tensor, step: int, uncond: bool) -> Rows:
        """The model-call rows of this branch: one per sub-prompt of each image, then one uncond per image."""
        conds_list, cond, uncond_cond = self.conds_at(step)
        if len(conds_list) != x.shape[0]:
            raise ValueError(f"source conditioning has {len(conds_list)} images, the batch has {x.shape[0]}")
        repeats = [len(c) for c in conds_list]
        xs = [torch.cat([x[i : i + 1].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)])]
        ss = [torch.cat([sigma[i : i + 1].expand(n) for i, n in enumerate(repeats)])]
        cs = [cond]
        if uncond:
            xs, ss, cs = [*xs, x], [*ss, sigma], [*cs, uncond_cond]
        return Rows(conds_list, xs, ss, cs, uncond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, step: int, scale: float,
                skip_uncond: bool) -> torch.Tensor:
        cond_only = skip_uncond or scale == 1.0  # CFG 1 is the cond prediction: skip the uncond pass
        rows = self.rows(x, sigma, step, uncond=not cond_only)
        with self.context():
            out = rows.run(self.model_fn, self.marks_uncond)
        return rows.combine(out, scale)


@dataclass
class Rows:
    """A branch's model inputs as parts (cond rows, then uncond rows if any), and how to combine its outputs."""

    conds_list: CondsList
    xs: list[torch.Tensor]
    sigmas: list[torch.Tensor]
    conds: list[Any]
    uncond: bool  # the last x.shape[0] output rows are the uncond predictions

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.xs)

    @property
    def batchable(self) -> bool:
        """All parts can go in one model call (the same token length)."""
        return len({token_length(c) for c in self.conds}) == 1

    def run(self, model_fn: ModelFn, marks_uncond: bool = False) -> torch.Tensor:
        """One call where the conditionings can be batched, else one per part. `marks_uncond`: each call
        also says how many of its last rows are uncond rows (`uncond_rows=`)."""
        last = len(self.xs) - 1 if self.uncond else len(self.xs)

        def marks(uncond_rows: int) -> dict[str, int]:
            return {"uncond_rows": uncond_rows} if marks_uncond else {}

        if self.batchable:
            trailing = len(self.xs[-1]) if self.uncond else 0
            return model_fn(torch.cat(self.xs), torch.cat(self.sigmas), cat_conds(self.conds), **marks(trailing))
        return torch.cat([model_fn(x, s, c, **marks(len(x) if i == last else 0))
                          for i, (x, s, c) in enumerate(zip(self.xs, self.sigmas, self.conds, strict=True))])

    def combine(self, out: torch.Tensor, scale: float, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """CFG of this branch's outputs; `uncond`: uncond rows computed elsewhere (a shared uncond)."""
        if uncond is not None:
            return combine_cfg(torch.cat([out, uncond]), self.conds_list, scale)
        if not self.uncond:  # cond only: each image's first sub-prompt stands in for the uncond
            first_rows = [c[0][0] for c in self.conds_list]
            return combine_cfg(torch.cat([out, out[first_rows]]), self.conds_list, 1.0)
        return combine_cfg(out, self.conds_list, scale)

    def joined(self, other: Rows) -> Rows:
        return Rows(self.conds_list, [*self.xs, *other.xs], [*self.sigmas, *other.sigmas],
                    [*self.conds, *other.conds], self.uncond)


@dataclass
class BaseMemo:
    """The last outputs of a base branch that several DS units share: the first unit to run a step computes
    them, the others reuse them (N units with one base: N + 1 source passes per step, not 2N)."""

    key: tuple | None = None  # (model call, cond only, CFG scale)
    x: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    cfg: torch.Tensor | None = None  # CFG'd x0
    uncond: torch.Tensor | None = None  # raw uncond rows, where the base ran them in a batched pair
    computed: int = 0
    reused: int = 0

    def recall(self, key: tuple, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | None:
        if key != self.key or x.shape != self.x.shape or not (torch.equal(x, self.x) and torch.equal(sigma, self.sigma)):
            return None
        self.reused += 1
        return self.cfg

    def store(self, key: tuple, x: torch.Tensor, sigma: torch.Tensor, cfg: torch.Tensor,
              uncond: torch.Tensor | None) -> None:
        self.key, self.x, self.sigma, self.cfg, self.uncond = key, x, sigma, cfg, uncond
        self.computed += 1


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
    shares_uncond: bool = False  # one model, one negative prompt (prompt adapter): equal uncond rows

    @property
    def scale(self) -> float:
        return self.cfg_scale * self.cfg_multiplier

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, *, adapted: bool, step: int,
                skip_uncond: bool) -> torch.Tensor:
        branch = self.adapted if adapted else self.base
        return branch.denoise(x, sigma, step, self.scale, skip_uncond)

    def can_batch(self) -> bool:
        """Base and adapted run through one model: the same model with the adaptation on some rows."""
        same_model = self.base.model_fn is self.adapted.model_fn and self.base.context is contextlib.nullcontext
        return same_model and (self.adapted.context is contextlib.nullcontext or self.adapted.rows_context is not None)

    def denoise_pair(self, x: torch.Tensor, sigma: torch.Tensor, *, step: int, skip_uncond: bool,
                     batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, adapted) CFG'd x0. Batched: one model call with the base rows first and the adaptation on
        the rest; a shared uncond is run once. Equal to two separate calls. A base shared with other units
        is taken from its memo when another unit already ran it on this input."""
        cond_only = skip_uncond or self.scale == 1.0
        memo, key = self.base.memo, (step, cond_only, self.scale)
        base = None if memo is None else memo.recall(key, x, sigma)
        if base is not None:
            return base, self._adapted_after(memo, x, sigma, step, cond_only, skip_uncond)
        base, adapted, uncond = self._pair(x, sigma, step, cond_only, skip_uncond, batched)
        if memo is not None:
            memo.store(key, x, sigma, base, uncond)
        return base, adapted

    def _pair(self, x: torch.Tensor, sigma: torch.Tensor, step: int, cond_only: bool, skip_uncond: bool,
              batched: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(base, adapted, the base's raw uncond rows where a batched call ran them)."""
        if not (batched and self.can_batch()):
            return (self.denoise(x, sigma, adapted=False, step=step, skip_uncond=skip_uncond),
                    self.denoise(x, sigma, adapted=True, step=step, skip_uncond=skip_uncond), None)
        base = self.base.rows(x, sigma, step, uncond=not cond_only)
        shared = self.shares_uncond and not cond_only
        adapted = self.adapted.rows(x, sigma, step, uncond=not (cond_only or shared))
        rows = base.joined(adapted)
        if not rows.batchable:  # prompts of different lengths: the adaptation cannot follow the rows
            return self._pair(x, sigma, step, cond_only, skip_uncond, batched=False)
        rows_context = self.adapted.rows_context or (lambda _first: contextlib.nullcontext())
        with rows_context(base.count):
            out = rows.run(self.base.model_fn)
        out_base, out_adapted = out[: base.count], out[base.count :]
        uncond = out_base[-x.shape[0] :] if base.uncond else None
        return (base.combine(out_base, self.scale),
                adapted.combine(out_adapted, self.scale, uncond if shared else None), uncond)

    def _adapted_after(self, memo: BaseMemo, x: torch.Tensor, sigma: torch.Tensor, step: int, cond_only: bool,
                       skip_uncond: bool) -> torch.Tensor:
        """The adapted side alone, next to a recalled base: reuses its uncond rows where they are shared."""
        if not (self.shares_uncond and not cond_only and memo.uncond is not None):
            return self.denoise(x, sigma, adapted=True, step=step, skip_uncond=skip_uncond)
        rows = self.adapted.rows(x, sigma, step, uncond=False)
        with self.adapted.context():
            out = rows.run(self.adapted.model_fn, self.adapted.marks_uncond)
        return rows.combine(out, self.scale, memo.uncond)


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
