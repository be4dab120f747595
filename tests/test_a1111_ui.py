"""Panel, infotext paste, X/Y/Z axes and settings against fake A1111 modules."""

from __future__ import annotations

import types

import pytest
import torch
from test_a1111_lifecycle import registered, write_lora
from test_a1111_sampling import ds, generate

from lib_delta import DeltaError
from lib_delta.spec import FIELDS, UNITS, DeltaSettings


def paste(webui, components, infotext_line: str, unit: int = 1) -> dict[str, object]:
    """What pasting the line sets in one unit's components."""
    from modules import infotext_utils

    params = infotext_utils.parse_generation_parameters(infotext_line)
    fields = {id(f.component): f for f in webui.script.infotext_fields}
    own = components[(unit - 1) * len(FIELDS) : unit * len(FIELDS)]
    return {f.attr: fields[id(c)].function(params) if f.infotext else f.default  # an image: never pasted
            for f, c in zip(FIELDS, own, strict=True)}


def infotext_line(webui, params: dict) -> str:
    from modules import infotext_utils

    return infotext_utils.parameters_line({"Steps": 20, "Sampler": "Euler", "CFG scale": 7, **params})


def test_ui_returns_components_in_spec_order_without_side_effects(webui):
    before = (registered(webui), list(webui.loads))
    comps = webui.script.ui(False)
    again = webui.script.ui(True)
    n = len(FIELDS)
    assert len(comps) == len(again) == UNITS * n
    assert [c.kwargs.get("label") for c in comps[:n]] == [f.label for f in FIELDS]
    for unit in range(1, UNITS):  # units 2.. : the same fields, their own enable checkbox
        own = comps[unit * n : (unit + 1) * n]
        assert [c.kwargs.get("label") for c in own[1:]] == [f.label for f in FIELDS[1:]]
        assert type(own[0]).__name__ == "Checkbox" and own[0].value is False
        assert len({c.kwargs["elem_id"] for c in own} & {c.kwargs["elem_id"] for c in comps[:n]}) == 0
    assert [c.value for c in comps] == DeltaSettings().to_args() * UNITS
    assert type(comps[0]).__name__ == "InputAccordion"
    assert comps[1].kwargs["choices"] == ["(choose a source)", "sd15_a [0000000001]", "sd15_b [0000000002]"]
    assert (registered(webui), webui.loads) == before
    (event, kw), = comps[2].events
    assert event == "change" and kw["inputs"] == [comps[2], comps[3]] and kw["outputs"][:2] == [comps[3], comps[4]]
    refresh = kw["outputs"][2]
    (event, kw), = refresh.events
    assert kw["inputs"] == [comps[2]] and kw["outputs"] == [comps[3]]  # lists the kind shown on this page


def test_send_to_img2img_copies_the_panel_by_field_name(webui):
    """A1111's Send-to buttons copy the components whose paste target name is in paste_field_names."""
    txt2img = webui.script.ui(False)
    txt_fields = list(webui.script.infotext_fields)
    img2img = webui.script.ui(True)
    names = webui.script.paste_field_names
    sources = [field for field, name in txt_fields if name in names]
    targets = [field for field, name in webui.script.infotext_fields if name in names]
    images = {id(c) for c in txt2img + img2img if type(c).__name__ == "Image"}  # not in the infotext
    assert len(images) == 2 * 2 * UNITS  # per unit: the control image and the IP-Adapter reference
    assert sources == [c for c in txt2img if id(c) not in images]
    assert targets == [c for c in img2img if id(c) not in images]
    assert all(callable(name) for _, name in txt_fields)


def test_infotext_round_trip_through_a1111_format(webui):
    write_lora(webui)
    settings = ds(adapter_kind="lora", adapter="style", strength=2.5, schedule="cosine", start=0.1,
                  base_prompt="a cat, sketch: ink", adapted_prompt='a cat, "ink" style', source_cfg=4.5)
    _, p, _ = generate(webui, settings)
    comps = webui.script.ui(False)
    line = infotext_line(webui, p.extra_generation_params)
    assert "DS lambda: 2.5" in line and "DS schedule: cosine" in line
    pasted = paste(webui, comps, line)
    assert pasted == {**settings.replace(source="sd15_a [0000000001]").__dict__}


def test_names_resolve_by_hash_when_they_differ(webui):
    write_lora(webui)
    settings = ds(source="renamed [0000000002]", adapter_kind="lora", adapter="old_name [000000000003]")
    comps = webui.script.ui(False)
    pasted = paste(webui, comps, infotext_line(webui, settings.to_infotext()))
    assert pasted["source"] == "sd15_b [0000000002]" and pasted["adapter"] == "style"


