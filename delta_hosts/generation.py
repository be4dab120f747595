"""The generation lifecycle every host shares: validate and load in Script.process, build each pass's
source pair, surface errors through the sampler, and drop per-generation state afterwards.

A host adapter passes its `models` module: find sources (`cached_source`) and name its model's latent
format (`target_format`). Source models offer `encode`, `model_fn`, `lora`, `offload` and `release`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import inspect
import math
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from modules import prompt_parser, shared

from lib_delta import DeltaError, logger
from lib_delta.delta import DeltaRun, DeltaUnits
from lib_delta.source import BaseMemo, Branch, CfgSourcePair, ModelCache
from lib_delta.spec import (
    FIELDS,
    INFOTEXT_KEY,
    DeltaSettings,
    malformed_source,
    units_from_args,
    units_infotext,
)

from . import files
from .memory import pass_size

CACHE = ModelCache(capacity=1, release=lambda source: source.release())
STATE_ATTR = "_delta_sampling"  # on p: the prepared pair and the current pass's run
INFOTEXT_KEYS = (INFOTEXT_KEY, *(f.label for f in FIELDS if f.readable))
PATCHED_UNETS: weakref.WeakSet = weakref.WeakSet()  # Forge: target UNet clones carrying DS, for release


@dataclass
class Unit:
    """One enabled DS unit of the generation and what it loaded."""

    settings: DeltaSettings
    number: int  # its place in the panel (1-based): infotext key and X/Y/Z prefix
    source: Any = None
    adapted: Any = None  # checkpoint adapter
    lora: Any = None  # the LoRA stack on the adapted side, where there is one
    control: Any = None  # the ControlNet and IP-Adapter on the adapted side, where there are any

    @property
    def lora_files(self) -> tuple[tuple[str, float], ...]:
        """(name, weight) of every LoRA on the adapted side: the adapter (lora kind), then DS more LoRAs."""
        s = self.settings
        first = ((s.adapter, s.adapter_weight),) if s.adapter_kind == "lora" else ()
        return first + s.stacked_loras()


@dataclass
class Prepared:
    units: list[Unit]
    run: DeltaUnits | None = None
    target: Any = None  # the active model object when the pass began
    error: DeltaError | None = None
    host: dict[str, Any] = field(default_factory=dict)  # what one host adapter keeps per generation


def settings_for(p: Any, args: tuple) -> list[DeltaSettings]:
    """Every unit's settings from the script args (UI or API) and X/Y/Z overrides on `p`. A value that is
    not valid for its field never falls back to a default: the generation fails with the message (the
    hosts swallow exceptions raised in Script.process, which would give an image without DS)."""
    try:
        return [u.with_overrides(p, override_prefix(n)) for n, u in enumerate(units_from_args(args), 1)]
    except DeltaError as e:
        return [DeltaSettings(enabled=True, source=malformed_source(str(e)))]


def override_prefix(unit: int) -> str:
    """X/Y/Z axes write `p.ds_<attr>` for unit 1 and `p.ds<n>_<attr>` for unit n."""
    return "ds_" if unit == 1 else f"ds{unit}_"


def prepare(p: Any, units: list[DeltaSettings], models: ModuleType | None, unsupported: str | None = None) -> None:
    """Script.process: validate, load (cached) models, write infotext. Errors stop the generation."""
    for key in [k for k in p.extra_generation_params if k in INFOTEXT_KEYS or k.startswith(INFOTEXT_KEY + " ")]:
        p.extra_generation_params.pop(key, None)
    setattr(p, STATE_ATTR, None)
    enabled = [Unit(s, n) for n, s in enumerate(units, 1) if s.enabled]
    if not enabled:
        rest_sources()
        return
    state = Prepared(enabled)
    setattr(p, STATE_ATTR, state)
    try:
        if unsupported or models is None:
            raise DeltaError(unsupported or "Delta Sampling does not support this WebUI.")
        for unit in enabled:
            with naming(unit):
                unit.settings.validate()
        checkpoints = {s.source for s in units if s.enabled} | {s.adapter for s in units
                                                                if s.enabled and s.adapter_kind == "checkpoint"}
        CACHE.capacity = max(int(shared.opts.data.get("delta_sampling_cache_size", 1)), len(checkpoints))
        for unit in enabled:  # never evicts a model of this generation: the capacity covers them all
            with naming(unit), keeping_random_state():  # loaders init modules randomly first
                load_unit(unit, models)
        attach_loras(enabled)
        attach_controls(p, enabled)
        titled = {u.number: u.settings for u in enabled}
        p.extra_generation_params.update(units_infotext([titled.get(n, s) for n, s in enumerate(units, 1)]))
    except Exception as e:
        fail(state, as_delta_error(e))


@contextlib.contextmanager
def naming(unit: Unit) -> Iterator[None]:
    """A unit after the first names itself in its errors."""
    try:
        yield
    except DeltaError as e:
        if unit.number == 1:
            raise
        raise DeltaError(f"{e} (DS unit {unit.number})") from e


def load_unit(unit: Unit, models: ModuleType) -> None:
    """The unit's source (and adapter checkpoint) from the cache; its settings then name the files' titles."""
    s = unit.settings
    info = files.hashed(files.find_checkpoint(s.source))
    unit.source = models.cached_source(CACHE, info)
    if s.adapter_kind == "checkpoint":
        ainfo = files.hashed(files.find_checkpoint(s.adapter))
        unit.adapted = models.cached_source(CACHE, ainfo, "adapter checkpoint")
        if unit.adapted.latent_format != unit.source.latent_format:
            raise DeltaError("Delta Sampling: the adapter checkpoint is not the same architecture as the source.")
        s = s.replace(adapter=ainfo.title)
    elif s.adapter_kind == "lora":
        s = s.replace(adapter=files.find_lora(s.adapter)[1])
    if s.loras:
        s = s.replace(loras=", ".join(f"{files.find_lora(name)[1]}:{weight:g}" for name, weight in s.stacked_loras()))
    unit.settings = s.replace(source=info.title)


def file_key(filename: str) -> tuple:
    """A loaded file's cache key: its path and modification time (an edited file reloads)."""
    return filename, os.path.getmtime(filename) if os.path.exists(filename) else 0.0


