"""The Delta Sampling panel, built from the settings spec. Cheap and side-effect free: the API calls it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gradio as gr

from lib_delta import DeltaError, logger
from lib_delta.spec import FIELD_BY_ATTR, FIELDS, MALFORMED, UNITS, DeltaSettings, coerce, malformed_source

from . import choices, control


def build(script: Any, is_img2img: bool, unsupported: str | None = None) -> list[Any]:
    """Components of every unit in FIELDS order (= API args order, unit after unit); sets the script's
    infotext paste fields. Unit 1 is the accordion's; units 2.. sit in tabs with their own checkbox."""
    from modules.infotext_utils import PasteField
    from modules.ui_components import InputAccordion

    tab = "img2img" if is_img2img else "txt2img"
    units: list[dict[str, Any]] = []
    with InputAccordion(False, label="Delta Sampling", elem_id=f"delta_sampling_{tab}_enabled") as enabled:
        if unsupported:
            gr.Markdown(unsupported)
        with gr.Tabs(elem_id=f"delta_sampling_{tab}_units"):
            for n in range(1, UNITS + 1):
                with gr.Tab(f"Unit {n}", elem_id=f"delta_sampling_{tab}_unit{n}"):
                    units.append(unit_panel(tab, n, enabled if n == 1 else None))
        free = gr.Button(value="Free source models", elem_id=f"delta_sampling_{tab}_free")
    free.click(fn=free_sources, inputs=[], outputs=[], show_progress=False)
    script.infotext_fields, script.paste_field_names = [], []
    pasted = [f for f in FIELDS if f.infotext]  # an image is not in the infotext: a paste keeps the panel's
    for n, c in enumerate(units, 1):
        keys = [PasteKey(f.attr, n) for f in pasted]
        script.infotext_fields += [PasteField(c[f.attr], key, api=None) for f, key in zip(pasted, keys, strict=True)]
        script.paste_field_names += keys  # "Send to img2img/inpaint" copies these components by name
    return [c[f.attr] for c in units for f in FIELDS]


