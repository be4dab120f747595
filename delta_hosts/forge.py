"""Forge host adapter (new Forge, and reForge / Forge Classic): DS as a post-CFG function.

Forge never fires on_cfg_denoised, so each pass (process_before_every_sampling, which runs twice for
hires) clones the target UNet patcher, replaces any DS function on it by a fresh one, and registers the
source patchers as extra models so Forge's memory manager loads them with the target. on_cfg_denoiser
only records the model-call count. The clone is swapped back out when the sampler returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from modules import shared

from lib_delta import DeltaError, schedules
from lib_delta.delta import StepInput
from lib_delta.spec import DeltaSettings

from . import FORGE, HOST, generation
from .generation import (
    PATCHED_UNETS,
    STATE_ATTR,
    Prepared,
    Unit,
    abort,
    as_delta_error,
    fail,
    prepare,
)
from .memory import activation_shape

if HOST == FORGE:
    from . import forge_models as models
else:
    from . import ldm_patched_models as models
DS_TAG = "delta_sampling"  # marks our post-CFG function on a patcher


@dataclass
class StepCount:
    step: int
    progress: float


def start(p: Any, settings: list[DeltaSettings]) -> None:
    """Script.process."""
    prepare(p, settings, models)


def begin_pass(p: Any) -> None:
    """Script.process_before_every_sampling: patch a clone of this pass's target UNet. Idempotent."""
    state = generation.begin_pass(p, end_pass)
    if state is None:
        return
    try:
        target = p.sd_model
        state.target = target
        state.run = generation.build_runs(p, state, models.target_format(target), generation.model_title(target))
        objects = target.forge_objects
        original = objects.unet
        patched = original.clone()
        _strip(patched)
        patched.set_model_sampler_post_cfg_function(_post_cfg(state, _configured_cfg(p)))
        for patcher in _source_patchers(*state.units):
            setattr(patcher, DS_TAG, True)
            patched.add_extra_model_patcher_during_sampling(patcher)
        if hasattr(patched, "extra_preserved_memory_during_sampling"):  # the host loads and reserves together
            patched.extra_preserved_memory_during_sampling = (
                original.extra_preserved_memory_during_sampling + _activation_reserve(p, state))
        objects.unet = patched
        PATCHED_UNETS.add(patched)
        state.host["patch"] = (objects, original, patched)
        for unit in state.units:
            if unit.control is not None:  # the host's sampling_prepare does this for the target only
                unit.control.begin_pass(p)
    except Exception as e:
        fail(state, as_delta_error(e))


def _activation_reserve(p: Any, state: Prepared) -> int:
    """What one source model call needs while it runs: the source UNet's own estimate for the largest batch
    of any unit (Forge's LoRA cannot follow batch rows, so only a prompt adapter's pair is batched here)."""
    reserve = 0
    for unit in state.units:
        batched = unit.settings.knob("batched") and unit.lora is None and unit.adapted is None
        shape = activation_shape(p, unit.settings, unit.source.latent_format, batched)
        reserve = max([reserve, *(int(patcher.memory_required(shape)) for patcher in _source_patchers(unit, controls=False)
                                  if hasattr(patcher, "memory_required"))])
    return reserve


def _source_patchers(*units: Unit, controls: bool = True) -> list[Any]:
    """The units' source UNet patchers and, with `controls`, their ControlNets' (no activation estimate)."""
    sources = {id(m): m for unit in units for m in (unit.source, unit.adapted) if m is not None}
    nets = [patcher for unit in units if controls and unit.control is not None for patcher in unit.control.patchers()]
    return [patcher for source in sources.values() for patcher in source.patchers()] + nets


def _strip(unet: Any) -> None:
    """Remove DS functions and source patchers a previous call left on this patcher (never stack two)."""
    options = unet.model_options
    fns = [f for f in options.get("sampler_post_cfg_function", []) if not getattr(f, DS_TAG, False)]
    options["sampler_post_cfg_function"] = fns
    unet.extra_model_patchers_during_sampling[:] = [
        m for m in unet.extra_model_patchers_during_sampling if not getattr(m, DS_TAG, False)]


def end_pass(state: Prepared) -> None:
    """Put the pass's original UNet patcher back if ours is still installed; forget the pass's step."""
    objects, original, patched = state.host.pop("patch", (None, None, None))
    if objects is not None and objects.unet is patched:
        objects.unet = original
    if patched is not None:
        _strip(patched)
        for unit in state.units:
            if unit.control is not None:
                unit.control.end_pass()
    state.host.pop("step", None)


def finish(p: Any) -> None:
    """Script.postprocess."""
    state: Prepared | None = getattr(p, STATE_ATTR, None)
    if state is not None:
        end_pass(state)
    setattr(p, STATE_ATTR, None)


def _configured_cfg(p: Any) -> float:
    hr_cfg = getattr(p, "hr_cfg", None) if getattr(p, "is_hr_pass", False) else None
    return float(hr_cfg or p.cfg_scale)


def _skipped_uncond(args: dict[str, Any], configured_cfg: float) -> bool:
    """Did the host drop the uncond pass this step (skip-early-CFG, NGMS)? Each fork decides differently,
    so read the outcome: reForge passes the CFG scale used; the others leave uncond_denoised all zero."""
    if math.isclose(configured_cfg, 1.0):
        return False  # no step-specific skip: the source keeps its own CFG
    used = args.get("cond_scale")
    if used is not None:
        return math.isclose(float(used), 1.0)
    uncond = args.get("uncond_denoised")
    return uncond is not None and not bool(uncond.any())


def _post_cfg(state: Prepared, configured_cfg: float) -> Any:
    def delta_sampling_post_cfg(args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        run, count = state.run, state.host.get("step")
        if run is None or count is None:
            return denoised
        try:
            skip = _skipped_uncond(args, configured_cfg)
            run.capture(StepInput(args["input"], args["sigma"], count.step, count.progress, skip))
            return run.apply(denoised, None if skip else args.get("uncond_denoised"))
        except Exception as e:
            abort(state, as_delta_error(e))
            return denoised

    setattr(delta_sampling_post_cfg, DS_TAG, True)
    return delta_sampling_post_cfg


def on_cfg_denoiser(params: Any) -> None:
    """Forge fires this unbatched, just before the sampling function: record the call index."""
    denoiser = params.denoiser
    state: Prepared | None = getattr(getattr(denoiser, "p", None), STATE_ATTR, None)
    if state is None or state.run is None:
        return
    if shared.sd_model is not state.target:
        abort(state, DeltaError("Delta Sampling: the refiner switched models mid-sampling; on Forge the DS "
                                "patch does not follow it. Turn the refiner off while DS is on."))
        return
    progress = schedules.progress_from_calls(denoiser.step, denoiser.total_steps or 1)
    state.host["step"] = StepCount(denoiser.step, progress)