def lora_key(stack: tuple[tuple[str, float], ...]) -> tuple:
    """A LoRA stack's cache key: each file's key with its weight."""
    return tuple((*file_key(f), w) for f, w in stack)


def keep_only(cache: dict, keys: list[tuple], stacks: list[Any], load: Callable[[Any], Any],
              drop: Callable[[Any], None] = lambda _: None) -> list[Any]:
    """What a source carries for this generation (LoRA stacks, ControlNets): exactly the `keys` it uses,
    each loaded from its entry of `stacks` on a miss; the others dropped."""
    for key in [k for k in cache if k not in keys]:
        drop(cache.pop(key))
    for key, stack in zip(keys, stacks, strict=True):
        if key not in cache:
            cache[key] = load(stack)
    return [cache[key] for key in keys]


def keep_files(cache: dict, filenames: list[str], load: Callable[[str], Any]) -> dict[str, Any]:
    """`keep_only` for files keyed by `file_key`: {filename: loaded} for exactly these files."""
    return dict(zip(filenames, keep_only(cache, [file_key(f) for f in filenames], filenames, load), strict=True))


def attach_loras(units: list[Unit]) -> None:
    """Each unit's LoRA stack on its adapted model (the source, or the adapter checkpoint). A model keeps the
    stacks this generation uses and drops any other (one model may carry one stack per unit)."""
    by_model: dict[int, tuple[Any, list[Unit]]] = {}
    for unit in units:
        if unit.lora_files:
            model = unit.adapted or unit.source
            by_model.setdefault(id(model), (model, []))[1].append(unit)
    for model, users in by_model.values():
        stacks = [tuple((files.find_lora(name)[0], weight) for name, weight in u.lora_files) for u in users]
        for unit, lora in zip(users, model.loras_for(stacks), strict=True):
            unit.lora = lora