def test_a_source_never_loaded_as_main_model_gets_its_hash_and_is_found_after_a_rename(webui):
    """A1111 hashes checkpoints lazily: DS hashes the source it loads, so the infotext carries the hash."""
    import shutil

    lazy = webui.sd_models.CheckpointInfo(webui.checkpoints["sd15_b"].filename, None).register()
    assert lazy.title == "sd15_b"
    _, _, processed = generate(webui, ds(source="sd15_b"))
    short_hash = lazy.shorthash
    assert short_hash and processed.infotexts[0]["DS source"] == f"sd15_b [{short_hash}]"
    renamed = webui.tmp / "models" / "renamed.safetensors"
    shutil.copy(lazy.filename, renamed)
    webui.sd_models.checkpoints_list.clear()
    webui.sd_models.checkpoint_aliases.clear()
    webui.sd_models.CheckpointInfo(str(renamed), short_hash).register()
    pasted = paste(webui, webui.script.ui(False), infotext_line(webui, ds(source=f"sd15_b [{short_hash}]").to_infotext()))
    assert pasted["source"] == f"renamed [{short_hash}]"


def test_infotext_without_ds_turns_the_panel_off(webui):
    comps = webui.script.ui(False)
    pasted = paste(webui, comps, infotext_line(webui, {"Seed": 3}))
    assert pasted["enabled"] is False


def test_malformed_infotext_is_a_clear_error_at_paste_and_at_generation(webui):
    import gradio

    comps = webui.script.ui(False)
    line = infotext_line(webui, {"Delta Sampling": "v1; src=sd15_a; kind=prompt; ap=x; lam=lots"})
    pasted = paste(webui, comps, line)
    assert gradio.warnings[-1].startswith("Delta Sampling: bad value 'lots' for DS lambda")
    assert pasted["enabled"] is True and pasted["strength"] is None  # A1111 keeps None fields unchanged
    settings = DeltaSettings().replace(enabled=True, source=pasted["source"])
    with pytest.raises(DeltaError, match="bad value 'lots' for DS lambda"):
        generate(webui, settings)


@pytest.mark.parametrize("named", [False, True], ids=["gradio3", "gradio4"])
def test_the_empty_source_and_adapter_read_as_a_label_and_submit_empty(webui, monkeypatch, named):
    """gradio 3 shows a bare "" choice as a lone check mark; gradio 4 shows the first choice when the value is
    not a choice. Both show the label, and what reaches the settings for it is empty."""
    import gradio

    from delta_hosts import ui

    monkeypatch.setattr(gradio, "NAMED_CHOICES", named)
    ui.named_choices.cache_clear()
    try:
        comps = webui.script.ui(False)
    finally:
        ui.named_choices.cache_clear()
    for attr, label in (("source", "(choose a source)"), ("adapter", "(choose an adapter)")):
        box = comps[[f.attr for f in FIELDS].index(attr)]
        first = box.kwargs["choices"][0]
        assert first == ((label, "") if named else label) and box.value == ""
        shown = {value: name for name, value in box.choices} if named else {}
        assert shown.get(box.value, label) == label  # gradio 4 shows the choice whose value is the value
        submitted = "" if named else label
        args = DeltaSettings().replace(enabled=True).to_args()
        args[[f.attr for f in FIELDS].index(attr)] = submitted
        assert getattr(DeltaSettings.from_args(args), attr) == ""
    with pytest.raises(DeltaError, match="DS source is empty"):
        DeltaSettings.from_args(DeltaSettings().replace(enabled=True, source="(choose a source)").to_args()).validate()


def test_adapter_kind_switch_lists_that_kind_and_drops_a_stale_value(webui):
    from delta_hosts import ui

    write_lora(webui)
    adapter, weight, refresh, prompt = ui.on_kind_change("checkpoint", "style")
    assert "Empty: the base prompt" in prompt["placeholder"]
    assert adapter["choices"][1].startswith("sd15_a") and adapter["value"] == "" and weight["visible"] is False
    adapter, _, _, _ = ui.on_kind_change("checkpoint", "not_installed_here [abc]")
    assert adapter["value"] == "not_installed_here [abc]"  # a pasted name is kept for its clear error
    adapter, weight, refresh, prompt = ui.on_kind_change("prompt", "style")
    assert prompt["placeholder"].startswith("Required for a prompt adapter") and "Empty" not in prompt["placeholder"]
    assert adapter["visible"] is False and adapter["value"] == "" and weight["visible"] is False
    assert refresh["visible"] is False
    adapter, weight, refresh, _ = ui.on_kind_change("lora", "")
    assert adapter["choices"] == ["(choose an adapter)", "style"] and weight["visible"] is True
    assert refresh["visible"] is True and ui.refresh_adapters("lora")["choices"] == ["(choose an adapter)", "style"]
    assert ui.refresh_adapters("checkpoint")["choices"][1].startswith("sd15_a")


