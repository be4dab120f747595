"""Delta Sampling for AUTOMATIC1111 and Forge: the script. The core is lib_delta/, host glue delta_hosts/."""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts

from delta_hosts import HOST, generation, load_adapter, ui, xyz

ADAPTER, UNSUPPORTED = load_adapter(HOST)


class DeltaSamplingScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return "Delta Sampling"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        return ui.build(self, is_img2img, unsupported=UNSUPPORTED)

    def process(self, p: Any, *args: Any) -> None:
        settings = generation.settings_for(p, args)
        if ADAPTER is None:
            generation.prepare(p, settings, None, UNSUPPORTED)
        else:
            ADAPTER.start(p, settings)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if ADAPTER is None:
            generation.refuse_pass(p)
        else:
            ADAPTER.begin_pass(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        if ADAPTER is not None:
            ADAPTER.finish(p)


if ADAPTER is not None:
    for name in ("on_cfg_denoiser", "on_cfg_denoised", "on_cfg_after_cfg"):
        if hasattr(ADAPTER, name):
            getattr(script_callbacks, name)(getattr(ADAPTER, name))
script_callbacks.on_ui_settings(ui.on_ui_settings)
script_callbacks.on_app_started(ui.mount_api)
script_callbacks.on_before_ui(xyz.register)
script_callbacks.on_script_unloaded(generation.CACHE.clear)
xyz.register()  # --nowebui builds the API's X/Y/Z script before on_before_ui fires