def as_delta_error(e: BaseException) -> DeltaError:
    """Every failure reaches the user as a DeltaError (the API names the exception class)."""
    if isinstance(e, DeltaError):
        return e if type(e) is DeltaError else DeltaError(str(e))
    if isinstance(e, MemoryError) or "OutOfMemoryError" in type(e).__name__:
        return DeltaError(f"Delta Sampling ran out of memory running the source pair: {e}")
    return DeltaError(f"Delta Sampling failed: {type(e).__name__}: {e}")


def fail(state: Prepared, error: DeltaError) -> None:
    state.error = error
    logger.error("%s", error)
    with contextlib.suppress(Exception):
        import gradio as gr

        gr.Warning(str(error))


def abort(state: Prepared, error: DeltaError) -> None:
    """Fail mid-sampling through the host's own interrupt: the sampler stops at its next step and the
    guarded sampler raises the stored error, so no image is made. Never raises from a callback: a
    BaseException that escaped a replaced sampler would kill Forge's generation thread."""
    fail(state, error)
    state.run = None
    host_state = shared.state
    state.host.setdefault("interrupted", host_state.interrupted)  # put back by the guard
    interrupt = getattr(host_state, "interrupt", None)
    if callable(interrupt):
        interrupt()
    else:
        host_state.interrupted = True


def attach_controls(p: Any, units: list[Unit]) -> None:
    """Each unit's ControlNet and IP-Adapter on its adapted model, through the host's own code; a model keeps
    loaded only the files this generation uses. The hosts build their modules with random init first: the
    global random state is put back, so what the WebUI draws next (img2img noise) stays as it was."""
    with keeping_random_state():
        _attach_controls(p, units)


@contextlib.contextmanager
def keeping_random_state() -> Iterator[None]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


def _attach_controls(p: Any, units: list[Unit]) -> None:
    from . import control

    by_model: dict[int, tuple[Any, list[Unit], list[control.ControlRequest]]] = {}
    for unit in units:
        with naming(unit):
            request = control.request(p, unit.settings)
            if request is None:
                continue
            model = unit.adapted or unit.source
            if not hasattr(model, "controls_for"):
                raise DeltaError("Delta Sampling: a ControlNet or IP-Adapter on the DS source needs Forge, Forge Neo, "
                                 "or A1111 with sd-webui-controlnet; reForge and Forge Classic are not supported yet.")
        entry = by_model.setdefault(id(model), (model, [], []))
        entry[1].append(unit)
        entry[2].append(request)
    for model, users, requests in by_model.values():
        for unit, ctl in zip(users, model.controls_for(requests), strict=True):
            unit.control = ctl