def fake_xyz(webui) -> types.ModuleType:
    xyz = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm, self.cost, self.choices = label, type, apply, confirm, cost, choices

    xyz.AxisOption, xyz.axis_options = AxisOption, []
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    webui.scripts.scripts_data.append(webui.scripts.ScriptClassData(script_class, "xyz_grid.py", ".", xyz))
    return xyz


def test_xyz_axes_register_once_and_reach_the_script_through_p(webui):
    from delta_hosts import xyz as ds_xyz

    xyz = fake_xyz(webui)
    ds_xyz.register()
    ds_xyz.register()
    labels = [o.label for o in xyz.axis_options]
    assert labels == ["[DS] Lambda", "[DS] Schedule", "[DS] Source checkpoint", "[DS] Adapter", "[DS] Enabled",
                      "[DS] Speed", "[DS] Strength mode", "[DS] Cap", "[DS] ControlNet weight",
                      "[DS] IP-Adapter weight", "[DS 2] Lambda", "[DS 3] Lambda"]
    axes = {o.label: o for o in xyz.axis_options}
    assert axes["[DS] Source checkpoint"].cost == 1.0 and axes["[DS] Lambda"].cost == 0.0
    assert axes["[DS] Schedule"].choices() == ["constant", "linear", "cosine", "exponential", "sigmoid"]
    with pytest.raises(DeltaError):
        axes["[DS] Lambda"].confirm(None, [1.0, float("nan")])
    with pytest.raises(DeltaError):
        axes["[DS] Lambda"].confirm(None, [42.0])

    off, _, _ = generate(webui)
    cells = []
    for lam in (0.0, 1.0):
        p = webui.processing.StableDiffusionProcessing(prompt="a red fox in snow", negative_prompt="blurry",
                                                       scripts=[webui.script], script_args=tuple(ds().to_args()))
        axes["[DS] Lambda"].apply(p, lam, None)
        cells.append((torch.cat(webui.processing.process_images(p).samples), p.extra_generation_params["DS lambda"]))
    assert torch.equal(cells[0][0], off) and cells[0][1] == "0"
    assert not torch.equal(cells[1][0], off) and cells[1][1] == "1"
    p = webui.processing.StableDiffusionProcessing(prompt="a red fox in snow", negative_prompt="blurry",
                                                   scripts=[webui.script], script_args=tuple(ds().to_args()))
    axes["[DS] Enabled"].apply(p, "False", None)
    assert torch.equal(torch.cat(webui.processing.process_images(p).samples), off)
    assert "Delta Sampling" not in p.extra_generation_params


def test_settings_section_and_log_level(webui):
    from lib_delta import logger

    webui.callbacks.ui_settings_callback()
    opts = webui.shared.opts
    assert opts.delta_sampling_cache_size == 1 and opts.delta_sampling_log_level == "INFO"
    opts.data["delta_sampling_log_level"] = "WARNING"
    opts.data_labels["delta_sampling_log_level"].onchange()
    assert logger.level == 30
    logger.setLevel("INFO")


def test_host_detection(webui, tmp_path, monkeypatch):
    import delta_hosts

    assert delta_hosts.detect_host() == delta_hosts.A1111
    (tmp_path / "backend" / "sampling").mkdir(parents=True)
    for init in ("backend/__init__.py", "backend/sampling/__init__.py", "backend/sampling/sampling_function.py"):
        (tmp_path / init).write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert delta_hosts.detect_host() == delta_hosts.FORGE


def test_unsupported_host_gets_a_message_in_the_panel_and_no_wrong_image(webui, monkeypatch):
    import gradio

    import delta_hosts

    adapter, reason = delta_hosts.load_adapter(delta_hosts.FORGE)  # these fakes have no Forge `backend`
    assert adapter is None and "does not support this WebUI (forge)" in reason
    monkeypatch.setattr(webui.module, "ADAPTER", None)
    monkeypatch.setattr(webui.module, "UNSUPPORTED", reason)
    assert any(isinstance(b, gradio.Markdown) for b in _created_blocks(webui, gradio))
    with pytest.raises(DeltaError, match="does not support this WebUI"):
        generate(webui, ds())


def _created_blocks(webui, gradio):
    created = []
    original = gradio.Block.__init__

    def record(self, *args, **kwargs):
        created.append(self)
        original(self, *args, **kwargs)

    gradio.Block.__init__ = record
    try:
        webui.script.ui(False)
    finally:
        gradio.Block.__init__ = original
    return created


def test_free_button_releases_cached_sources(webui):
    import gradio

    generate(webui, ds())
    assert webui.a1111.CACHE.entries
    webui.module.ui.free_sources()
    assert webui.a1111.CACHE.entries == {} and gradio.warnings[-1] == "Released 1 source model(s)."