def unit_panel(tab: str, n: int, enabled: Any | None) -> dict[str, Any]:
    """One unit's controls; `enabled`: the accordion (unit 1), else the unit gets its own checkbox."""
    from modules.ui_common import create_refresh_button
    from modules.ui_components import ToolButton

    def eid(attr: str) -> str:
        return f"delta_sampling_{tab}_{attr}" if n == 1 else f"delta_sampling_{tab}_u{n}_{attr}"

    def kw(attr: str) -> dict[str, Any]:
        f = FIELD_BY_ATTR[attr]
        return {"label": f.label, "value": f.default, "elem_id": eid(attr)}

    def slider(attr: str) -> gr.Slider:
        f = FIELD_BY_ATTR[attr]
        return gr.Slider(minimum=f.minimum, maximum=f.maximum, step=f.step, **kw(attr))

    c: dict[str, Any] = {"enabled": enabled}
    if enabled is None:
        c["enabled"] = gr.Checkbox(label=f"Enable unit {n} (adds its own lambda x delta)", value=False,
                                   elem_id=eid("enabled"))
    with gr.Row():
        c["source"] = gr.Dropdown(choices=selectable("source", choices.checkpoints()), allow_custom_value=True,
                                  **kw("source"))
        create_refresh_button(c["source"], choices.refresh_checkpoints,
                              lambda: {"choices": selectable("source", choices.checkpoints())}, eid("source_refresh"))
    with gr.Row():
        c["adapter_kind"] = gr.Dropdown(choices=list(FIELD_BY_ATTR["adapter_kind"].choices), **kw("adapter_kind"))
        c["adapter"] = gr.Dropdown(choices=selectable("adapter", choices.adapters("lora")), allow_custom_value=True,
                                   **kw("adapter"))
        refresh = ToolButton(value="\U0001f504", elem_id=eid("adapter_refresh"), tooltip="DS adapter: refresh")
        c["adapter_weight"] = slider("adapter_weight")
    c["loras"] = gr.Textbox(lines=1, placeholder="name:weight, name:weight  (or <lora:name:weight>)", **kw("loras"))
    with gr.Row():
        c["strength"] = slider("strength")
        c["strength_mode"] = gr.Radio(choices=list(FIELD_BY_ATTR["strength_mode"].choices), **kw("strength_mode"))
        c["speed"] = gr.Radio(choices=list(FIELD_BY_ATTR["speed"].choices), **kw("speed"))
    with gr.Row():
        c["schedule"] = gr.Dropdown(choices=list(FIELD_BY_ATTR["schedule"].choices), **kw("schedule"))
        c["start"] = slider("start")
        c["end"] = slider("end")
    for attr in ("base_prompt", "adapted_prompt", "negative_prompt"):
        c[attr] = gr.Textbox(lines=1, placeholder=FIELD_BY_ATTR[attr].tooltip, **kw(attr))
    with gr.Accordion("ControlNet on the adapted source", open=False):
        with gr.Row():
            c["control_model"] = gr.Dropdown(choices=selectable("control_model", control.controlnets()),
                                             allow_custom_value=True, **kw("control_model"))
            c["control_preprocessor"] = gr.Radio(choices=list(FIELD_BY_ATTR["control_preprocessor"].choices),
                                                 **kw("control_preprocessor"))
        with gr.Row():
            c["control_weight"] = slider("control_weight")
            c["control_start"] = slider("control_start")
            c["control_end"] = slider("control_end")
        with gr.Row():
            c["control_image"] = gr.Image(type="numpy", **kw("control_image"))
            detected = gr.Image(label="Detected map", interactive=False, elem_id=eid("control_map"))
        preview = gr.Button(value="Preview the map", elem_id=eid("control_preview"))
    preview.click(fn=preview_map, inputs=[c["control_image"], c["control_preprocessor"]], outputs=[detected],
                  show_progress=False)
    with gr.Accordion("IP-Adapter on the adapted source", open=False):
        with gr.Row():
            c["ipadapter_model"] = gr.Dropdown(choices=selectable("ipadapter_model", control.ipadapters()),
                                               allow_custom_value=True, **kw("ipadapter_model"))
            c["ipadapter_weight"] = slider("ipadapter_weight")
        c["ipadapter_image"] = gr.Image(type="numpy", **kw("ipadapter_image"))
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            c["source_cfg"] = slider("source_cfg")
            c["cap"] = slider("cap")
        gr.Markdown("Speed knobs, used when DS speed is *custom*:")
        with gr.Row():
            c["batched"] = gr.Checkbox(**kw("batched"))
            c["cond_only"] = gr.Checkbox(**kw("cond_only"))
            c["native_size"] = gr.Checkbox(**kw("native_size"))
            c["reuse"] = slider("reuse")
    c["source"].change(fn=lambda name: warn_if_missing("checkpoint", name), inputs=[c["source"]], outputs=[],
                       show_progress=False)
    c["adapter"].change(fn=warn_if_missing, inputs=[c["adapter_kind"], c["adapter"]], outputs=[], show_progress=False)
    refresh.click(fn=refresh_adapters, inputs=[c["adapter_kind"]], outputs=[c["adapter"]], show_progress=False)
    c["adapter_kind"].change(fn=on_kind_change, inputs=[c["adapter_kind"], c["adapter"]],
                             outputs=[c["adapter"], c["adapter_weight"], refresh, c["adapted_prompt"]],
                             show_progress=False)
    return c


ADAPTED_PROMPT_REQUIRED = ("Required for a prompt adapter: the prompt whose effect is transferred; {prompt} stands "
                           "for each image's own prompt, e.g. '{prompt}, pixel art'.")


def on_kind_change(kind: str, adapter: str) -> tuple[dict, dict, dict, dict]:
    """List the new kind's adapters; drop a value that names an adapter of another kind; hide unused fields;
    the adapted prompt's placeholder says what an empty box means for this kind."""
    names = choices.adapters(kind)
    adapter = coerce(FIELD_BY_ATTR["adapter"], adapter)
    stale = adapter not in names and adapter in choices.adapters(None)
    hint = ADAPTED_PROMPT_REQUIRED if kind == "prompt" else FIELD_BY_ATTR["adapted_prompt"].tooltip
    return (gr.update(choices=selectable("adapter", names), value="" if stale or kind == "prompt" else adapter, visible=kind != "prompt"),
            gr.update(visible=kind == "lora"), gr.update(visible=kind != "prompt"), gr.update(placeholder=hint))


def preview_map(image: Any, preprocessor: str) -> Any:
    """The ControlNet panel's *Preview the map*: what the ControlNet will see."""
    try:
        decoded = control.decode_image(image)
        return None if decoded is None else control.control_map(decoded, preprocessor)
    except DeltaError as e:
        gr.Warning(str(e))
        return None


def warn_if_missing(kind: str, name: str) -> None:
    """Say at once when a chosen, typed or pasted name does not resolve. Generation fails with the same
    message; Forge Classic shows only "TypeError: 'NoneType' ..." for any failed generation."""
    from . import files

    name = coerce(FIELD_BY_ATTR["source" if kind == "checkpoint" else "adapter"], name)
    if not name or kind == "prompt" or name.startswith(MALFORMED):
        return
    try:
        files.find_checkpoint(name) if kind == "checkpoint" else files.find_lora(name)
    except DeltaError as e:
        gr.Warning(str(e))


