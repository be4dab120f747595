"""A1111's script_callbacks: registration and dispatch (exceptions are reported and swallowed)."""

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

callback_map: dict[str, list] = defaultdict(list)
reported: list[tuple[str, BaseException]] = []


@dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = ""


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def add_callback(category, fun, name=None):
    callback_map["callbacks_" + category].append(ScriptCallback("delta_sampling.py", fun, name or ""))


def _dispatch(category, *args):
    for c in callback_map["callbacks_" + category]:
        try:
            c.callback(*args)
        except Exception as e:  # A1111: errors.report(...), generation goes on
            reported.append((category, e))


def cfg_denoiser_callback(params):
    _dispatch("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _dispatch("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _dispatch("cfg_after_cfg", params)


def before_ui_callback():
    _dispatch("before_ui")


def ui_settings_callback():
    _dispatch("ui_settings")


def script_unloaded_callback():
    _dispatch("script_unloaded")


def on_cfg_denoiser(callback, *, name=None):
    add_callback("cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name=None):
    add_callback("cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name=None):
    add_callback("cfg_after_cfg", callback, name)


def on_before_ui(callback, *, name=None):
    add_callback("before_ui", callback, name)


def on_ui_settings(callback, *, name=None):
    add_callback("ui_settings", callback, name)


def on_script_unloaded(callback, *, name=None):
    add_callback("script_unloaded", callback, name)


def on_app_started(callback, *, name=None):
    add_callback("app_started", callback, name)


def app_started_callback(demo, app):
    _dispatch("app_started", demo, app)


def on_infotext_pasted(callback, *, name=None):
    add_callback("infotext_pasted", callback, name)


def clear_callbacks():
    callback_map.clear()


def remove_callbacks_for_function(callback_func):
    for callbacks in callback_map.values():
        callbacks[:] = [c for c in callbacks if c.callback != callback_func]
