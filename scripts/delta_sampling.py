"""Delta Sampling for AUTOMATIC1111 WebUI: the script. The core is lib_delta/, host glue delta_hosts/."""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts

from delta_hosts import A1111, HOST, a1111, ui, xyz


class DeltaSamplingScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return "Delta Sampling"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        return ui.build(self, is_img2img, supported=HOST == A1111)

    def process(self, p: Any, *args: Any) -> None:
        a1111.prepare(p, a1111.settings_for(p, args), supported=HOST == A1111)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        a1111.begin_pass(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        a1111.finish(p)


script_callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
script_callbacks.on_cfg_after_cfg(a1111.on_cfg_after_cfg)
script_callbacks.on_ui_settings(ui.on_ui_settings)
script_callbacks.on_before_ui(xyz.register)
script_callbacks.on_script_unloaded(a1111.CACHE.clear)
xyz.register()  # --nowebui builds the API's X/Y/Z script before on_before_ui fires