def free_sources() -> None:
    """The panel's *Free source models* button."""
    gr.Info(release_after_running_job())


def release_after_running_job() -> str:
    """Release every cached source model after the running generation: on Forge's generation thread, or
    under A1111's queue lock (held by every UI and API generation), never under a running sampler."""
    from . import generation

    try:
        from modules_forge import main_thread
    except ImportError:
        from modules import call_queue

        with call_queue.queue_lock:
            message = generation.free_sources()
    else:
        message = main_thread.run_and_wait_result(generation.free_sources)
    logger.info("%s", message)
    return message


FREE_ROUTE = "/delta-sampling/v1/free"


def mount_api(_demo: Any, app: Any) -> None:
    """script_callbacks.on_app_started: `POST /delta-sampling/v1/free` is the Free button for API users."""
    app.add_api_route(FREE_ROUTE, lambda: {"message": release_after_running_job()}, methods=["POST"])


def refresh_adapters(kind: str) -> dict:
    """The adapter refresh button: rescan the host's files, list the kind this page shows."""
    choices.refresh_adapters()
    return gr.update(choices=selectable("adapter", choices.adapters(kind)))


def selectable(attr: str, names: list[str]) -> list[Any]:
    """Choices with a readable empty entry first. gradio 4 shows the first choice when the value is not
    among them (yet submits the value), so the empty value is a (label, "") choice; gradio 3 has no such
    choices, shows a bare "" as a lone check mark, and submits the label, which coerce() reads as empty."""
    label = FIELD_BY_ATTR[attr].empty_label
    return [(label, "") if named_choices() else label, *names]


@functools.cache
def named_choices() -> bool:
    """Whether this gradio's Dropdown takes (name, value) choices (gradio 4+; gradio 3 str()s them)."""
    return gr.Dropdown(choices=[("name", "")], render=False).choices == [("name", "")]  # not drawn in the panel


class PasteKey(str):
    """A field's paste target. Callable: A1111 calls it with the pasted infotext params. A str ("DS/<attr>",
    "DS<n>/<attr>" for unit n): the "Send to img2img" buttons match fields by name, so the panel's values
    travel between tabs."""

    def __new__(cls, attr: str, unit: int = 1) -> PasteKey:
        key = super().__new__(cls, f"DS/{attr}" if unit == 1 else f"DS{unit}/{attr}")
        key.parse = paste_value(attr, unit)
        return key

    def __call__(self, params: dict[str, Any]) -> Any:
        return self.parse(params)


def paste_value(attr: str, unit: int = 1) -> Callable[[dict[str, Any]], Any]:
    """Paste function of one field of one unit: parse its DS infotext; no DS key turns the unit off."""

    def value(params: dict[str, Any]) -> Any:
        try:
            settings = DeltaSettings.from_infotext(params, unit)
        except DeltaError as e:
            # A1111's paste swallows exceptions, so keep DS on with a source that fails with this message:
            # a clear error at generation (UI and API) instead of a silently different image.
            if attr == "enabled":
                logger.error("%s", e)
                gr.Warning(str(e))
                return True
            return malformed_source(str(e)) if attr == "source" else None
        if attr == "source" and settings.enabled:
            return choices.resolve_checkpoint(settings.source)
        if attr == "adapter" and settings.enabled:
            return choices.resolve_adapter(settings.adapter_kind, settings.adapter)
        if attr == "loras" and settings.loras:
            return ", ".join(f"{choices.resolve_adapter('lora', name)}:{weight:g}"
                             for name, weight in settings.stacked_loras())
        return getattr(settings, attr)

    return value


def on_ui_settings() -> None:
    from modules import shared

    section = ("delta_sampling", "Delta Sampling")
    shared.opts.add_option("delta_sampling_cache_size", shared.OptionInfo(
        1, "Source models kept in memory between generations (more makes X/Y/Z source sweeps faster)", gr.Slider,
        {"minimum": 1, "maximum": 8, "step": 1}, section=section, category_id="sd"))
    shared.opts.add_option("delta_sampling_log_level", shared.OptionInfo(
        "INFO", "Delta Sampling log level", gr.Radio, {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]},
        onchange=apply_log_level, section=section, category_id="sd"))
    apply_log_level()


def apply_log_level() -> None:
    from modules import shared

    logger.setLevel(shared.opts.data.get("delta_sampling_log_level", "INFO"))
