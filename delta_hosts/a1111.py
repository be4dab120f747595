"""A1111 1.10 host adapter: CFG callbacks capture the step and add the delta after CFG.

Callbacks are registered once at import and are inert unless `p` carries a prepared DS run. The
lifecycle shared with Forge (prepare, source pair, sampler guard) lives in generation.py.
"""

from __future__ import annotations

from typing import Any

import torch
from modules import shared

from lib_delta import DeltaError, schedules
from lib_delta.delta import StepInput
from lib_delta.spec import DeltaSettings

from . import a1111_models as models
from . import generation
from .generation import (
    CACHE,  # noqa: F401 - re-exported
    STATE_ATTR,
    Prepared,
    abort,
    as_delta_error,
    fail,
    prepare,
    skips_uncond,
)


def start(p: Any, settings: list[DeltaSettings]) -> None:
    """Script.process."""
    prepare(p, settings, models)


def begin_pass(p: Any) -> None:
    """Script.process_before_every_sampling: build this pass's run and guard the sampler."""
    state = generation.begin_pass(p, end_pass)
    if state is None:
        return
    try:
        state.target = shared.sd_model
        state.run = generation.build_runs(p, state, models.target_format(shared.sd_model),
                                          generation.model_title(shared.sd_model), alphas_cumprod=_timestep_alphas(p))
        for unit in state.units:
            if unit.control is not None:  # sd-webui-controlnet's hook on the source UNet, for this pass
                unit.control.begin_pass(p)
    except Exception as e:
        fail(state, as_delta_error(e))


def end_pass(state: Prepared) -> None:
    """After every sampler call and before the next pass: unhook the sources' ControlNets."""
    ACTIVE.clear()
    for unit in state.units:
        if unit.control is not None:
            unit.control.end_pass()


def finish(p: Any) -> None:
    """Script.postprocess: drop per-generation state (cached models stay, by design)."""
    state: Prepared | None = getattr(p, STATE_ATTR, None)
    if state is not None:
        end_pass(state)
    setattr(p, STATE_ATTR, None)
    ACTIVE.clear()


def _timestep_alphas(p: Any) -> torch.Tensor | None:
    """alphas_cumprod for DDIM/PLMS/UniPC, whose CFG callbacks carry eps and integer timesteps."""
    from modules import sd_samplers_timesteps

    if isinstance(p.sampler, sd_samplers_timesteps.CompVisSampler):
        return shared.sd_model.alphas_cumprod
    return None


# -- CFG callbacks --------------------------------------------------------------------------------
ACTIVE: list[Prepared] = []  # the run captured by on_cfg_denoiser, consumed by on_cfg_after_cfg


def on_cfg_denoiser(params: Any) -> None:
    ACTIVE.clear()
    denoiser = params.denoiser
    state: Prepared | None = getattr(getattr(denoiser, "p", None), STATE_ATTR, None)
    if state is None or state.run is None:
        return
    try:
        _check_target(state)
        batch = params.text_uncond.shape[0]
        x, sigma = params.x[-batch:], params.sigma[-batch:]
        progress = schedules.progress_from_calls(denoiser.step, denoiser.total_steps or 1)
        state.run.sampler_state(denoiser.nmask if denoiser.mask is not None else None,
                                float(getattr(denoiser, "cond_scale_miltiplier", 1.0)))  # CFG++
        state.run.capture(StepInput(x, sigma, denoiser.step, progress, skips_uncond(denoiser, sigma)))
        ACTIVE.append(state)
    except Exception as e:
        abort(state, as_delta_error(e))


def on_cfg_denoised(params: Any) -> None:
    """The model's rows before CFG, uncond last: auto strength and the cap measure the CFG update."""
    if ACTIVE and ACTIVE[-1].run is not None and ACTIVE[-1].run.pending is not None:
        state = ACTIVE[-1]
        state.host["uncond"] = params.x[-state.run.pending.x.shape[0]:]


def on_cfg_after_cfg(params: Any) -> None:
    if not ACTIVE:
        return
    state = ACTIVE.pop()
    try:
        params.x = state.run.apply(params.x, state.host.pop("uncond", None))
    except Exception as e:
        abort(state, as_delta_error(e))


def _check_target(state: Prepared) -> None:
    """The refiner may swap the active model mid-sampling: follow it only within one latent format."""
    if shared.sd_model is state.target:
        return
    new_format = models.target_format(shared.sd_model)
    if new_format != state.run.target_format:
        raise DeltaError(f"Delta Sampling: the refiner switched to a {new_format.name} model while DS runs for a "
                         f"{state.run.target_format.name} target; turn the refiner off or use one latent format.")
    state.target = shared.sd_model

