"""A1111 1.10 host adapter: per-generation state on `p`, CFG callbacks, sampler error surface.

Callbacks are registered once at import and are inert unless `p` carries a prepared DS run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from modules import prompt_parser, shared

from lib_delta import DeltaError, logger, schedules
from lib_delta.delta import DeltaRun, StepInput
from lib_delta.source import Branch, CfgSourcePair, ModelCache
from lib_delta.spec import FIELDS, INFOTEXT_KEY, DeltaSettings

from . import a1111_models as models

CACHE = ModelCache(capacity=2, release=models.release)
STATE_ATTR = "_delta_sampling"  # on p: the prepared pair and the current pass's run
INFOTEXT_KEYS = (INFOTEXT_KEY, *(f.label for f in FIELDS if f.readable))


class DeltaAbort(BaseException):  # noqa: N818 - escapes A1111's `except Exception` around callbacks
    """Stops the sampler loop; the wrapped sampler turns it back into the DeltaError it carries."""


@dataclass
class Prepared:
    settings: DeltaSettings
    source: models.SourceModel | None = None
    adapted: models.SourceModel | None = None  # checkpoint adapter
    lora: Any = None
    run: DeltaRun | None = None
    target: Any = None  # the active model object when the pass began
    error: DeltaError | None = None


def settings_for(p: Any, args: tuple) -> DeltaSettings:
    return DeltaSettings.from_args(args).with_overrides(p)


def prepare(p: Any, settings: DeltaSettings, supported: bool = True) -> None:
    """Script.process: validate, load (cached) models, write infotext. Errors stop the generation."""
    for key in INFOTEXT_KEYS:
        p.extra_generation_params.pop(key, None)
    setattr(p, STATE_ATTR, None)
    if not settings.enabled:
        return
    state = Prepared(settings)
    setattr(p, STATE_ATTR, state)
    try:
        if not supported:
            from .ui import UNSUPPORTED_HOST

            raise DeltaError(UNSUPPORTED_HOST)
        settings.validate()
        needed = 2 if settings.adapter_kind == "checkpoint" else 1  # never evict this generation's models
        CACHE.capacity = max(int(shared.opts.data.get("delta_sampling_cache_size", 2)), needed)
        info = models.find_checkpoint(settings.source)
        state.source = models.cached_source(CACHE, info)
        if settings.adapter_kind == "checkpoint":
            ainfo = models.find_checkpoint(settings.adapter)
            state.adapted = models.cached_source(CACHE, ainfo)
            if state.adapted.latent_format != state.source.latent_format:
                raise DeltaError("Delta Sampling: the adapter checkpoint is not the same architecture as the source.")
            settings = settings.replace(adapter=ainfo.title)
        elif settings.adapter_kind == "lora":
            filename, title = find_lora(settings.adapter)
            state.lora = state.source.lora(filename, settings.adapter_weight)
            settings = settings.replace(adapter=title)
        settings = settings.replace(source=info.title)
        p.extra_generation_params.update(settings.to_infotext())
    except Exception as e:
        fail(state, as_delta_error(e))


def as_delta_error(e: Exception) -> DeltaError:
    return e if isinstance(e, DeltaError) else DeltaError(f"Delta Sampling failed: {type(e).__name__}: {e}")


def fail(state: Prepared, error: DeltaError) -> None:
    state.error = error
    logger.error("%s", error)
    with contextlib.suppress(Exception):
        import gradio as gr

        gr.Warning(str(error))


def begin_pass(p: Any) -> None:
    """Script.process_before_every_sampling: build this pass's run and guard the sampler."""
    state: Prepared | None = getattr(p, STATE_ATTR, None)
    if state is None:
        return
    _guard_sampler(p, state)
    state.run = None
    if state.error is not None:
        return
    try:
        state.target = shared.sd_model
        state.run = DeltaRun(state.settings, _pair(p, state), models.target_format(shared.sd_model),
                             alphas_cumprod=_timestep_alphas(p))
    except Exception as e:
        fail(state, as_delta_error(e))


def finish(p: Any) -> None:
    """Script.postprocess: drop per-generation state (cached models stay, by design)."""
    setattr(p, STATE_ATTR, None)
    ACTIVE.clear()


def _pair(p: Any, state: Prepared) -> CfgSourcePair:
    s, src = state.settings, state.source
    hr = bool(getattr(p, "is_hr_pass", False))
    prompts = list(p.hr_prompts if hr else p.prompts)
    negatives = list(p.hr_negative_prompts if hr else p.negative_prompts)
    base_prompts = [s.base_prompt] * len(prompts) if s.base_prompt else prompts
    adapted_prompts = [s.adapted_prompt] * len(prompts) if s.adapted_prompt else base_prompts
    negatives = [s.negative_prompt] * len(prompts) if s.negative_prompt else negatives
    steps, hires_steps = _steps(p, hr)
    width, height = (p.hr_upscale_to_x, p.hr_upscale_to_y) if hr else (p.width, p.height)

    def branch(model: models.SourceModel, texts: list[str], context: Callable = contextlib.nullcontext) -> Branch:
        with context():
            c, uc = model.encode(texts, negatives, steps, hires_steps, width, height)
        return Branch(model.model_fn, _conds_at(c, uc), context)

    base = branch(src, base_prompts)
    if s.adapter_kind == "checkpoint":
        adapted = branch(state.adapted, adapted_prompts)
    elif s.adapter_kind == "lora":
        adapted = branch(src, adapted_prompts, state.lora.enabled)
    else:
        adapted = branch(src, adapted_prompts)
    return CfgSourcePair(src.latent_format, base, adapted, s.source_cfg or float(p.cfg_scale))