def test_free_is_an_api_route_too(webui):
    routes = {}
    app = type("App", (), {"add_api_route": lambda self, path, fn, methods: routes.update({(path, *methods): fn})})()
    webui.callbacks.app_started_callback(None, app)
    generate(webui, ds())
    assert routes[("/delta-sampling/v1/free", "POST")]() == {"message": "Released 1 source model(s)."}
    assert webui.a1111.CACHE.entries == {}


def test_free_button_waits_for_the_running_generation(webui):
    """A1111 runs the button beside a generation: it frees only when the job's queue lock is released."""
    import threading

    from modules import call_queue

    generate(webui, ds())
    call_queue.queue_lock.acquire()  # a generation is running
    clicked = threading.Thread(target=webui.module.ui.free_sources)
    clicked.start()
    clicked.join(0.5)
    assert clicked.is_alive() and webui.a1111.CACHE.entries  # the sampler keeps its source
    call_queue.queue_lock.release()
    clicked.join(10)
    assert not clicked.is_alive() and webui.a1111.CACHE.entries == {}


def test_a_fork_missing_what_its_adapter_needs_gets_a_clear_refusal(webui):
    import delta_hosts

    adapter, reason = delta_hosts.load_adapter(delta_hosts.LDM_PATCHED)  # no ldm_patched in the A1111 fakes
    assert adapter is None and "does not support this WebUI (ldm_patched)" in reason and "ldm_patched" in reason


def test_a_name_that_does_not_resolve_warns_when_chosen(webui):
    import gradio

    from delta_hosts import ui

    write_lora(webui)
    before = list(gradio.warnings)
    ui.warn_if_missing("checkpoint", "sd15_a [0000000001]")
    ui.warn_if_missing("lora", "style")
    ui.warn_if_missing("prompt", "anything")
    ui.warn_if_missing("checkpoint", "(choose a source)")
    ui.warn_if_missing("lora", "(choose an adapter)")
    assert gradio.warnings == before
    ui.warn_if_missing("checkpoint", "gone [123]")
    ui.warn_if_missing("lora", "gone")
    assert [w.split("'")[1] for w in gradio.warnings[len(before):]] == ["gone [123]", "gone"]


def test_xyz_unit_lambda_axes_reach_their_own_unit(webui):
    """[DS 2] Lambda sweeps unit 2's lambda; unit 1 keeps its own."""
    from delta_hosts import xyz as ds_xyz

    xyz = fake_xyz(webui)
    ds_xyz.register()
    axes = {o.label: o for o in xyz.axis_options}
    units = [ds(strength=1.0), ds(strength=0.5, adapted_prompt="a green fox in snow")]
    args = tuple(v for u in units for v in u.to_args())
    only_unit_1, _, _ = generate(webui, units[0])
    cells = []
    for lam in (0.0, 2.0):
        p = webui.processing.StableDiffusionProcessing(prompt="a red fox in snow", negative_prompt="blurry",
                                                       scripts=[webui.script], script_args=args)
        axes["[DS 2] Lambda"].apply(p, lam, None)
        cells.append((torch.cat(webui.processing.process_images(p).samples), p.extra_generation_params))
    assert torch.equal(cells[0][0], only_unit_1)  # unit 2 at lambda 0 adds nothing, bit for bit
    assert not torch.equal(cells[1][0], only_unit_1)
    assert "lam=2.0" in cells[1][1]["Delta Sampling 2"] and cells[1][1]["DS lambda"] == "1"


def test_two_units_round_trip_through_a1111_infotext(webui):
    """A v2 infotext pastes into both units; a v1 infotext pastes into unit 1 and turns units 2.. off."""
    write_lora(webui)
    units = [ds(adapter_kind="lora", adapter="style", strength=2.5, loras="style:0.5"),
             ds(strength=-0.5, adapted_prompt="a cat, watercolor", schedule="sigmoid")]
    p = webui.processing.StableDiffusionProcessing(prompt="a red fox", negative_prompt="blurry", scripts=[webui.script],
                                                   script_args=tuple(v for u in units for v in u.to_args()))
    webui.processing.process_images(p)
    comps = webui.script.ui(False)
    line = infotext_line(webui, p.extra_generation_params)
    assert "Delta Sampling 2: " in line
    first, second = paste(webui, comps, line, 1), paste(webui, comps, line, 2)
    assert first == {**units[0].replace(source="sd15_a [0000000001]", loras="style:0.5").__dict__}
    assert second == {**units[1].replace(source="sd15_a [0000000001]").__dict__}
    v1_line = infotext_line(webui, units[1].replace(source="sd15_a [0000000001]").to_infotext())
    assert "v1;" in v1_line and paste(webui, comps, v1_line, 2)["enabled"] is False