def adapted_context(unit: Unit) -> Callable[[], contextlib.AbstractContextManager[Any]] | None:
    """What the adapted branch's forward runs inside: the LoRA stack and the ControlNet, where present."""
    parts = [c.enabled for c in (unit.lora, unit.control) if c is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None

    @contextlib.contextmanager
    def both() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in parts:
                stack.enter_context(part())
            yield

    return both


def build_runs(p: Any, state: Prepared, target_format: Any, target_title: str, **kw: Any) -> DeltaUnits:
    """This pass's units: each one's pair on the active target; units with the same base share it."""
    bases: dict[tuple, Branch] = {}
    return DeltaUnits([DeltaRun(u.settings, build_pair(p, u, bases if len(state.units) > 1 else None),
                                target_format, target_title, **kw) for u in state.units])


def build_pair(p: Any, unit: Unit, bases: dict[tuple, Branch] | None = None) -> CfgSourcePair:
    """This pass's source pair: prompts (hires-aware), encoded with the source's own text encoder. `bases`:
    base branches already built for other units, by model, prompts and CFG (shared, run once per step)."""
    s, src = unit.settings, unit.source
    hr = bool(getattr(p, "is_hr_pass", False))
    prompts = list(p.hr_prompts if hr else p.prompts)
    negatives = list(p.hr_negative_prompts if hr else p.negative_prompts)
    base_prompts = per_image(s.base_prompt, prompts)
    adapted_prompts = per_image(s.adapted_prompt, prompts) if s.adapted_prompt else base_prompts
    negatives = per_image(s.negative_prompt, negatives)
    steps, hires_steps = _steps(p, hr)
    width, height = pass_size(p)
    cfg = getattr(p, "hr_cfg", None) if hr else None  # Forge's hires CFG
    cfg_scale = s.source_cfg or float(cfg or p.cfg_scale)

    def branch(model: Any, texts: list[str], context: Callable = contextlib.nullcontext,
               encoding: Callable | None = None, rows_context: Callable | None = None) -> Branch:
        with (encoding or context)():
            c, uc = model.encode(texts, negatives, steps, hires_steps, width, height)
        marks = context is not contextlib.nullcontext and unit.control is not None  # its models see uncond rows
        return Branch(model.model_fn, _conds_at(c, uc), context, rows_context,
                      marks_uncond=marks and getattr(model, "marks_uncond_rows", False))

    key = (id(src), tuple(base_prompts), tuple(negatives), cfg_scale)
    if bases is None:
        base = branch(src, base_prompts)
    elif key not in bases:
        base = bases[key] = dataclasses.replace(branch(src, base_prompts), memo=BaseMemo())
    else:
        base = bases[key]
    model, lora, context = unit.adapted or src, unit.lora, adapted_context(unit)
    if context is not None:  # a LoRA may switch its text encoder part separately
        rows = getattr(lora, "rows", None) if unit.control is None else None  # where the host's LoRA follows rows
        adapted = branch(model, adapted_prompts, context, getattr(lora, "encoding", None) or
                         (lora.enabled if lora is not None else contextlib.nullcontext), rows)
    else:
        adapted = branch(model, adapted_prompts)
    return CfgSourcePair(src.latent_format, base, adapted, cfg_scale, getattr(src, "sigma_max", math.inf),
                         src.title, shares_uncond=s.adapter_kind == "prompt" and lora is None and unit.control is None)


PROMPT_PLACEHOLDER = "{prompt}"


def per_image(template: str, own: list[str]) -> list[str]:
    """A DS prompt box for each image of the batch: `{prompt}` is that image's own (target) prompt; an
    empty box is the image's own prompt (per-image prompts and wildcards stay per image)."""
    if not template:
        return list(own)
    return [template.replace(PROMPT_PLACEHOLDER, text) for text in own]


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


def guard_sampler(p: Any, state: Prepared, on_exit: Callable[[], None]) -> None:
    """Wrap this sampler instance's entry points: DS errors become a normal exception, no image.

    `on_exit` runs after every sampler call, however it ends, to undo what the pass installed.
    """
    sampler = p.sampler
    for name in ("sample", "sample_img2img"):
        original = getattr(type(sampler), name, None)
        if original is None:
            continue

        def guarded(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            if state.error is not None:
                raise state.error
            try:
                result = _original(sampler, *args, **kwargs)
            finally:
                on_exit()
                state.run = None  # the pass is over: drop its conds and captured tensors
            if state.error is not None:  # DS stopped the sampler through the host's interrupt
                shared.state.interrupted = state.host.pop("interrupted", shared.state.interrupted)
                raise state.error
            return result

        setattr(sampler, name, guarded)


def skips_uncond(denoiser: Any, sigma: torch.Tensor) -> bool:
    """Mirror the CFG denoiser's NGMS / skip-early-CFG decision (it is made after on_cfg_denoiser)."""
    opts = shared.opts
    if opts.skip_early_cond != 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min = getattr(denoiser.p, "s_min_uncond", 0) or 0
    return bool((denoiser.step % 2 or opts.s_min_uncond_all) and s_min > 0 and sigma[0] < s_min)


def begin_pass(p: Any, end_pass: Callable[[Prepared], None]) -> Prepared | None:
    """The start of every process_before_every_sampling: guard the sampler, end what the previous pass
    left (`end_pass(state)` also runs after each sampler call), drop its run. Returns the state to build
    this pass on, or None when DS is off for `p` or has already failed."""
    state: Prepared | None = getattr(p, STATE_ATTR, None)
    if state is None:
        return None
    guard_sampler(p, state, lambda: end_pass(state))
    end_pass(state)
    state.run = None
    return None if state.error is not None else state


def refuse_pass(p: Any) -> None:
    """On a host without an adapter: a generation with DS on fails at the sampler, as any DS error does."""
    begin_pass(p, lambda state: None)


def encode_prompts(model: Any, prompts: list[str], negatives: list[str], steps: int, hires_steps: int | None,
                   width: int, height: int) -> tuple[Any, Any]:
    """(multicond, uncond) through the host's prompt parser, with `model`'s own text encoder."""
    # A1111 and Forge take the old-scheduling option; Neo dropped both the option and the argument
    old = [] if "use_old_scheduling" not in inspect.signature(prompt_parser.get_learned_conditioning).parameters \
        else [shared.opts.use_old_scheduling]
    pos = prompt_parser.SdConditioning(prompts, width=width, height=height)
    neg = prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True)
    with torch.no_grad():
        uc = prompt_parser.get_learned_conditioning(model, neg, steps, hires_steps, *old)
        c = prompt_parser.get_multicond_learned_conditioning(model, pos, steps, hires_steps, *old)
    return c, uc


@contextlib.contextmanager
def loading_source(title: str) -> Iterator[None]:
    """Turn a failed source load into a clear DeltaError."""
    try:
        yield
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise DeltaError(f"Delta Sampling: out of memory while loading the source '{title}'. "
                         "Free memory (Free source models, a smaller target) or choose a smaller source.") from e
    except DeltaError:
        raise
    except Exception as e:
        raise DeltaError(f"Delta Sampling: cannot build a model from '{title}': {e}") from e


def forget_modules(loaded: list, modules: list[Any], unload: Callable[[Any], None]) -> None:
    """Drop every reference a Forge-family host keeps to `modules` (a source's UNet and text encoder):
    its loaded-model entries (unloaded with `unload`) and the DS-patched target UNets' extra patchers."""
    ids = {id(m) for m in modules}
    for entry in [m for m in loaded if id(getattr(getattr(m, "model", None), "model", None)) in ids]:
        loaded.remove(entry)
        with contextlib.suppress(Exception):
            unload(entry)
    for unet in list(PATCHED_UNETS):
        unet.extra_model_patchers_during_sampling[:] = [
            m for m in unet.extra_model_patchers_during_sampling if id(m.model) not in ids]


@contextlib.contextmanager
def temporarily(obj: Any, **values: Any) -> Iterator[None]:
    """Attributes of `obj` set to `values` for a while, then put back."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


LOW_RAM_FRACTION = 0.15


def low_ram() -> bool:
    """System RAM is low when less than 15% of it is available (psutil's `available`; Linux MemAvailable)."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available < LOW_RAM_FRACTION * memory.total
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if ":" in line}
        return info["MemAvailable"] < LOW_RAM_FRACTION * info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return False


def rest_sources() -> None:
    """DS is off for this generation: cached sources leave the GPU but stay in RAM, so turning DS back on
    loads nothing (the [DS] Enabled axis does that on every cell), unless system RAM is low."""
    if not CACHE.entries:
        return
    if low_ram():
        logger.info("Delta Sampling is off and system RAM is low: releasing the source models")
        CACHE.clear()
        return
    for source in CACHE.entries.values():
        source.offload()


def free_sources() -> str:
    """The panel's "Free source models" button."""
    count = len(CACHE.entries)
    CACHE.clear()
    return f"Released {count} source model(s)." if count else "No source models were loaded."


def model_title(model: Any) -> str:
    """The checkpoint title of a host model object, for messages."""
    return getattr(getattr(model, "sd_checkpoint_info", None), "title", "") or ""