def _conds_at(c: Any, uc: Any) -> Callable[[int], tuple]:
    def at(step: int) -> tuple:
        conds_list, cond = prompt_parser.reconstruct_multicond_batch(c, step)
        return conds_list, cond, prompt_parser.reconstruct_cond_batch(uc, step)

    return at


def _steps(p: Any, hr: bool) -> tuple[int, int | None]:
    from modules import sd_samplers

    firstpass = getattr(p, "firstpass_steps", None) or p.steps
    if not hr:
        return firstpass, None
    steps = p.hr_second_pass_steps or p.steps
    config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
    return firstpass, config.total_steps(steps) if config else steps


def _timestep_alphas(p: Any) -> torch.Tensor | None:
    """alphas_cumprod for DDIM/PLMS/UniPC, whose CFG callbacks carry eps and integer timesteps."""
    from modules import sd_samplers_timesteps

    if isinstance(p.sampler, sd_samplers_timesteps.CompVisSampler):
        return shared.sd_model.alphas_cumprod
    return None


def _guard_sampler(p: Any, state: Prepared) -> None:
    """Wrap this sampler instance's entry points: DS errors become a normal exception, no image."""
    sampler = p.sampler
    for name in ("sample", "sample_img2img"):
        original = getattr(type(sampler), name, None)
        if original is None:
            continue

        def guarded(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            if state.error is not None:
                raise state.error
            try:
                return _original(sampler, *args, **kwargs)
            except DeltaAbort as abort:
                raise state.error or DeltaError(str(abort)) from None
            finally:
                ACTIVE.clear()
                state.run = None  # the pass is over: drop its conds and captured tensors

        setattr(sampler, name, guarded)


def find_lora(name: str) -> tuple[str, str]:
    """(file, 'name [hash]') of a LoRA by name, alias or 'name [hash]'; the hash wins when names differ."""
    networks = _networks()
    bare, wanted_hash = models.split_title(name)
    entry = networks.available_networks.get(bare) or networks.available_network_aliases.get(bare)
    if wanted_hash and (entry is None or entry.shorthash != wanted_hash):
        entry = getattr(networks, "available_network_hash_lookup", {}).get(wanted_hash, entry)
    if entry is None:
        raise DeltaError(f"Delta Sampling: LoRA '{name}' was not found. Check the name or refresh the list.")
    entry.read_hash()
    return entry.filename, f"{entry.name} [{entry.shorthash}]" if entry.shorthash else entry.name


def _networks() -> Any:
    import networks  # A1111's built-in Lora extension module (loaded before user extensions)

    return networks


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
        state.run.nmask = denoiser.nmask if denoiser.mask is not None else None
        state.run.capture(StepInput(x, sigma, denoiser.step, progress, _skips_uncond(denoiser, sigma)))
        ACTIVE.append(state)
    except Exception as e:
        _abort(state, as_delta_error(e))


def on_cfg_after_cfg(params: Any) -> None:
    if not ACTIVE:
        return
    state = ACTIVE.pop()
    try:
        params.x = state.run.apply(params.x)
    except torch.cuda.OutOfMemoryError as e:
        _abort(state, DeltaError(f"Delta Sampling ran out of memory running the source pair: {e}"))
    except Exception as e:
        _abort(state, as_delta_error(e))


def _abort(state: Prepared, error: DeltaError) -> None:
    fail(state, error)
    state.run = None
    raise DeltaAbort(str(error))


def _check_target(state: Prepared) -> None:
    """The refiner may swap the active model mid-sampling: follow it only within one latent format."""
    if shared.sd_model is state.target:
        return
    new_format = models.target_format(shared.sd_model)
    if new_format != state.run.target_format:
        raise DeltaError(f"Delta Sampling: the refiner switched to a {new_format.name} model while DS runs for a "
                         f"{state.run.target_format.name} target; turn the refiner off or use one latent format.")
    state.target = shared.sd_model


def _skips_uncond(denoiser: Any, sigma: torch.Tensor) -> bool:
    """Mirror the CFG denoiser's NGMS / skip-early-CFG decision (it is made after this callback)."""
    opts = shared.opts
    if opts.skip_early_cond != 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min = getattr(denoiser.p, "s_min_uncond", 0) or 0
    return bool((denoiser.step % 2 or opts.s_min_uncond_all) and s_min > 0 and sigma[0] < s_min)
