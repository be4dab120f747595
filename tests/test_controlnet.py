"""A ControlNet on the adapted source through the host's own ControlNet (fake Forge and Neo backends
with Forge's ControlNet signatures): the weight-0 identity, what the ControlNet sees, and that the
target and the user's own ControlNet units are left as they were."""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_units_hosts import generate
from tinyldm import controlnet_state_dict

from lib_delta.spec import DeltaSettings

FAKE_CONTROLNET_EXTENSION = Path(__file__).parent / "fake_sd_webui_controlnet" / "scripts"


@contextlib.contextmanager
def controlnet_extension() -> Iterator[None]:
    """sd-webui-controlnet loaded into the fake A1111: its `scripts` package importable as `scripts.*`."""
    saved = {k: v for k, v in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
    package = types.ModuleType("scripts")
    package.__path__ = [str(FAKE_CONTROLNET_EXTENSION)]
    sys.modules["scripts"] = package
    try:
        for name in ("enums", "hook", "controlnet_model_guess", "ipadapter.plugable_ipadapter",
                     "preprocessor.legacy.processor"):
            importlib.import_module(f"scripts.{name}")
        yield
    finally:
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def host_with_control_files(request, **files: dict) -> Iterator:
    """The host named by the fixture's param, with these {name: tensors} files in its models/ControlNet (A1111:
    with the fake sd-webui-controlnet loaded); `host.folder`, `host.kind` set."""
    host = request.getfixturevalue("webui" if request.param == "a1111" else request.param)
    from modules import paths

    paths.models_path = str(host.tmp / "models")
    folder = host.tmp / "models" / "ControlNet"
    folder.mkdir(parents=True)
    for name, tensors in files.items():
        safetensors.torch.save_file(tensors, str(folder / f"{name}.safetensors"))
    host.folder, host.kind = folder, request.param
    if request.param != "a1111":
        yield host
        return
    with controlnet_extension():
        yield host


@pytest.fixture(params=["forge", "neo", "a1111"])
def host(request):
    yield from host_with_control_files(request, control_sd15_canny=controlnet_state_dict())


def picture(seed: int, size: int = 64) -> np.ndarray:
    """Random rectangles: an image with edges for canny."""
    g = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(4):
        x0, y0 = g.integers(0, size - 16, 2)
        image[y0 : y0 + 16, x0 : x0 + 16] = g.integers(0, 255, 3)
    return image


def controlled(image=None, **kw) -> DeltaSettings:
    image = picture(1) if image is None else image
    return lora_ds(strength=1.5).replace(control_model="control_sd15_canny", control_image=image, **kw)


def test_a_controlnet_at_weight_zero_is_bit_identical_to_none(host):
    write_lora(host)
    without, _, _ = generate(host, [lora_ds(strength=1.5)])
    zero, _, processed = generate(host, [controlled(control_weight=0.0)])
    assert torch.equal(without, zero)
    assert "cn=control_sd15_canny" in processed.infotexts[0]["Delta Sampling"]


def test_a_controlnet_changes_the_delta_and_follows_the_control_image(host):
    write_lora(host)
    without, _, _ = generate(host, [lora_ds(strength=1.5)])
    one, _, _ = generate(host, [controlled(picture(1))])
    other, _, _ = generate(host, [controlled(picture(2))])
    again, _, _ = generate(host, [controlled(picture(1))])
    assert (one - without).abs().mean() > 1e-4 and (other - one).abs().mean() > 1e-5
    assert torch.equal(one, again)


def forge_only(host) -> None:
    if host.kind == "a1111":
        pytest.skip("Forge's ControlNet objects (A1111 has its own test below)")


def test_the_controlnet_sees_the_sources_sigma_and_conds(host, monkeypatch):
    """Every controlled forward is the source's: the ControlNet gets that forward's own prompt encoding and
    the source predictor's timestep of its sigma; the target's forwards carry no control."""
    forge_only(host)
    from backend.modules.k_model import KModel

    write_lora(host)
    seen = []
    original = KModel.apply_model

    def spy(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):  # noqa: B006
        call = None
        if control is not None:  # get_control ran just before this forward
            source = next(iter(host.generation.CACHE.entries.values()))
            call = next(iter(source.controlnets.values())).control_model.calls[-1]
        seen.append((self, control is not None, c_crossattn, t, call))
        return original(self, x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    monkeypatch.setattr(KModel, "apply_model", spy)
    generate(host, [controlled().replace(source="sd15_b")])
    target = host.shared.sd_model.forge_objects.unet.model
    controlled_calls = [s for s in seen if s[1]]
    assert controlled_calls and all(s[0] is not target for s in controlled_calls)
    assert all(not s[1] for s in seen if s[0] is target)
    for model, _, context, t, call in controlled_calls:
        assert torch.equal(call["context"], context)
        torch.testing.assert_close(call["timesteps"], model.predictor.timestep(t).float())


class UsersControlNet:
    """What Forge's ControlNet script does for a user's unit: in process_before_every_sampling, a clone of
    the target's UNet patcher with the ControlNet becomes the target's UNet for this pass."""

    def __init__(self, net) -> None:
        self.net, self.installed = net, []

    def process_before_every_sampling(self, p, *args, **kwargs):
        from backend.patcher.controlnet import apply_controlnet_advanced

        hint = torch.from_numpy(picture(9)).float().div(255).permute(2, 0, 1)[None]
        objects = p.sd_model.forge_objects
        objects.unet = apply_controlnet_advanced(unet=objects.unet, controlnet=self.net, image_bchw=hint,
                                                 strength=1.0, start_percent=0.0, end_percent=1.0)
        self.installed.append(objects.unet)

    def __getattr__(self, name):  # the other script hooks: nothing
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("users_first", [True, False])
def test_the_target_and_the_users_own_controlnet_are_left_as_they_were(host, users_first):
    """A user's ControlNet unit on the target keeps acting on it alone, in either script order: DS never
    adds to it, and DS's own ControlNet is cleaned up after the run."""
    forge_only(host)
    from modules_forge.supported_controlnet import ControlNetPatcher

    write_lora(host)
    user = UsersControlNet(ControlNetPatcher.try_build_from_state_dict(controlnet_state_dict(seed=5), "u.pth").model_patcher)
    calls = user.net.control_model.calls

    def run(units):
        scripts = [user, host.script] if users_first else [host.script, user]
        flat = [v for u in units for v in u.to_args()] + DeltaSettings().to_args() * (3 - len(units))
        p = host.processing.StableDiffusionProcessing(prompt="a red fox in snow", negative_prompt="blurry",
                                                      scripts=scripts, script_args=tuple(flat), steps=4)
        return torch.cat(host.processing.process_images(p).samples)

    plain, _, _ = generate(host)
    users_only = run([])
    assert not torch.equal(plain, users_only) and len(calls) > 0  # the user's ControlNet acts on the target
    n = len(calls)
    with_ds_off = run([controlled(strength=0.0)])
    assert torch.equal(users_only, with_ds_off) and len(calls) > n
    run([controlled()])
    for unet in user.installed:  # DS never joins the user's list
        assert unet.list_controlnets() == [unet.controlnet_linked_list]
        assert unet.controlnet_linked_list.previous_controlnet is None
    source = next(iter(host.generation.CACHE.entries.values()))
    assert source.control_unet is None and source.unet.controlnet_linked_list is None
    ds_net = next(iter(source.controlnets.values()))
    assert ds_net.timestep_range is None and ds_net.cond_hint is None  # the loaded one, never run itself


def test_the_img2img_input_is_the_control_image_when_the_panel_has_none(host):
    from PIL import Image

    write_lora(host)
    with pytest.raises(Exception, match="DS ControlNet needs a control image"):
        generate(host, [controlled().replace(control_image=None)])
    from_panel, _, _ = generate(host, [controlled(picture(3))])
    from_init, _, _ = generate(host, [controlled().replace(control_image=None)],
                               init_images=[Image.fromarray(picture(3))])
    assert torch.equal(from_panel, from_init)
    buffer = io.BytesIO()
    Image.fromarray(picture(3)).save(buffer, format="PNG")
    from_api, _, _ = generate(host, [controlled(base64.b64encode(buffer.getvalue()).decode())])
    assert torch.equal(from_panel, from_api)


def test_a_missing_or_wrong_controlnet_file_is_a_clear_error(host):
    write_lora(host)
    with pytest.raises(Exception, match="ControlNet 'nope' was not found"):
        generate(host, [controlled().replace(control_model="nope")])
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(host.tmp / "models" / "ControlNet" / "junk.safetensors"))
    with pytest.raises(Exception, match="'junk.safetensors' is not a ControlNet"):
        generate(host, [controlled().replace(control_model="junk")])


def test_releasing_the_source_releases_its_controlnet(host):
    write_lora(host)
    generate(host, [controlled()])
    cache = (host.a1111 if host.kind == "a1111" else host.generation).CACHE
    source = next(iter(cache.entries.values()))
    if host.kind == "a1111":
        net = next(iter(source.controlnets.values())).model
        host.a1111.CACHE.clear()
        assert source.controlnets == {} and all(p.is_meta for p in net.parameters())
        return
    net = next(iter(source.controlnets.values())).control_model_wrapped.model
    host.generation.free_sources()
    assert source.controlnets == {}
    assert all(getattr(getattr(m, "model", None), "model", None) is not net for m in host.memory.current_loaded_models)


def test_a1111_without_sd_webui_controlnet_says_what_to_install(webui):
    from modules import paths

    paths.models_path = str(webui.tmp / "models")
    write_lora(webui)
    (webui.tmp / "models" / "ControlNet").mkdir(parents=True)
    safetensors.torch.save_file(controlnet_state_dict(), str(webui.tmp / "models" / "ControlNet" / "cn.safetensors"))
    with pytest.raises(Exception, match="needs the sd-webui-controlnet extension on A1111"):
        generate(webui, [lora_ds().replace(control_model="cn", control_image=picture(1))])


def test_a1111_the_controlnet_runs_on_the_adapted_source_only_and_is_unhooked_after(webui):
    """sd-webui-controlnet's hook on the source UNet: the ControlNet runs on the adapted forwards only, with
    that forward's own input and prompts; afterwards the source UNet, p.sample and the callbacks are as
    before, and a user's own hook on the target keeps acting alone."""
    from modules import paths

    paths.models_path = str(webui.tmp / "models")
    (webui.tmp / "models" / "ControlNet").mkdir(parents=True)
    safetensors.torch.save_file(controlnet_state_dict(), str(webui.tmp / "models" / "ControlNet" / "cn.safetensors"))
    write_lora(webui)
    with controlnet_extension():
        hook_module = sys.modules["scripts.hook"]
        guess = sys.modules["scripts.controlnet_model_guess"]
        user = guess.build_model_by_guess(controlnet_state_dict(seed=5), None, "user.pth")
        target_unet = webui.shared.sd_model.model.diffusion_model
        user_param = hook_module.ControlParams(
            control_model=user.model, preprocessor={"name": "none"}, hint_cond=torch.rand(1, 3, 32, 32),
            weight=1.0, guidance_stopped=False, start_guidance_percent=0.0, stop_guidance_percent=1.0,
            advanced_weighting=None, control_model_type=user.type, hr_hint_cond=None, global_average_pooling=False,
            soft_injection=False, cfg_injection=False)
        plain, _, _ = generate(webui)
        user_hook = hook_module.UnetHook()
        user_hook.hook(target_unet, webui.shared.sd_model, [user_param], types.SimpleNamespace(sample=None))
        users_only, _, _ = generate(webui)
        callbacks = {k: list(v) for k, v in webui.callbacks.callback_map.items()}
        settings = lora_ds(strength=1.5).replace(control_model="cn", control_image=picture(1))
        with_ds_off, _, _ = generate(webui, [settings.replace(strength=0.0)])
        source = next(iter(webui.a1111.CACHE.entries.values()))
        net = next(iter(source.controlnets.values())).model
        source_unet = source.model.model.diffusion_model
        net.calls.clear()
        on, p, _ = generate(webui, [settings])
        after = {k: list(v) for k, v in webui.callbacks.callback_map.items()}
        assert target_unet._original_forward is not None  # the user's hook is still on the target
        user_hook.restore()
    assert not torch.equal(plain, users_only) and torch.equal(users_only, with_ds_off)
    assert not torch.equal(on, users_only)
    assert len(net.calls) == 4  # Euler, 4 steps: one adapted forward per step (its cond and uncond rows)
    assert all(call["context"].shape[0] == 2 for call in net.calls)  # never the base branch's rows too
    assert "forward" not in source_unet.__dict__ and not hasattr(source_unet, "_original_forward")
    assert after == callbacks  # DS's guidance schedule is gone again; the user's stays
    assert "sample" not in vars(p.sampler) or not hasattr(p, "sample_before_CN_hack")
