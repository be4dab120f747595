"""An IP-Adapter on the adapted source through the host's own IP-Adapter (fake Forge and Neo backends with
sd_forge_ipadapter's signatures): the weight-0 identity, that its attention patches reach only the
adapted branch's forwards with the source's sigma, and that the target, the host's classes and the
image encoder's memory are left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import lora_ds, write_lora
from test_controlnet import controlled, host_with_control_files, picture
from test_units_hosts import generate
from tinyldm import controlnet_state_dict, ipadapter_state_dict
from webui_models import sd15_ipadapter

from lib_delta import DeltaError
from lib_delta.spec import DeltaSettings

IP_FILE = "ip-adapter_tiny"


@pytest.fixture(params=["forge", "neo", "a1111"])
def host(request):
    yield from host_with_control_files(request, **{IP_FILE: ipadapter_state_dict(),
                                                   "control_sd15_canny": controlnet_state_dict()})


def forge_only(host) -> None:
    if host.kind == "a1111":
        pytest.skip("Forge's IP-Adapter objects (A1111 has its own tests below)")


def adapted(image: np.ndarray | None = None, **kw) -> DeltaSettings:
    image = picture(5) if image is None else image
    return lora_ds(strength=1.5).replace(**{"ipadapter_model": IP_FILE, "ipadapter_image": image, **kw})


def test_an_ip_adapter_at_weight_zero_is_bit_identical_to_none(host):
    write_lora(host)
    without, _, _ = generate(host, [lora_ds(strength=1.5)])
    zero, _, processed = generate(host, [adapted(ipadapter_weight=0.0)])
    assert torch.equal(without, zero)
    assert f"ip={IP_FILE}; ipw=0.0" in processed.infotexts[0]["Delta Sampling"]


def test_an_ip_adapter_changes_the_delta_and_follows_the_reference_image(host):
    write_lora(host)
    without, _, _ = generate(host, [lora_ds(strength=1.5)])
    one, _, processed = generate(host, [adapted(picture(5))])
    other, _, _ = generate(host, [adapted(picture(6))])
    again, _, _ = generate(host, [adapted(picture(5))])
    assert (one - without).abs().mean() > 1e-4 and (other - one).abs().mean() > 1e-5
    assert torch.equal(one, again)
    assert processed.infotexts[0]["Delta Sampling"].startswith("v3;")
    stronger, _, _ = generate(host, [adapted(picture(5), ipadapter_weight=2.0)])
    assert (stronger - without).abs().mean() > (one - without).abs().mean()


def test_its_patches_reach_only_the_adapted_forwards_with_the_sources_sigma(host, monkeypatch):
    """Every source forward with the IP-Adapter's patches is the adapted branch's (its LoRA is on), as many
    as the base's plain ones; the patch gets each forward's own sigma and cond/uncond chunks; the target's
    forwards carry no patch."""
    forge_only(host)
    from backend.modules.k_model import KModel
    from lib_ipadapter import core

    write_lora(host)
    forwards, patch_calls = [], []
    apply_model, patch_call = KModel.apply_model, core.CrossAttentionPatch.__call__

    def spy(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):  # noqa: B006
        patched = bool(transformer_options.get("patches_replace", {}).get("attn2"))
        forwards.append((self, patched, t.clone()))
        return apply_model(self, x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    def spy_patch(self, n, k, v, extra):
        patch_calls.append((extra["sigmas"].clone(), list(extra["cond_or_uncond"])))
        return patch_call(self, n, k, v, extra)

    monkeypatch.setattr(KModel, "apply_model", spy)
    monkeypatch.setattr(core.CrossAttentionPatch, "__call__", spy_patch)
    generate(host, [adapted().replace(source="sd15_b")], cfg_scale=5.0)
    target = host.shared.sd_model.forge_objects.unet.model
    source = next(iter(host.generation.CACHE.entries.values()))
    assert not any(patched for model, patched, _ in forwards if model is target)
    on_source = [(patched, t) for model, patched, t in forwards if model is source.unet.model]
    with_patch = [t for patched, t in on_source if patched]
    assert len(with_patch) == len(on_source) - len(with_patch) > 0
    assert len(patch_calls) == len(with_patch)
    for t, (sigmas, chunks) in zip(with_patch, patch_calls, strict=True):
        assert torch.equal(sigmas, t[: len(sigmas)]) and set(chunks) <= {0, 1}
    assert {tuple(chunks) for _, chunks in patch_calls} == {(0, 1)}, patch_calls


def test_after_the_run_nothing_of_it_is_left_on_the_target_the_host_or_the_gpu(host):
    forge_only(host)
    from backend import memory_management
    from lib_ipadapter import IPAdapterPlus
    from modules_forge.shared import supported_preprocessors

    write_lora(host)
    target_unet = host.shared.sd_model.forge_objects.unet
    class_state = dict(vars(IPAdapterPlus.IPAdapterApply))
    generate(host, [adapted()])
    assert host.shared.sd_model.forge_objects.unet is target_unet
    assert "patches_replace" not in target_unet.model_options["transformer_options"]
    source = next(iter(host.generation.CACHE.entries.values()))
    assert "patches_replace" not in source.unet.model_options["transformer_options"]  # the plain base patcher
    assert dict(vars(IPAdapterPlus.IPAdapterApply)) == class_state
    encoder = supported_preprocessors["CLIP-ViT-H (IPAdapter)"].clipvision
    assert encoder is not None and not any(m.model is encoder.patcher for m in memory_management.current_loaded_models)
    generate(host, [adapted()])
    assert supported_preprocessors["CLIP-ViT-H (IPAdapter)"].loads == 1  # the host's encoder cache, shared


def test_the_image_tokens_keep_no_autograd_graph(host, monkeypatch):
    """Script.process runs outside the host's inference mode: DS encodes the image without autograd, or
    every generation would keep the encoder's activations alive (seen as RAM growth in a real Forge)."""
    forge_only(host)
    from lib_ipadapter import core

    write_lora(host)
    made = []
    real_init = core.CrossAttentionPatch.__init__
    monkeypatch.setattr(core.CrossAttentionPatch, "__init__", lambda self, **kw: made.append(kw) or real_init(self, **kw))
    generate(host, [adapted()])
    assert made and not any(kw["cond"].requires_grad or kw["uncond"].requires_grad for kw in made)


def test_an_encoder_that_cannot_load_is_a_clear_error_naming_its_folder(host, monkeypatch):
    write_lora(host)
    offline = OSError("<urlopen error [Errno -2] Name or service not known>")
    if host.kind == "a1111":
        from scripts.preprocessor.legacy import processor

        monkeypatch.setattr(processor, "ClipVisionDetector", lambda *a: (_ for _ in ()).throw(offline))
        folder = "(clip_h.pth, kept in its annotator/downloads/clip_vision folder)"
    else:
        from modules_forge.shared import preprocessor_dir, supported_preprocessors

        encoder = supported_preprocessors["CLIP-ViT-H (IPAdapter)"]
        monkeypatch.setattr(encoder, "load_clipvision", lambda: (_ for _ in ()).throw(offline))
        folder = f"(CLIP-ViT-H-14.safetensors, kept in {preprocessor_dir})"
    with pytest.raises(Exception, match="image encoder could not be loaded .*: OSError: <urlopen error") as e:
        generate(host, [adapted()])
    assert folder in str(e.value)


def test_loading_and_encoding_leave_the_global_random_state_as_it_was(host, monkeypatch):
    """The hosts build IP-Adapter, ControlNet and encoder modules with random init; what the WebUI draws
    afterwards (img2img noise) must not depend on whether DS loaded something this time."""
    from delta_hosts import a1111_control, generation

    write_lora(host)
    seen = {}

    def around(module, name, label):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            before = torch.get_rng_state()
            result = real(*args, **kwargs)
            seen[label] = torch.equal(before, torch.get_rng_state())
            return result

        monkeypatch.setattr(module, name, spy)

    around(generation, "_attach_controls", "inside")
    around(generation, "attach_controls", "outside")
    marks = []  # the random state before the sources load (first `naming`) and after (`attach_loras`)
    for name in ("naming", "attach_loras"):
        real_fn = getattr(generation, name)
        monkeypatch.setattr(generation, name, lambda *a, _real=real_fn, **k: marks.append(torch.get_rng_state())
                            or _real(*a, **k))
    if host.kind == "a1111":
        around(a1111_control, "_encode", "encoder inside")
        around(a1111_control.A1111Control, "_hook_ipadapter", "encoder outside")
    generate(host, [controlled().replace(ipadapter_model=IP_FILE, ipadapter_image=picture(9))])
    assert seen["inside"] is False and seen["outside"] is True  # the loaders drew; DS put the state back
    assert torch.equal(marks[0], marks[-1])  # the source's first load (random init) left no trace
    if host.kind == "a1111":
        assert seen["encoder inside"] is False and seen["encoder outside"] is True


def test_the_img2img_input_is_the_reference_when_the_panel_has_none(host):
    from PIL import Image

    write_lora(host)
    with pytest.raises(Exception, match="DS IP-Adapter needs a reference image"):
        generate(host, [adapted().replace(ipadapter_image=None)])
    from_panel, _, _ = generate(host, [adapted(picture(7))])
    from_init, _, _ = generate(host, [adapted().replace(ipadapter_image=None)], init_images=[Image.fromarray(picture(7))])
    assert torch.equal(from_panel, from_init)


def test_an_ip_adapter_and_a_controlnet_act_together_on_one_adapted_branch(host):
    write_lora(host)
    ip, _, _ = generate(host, [adapted()])
    cn, _, _ = generate(host, [controlled()])
    both, _, processed = generate(host, [controlled().replace(ipadapter_model=IP_FILE, ipadapter_image=picture(5))])
    assert (both - ip).abs().mean() > 1e-5 and (both - cn).abs().mean() > 1e-5
    assert "cn=control_sd15_canny; ip=ip-adapter_tiny" in processed.infotexts[0]["Delta Sampling"]


def test_a_nested_bin_file_reads_as_its_safetensors(host):
    write_lora(host)
    flat = ipadapter_state_dict()
    nested = {part: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    torch.save(nested, str(host.folder / "ip-adapter_nested.bin"))
    from_st, _, _ = generate(host, [adapted()])
    from_bin, _, _ = generate(host, [adapted(ipadapter_model="ip-adapter_nested")])
    assert torch.equal(from_st, from_bin)


@pytest.mark.parametrize(("weights", "message"), [
    ({"ip_adapter.1.to_k_ip.weight": torch.zeros(16, 12)}, "is not an IP-Adapter"),
    ({**ipadapter_state_dict(), "ip_adapter.0.to_q_lora.down.weight": torch.zeros(4, 16)}, "FaceID IP-Adapter"),
    (ipadapter_state_dict(context=20), r"takes width 12"),
    (ipadapter_state_dict(embed_dim=999), "image features of width 999"),
])
def test_a_wrong_ip_adapter_file_is_a_clear_error(host, weights, message):
    write_lora(host)
    safetensors.torch.save_file(weights, str(host.folder / "ip-adapter_bad.safetensors"))
    with pytest.raises(Exception, match=message):
        generate(host, [adapted(ipadapter_model="ip-adapter_bad")])
    with pytest.raises(Exception, match="IP-Adapter 'ip-adapter_gone' was not found"):
        generate(host, [adapted(ipadapter_model="ip-adapter_gone")])


def test_without_the_built_in_ip_adapter_the_message_says_so(host, monkeypatch):
    import sys

    forge_only(host)
    from modules_forge.shared import supported_preprocessors

    write_lora(host)
    monkeypatch.setitem(sys.modules, "lib_ipadapter.IPAdapterPlus", None)
    with pytest.raises(Exception, match="built-in IP-Adapter extension"):
        generate(host, [adapted()])
    monkeypatch.delitem(sys.modules, "lib_ipadapter.IPAdapterPlus")
    monkeypatch.delitem(supported_preprocessors, "CLIP-ViT-H (IPAdapter)")
    with pytest.raises(Exception, match="built-in IP-Adapter extension"):
        generate(host, [adapted()])


def a1111_only(host) -> None:
    if host.kind != "a1111":
        pytest.skip("sd-webui-controlnet's IP-Adapter on A1111")


def test_on_a1111_the_hacks_run_only_in_adapted_forwards_with_their_rows_marked(host, monkeypatch):
    """sd-webui-controlnet's attention hacks run only inside the adapted branch's forwards, each reading
    that forward's cond marks (negative-prompt rows 0), also with the ControlNet hook; afterwards its
    globals hold the user's own IP-Adapter again and the source's modules carry nothing."""
    a1111_only(host)
    from scripts.ipadapter import plugable_ipadapter as ip_globals

    from delta_hosts import generation

    write_lora(host)
    target = host.shared.sd_model.model.diffusion_model
    user_unit = ip_globals.PlugableIPAdapter(ip_globals.IPAdapterModel.load(
        {"image_proj": {k[11:]: v for k, v in ipadapter_state_dict(3).items() if k.startswith("image_proj.")},
         "ip_adapter": {k[11:]: v for k, v in ipadapter_state_dict(3).items() if k.startswith("ip_adapter.")}}, "user"))
    user_unit.hook(model=target, preprocessor_outputs={"image_embeds": torch.ones(1, 1024)}, weight=0.0, start=0.0,
                   end=1.0, latent_width=8, latent_height=8, effective_region_mask=None)
    before = (ip_globals.current_model, dict(ip_globals.all_hacks))
    marks = []
    real_eval = ip_globals.ImageEmbed.eval
    monkeypatch.setattr(ip_globals.ImageEmbed, "eval", lambda self, mark: marks.append(mark.flatten().tolist())
                        or real_eval(self, mark))
    for settings in (adapted(), controlled().replace(ipadapter_model=IP_FILE, ipadapter_image=picture(5))):
        marks.clear()
        generate(host, [settings], cfg_scale=5.0)
        assert marks and all(m == [1.0, 0.0] for m in marks), marks  # one image: its cond row, its uncond row
        assert (ip_globals.current_model, ip_globals.all_hacks) == before
        source = next(iter(generation.CACHE.entries.values()))
        for module in source.model.model.diffusion_model.modules():
            assert "forward" not in module.__dict__ and "ipadapter_hacks" not in module.__dict__
            assert "cond_mark" not in module.__dict__


def test_on_a1111_the_encoder_the_extension_had_not_loaded_is_unloaded_again(host):
    a1111_only(host)
    from scripts.preprocessor.legacy import processor

    write_lora(host)
    generate(host, [adapted()])
    assert processor.clip_encoder["clip_h"] is None and processor.loads == ["clip_h"]
    generate(host, [adapted()])  # the same reference: encoded once per image, not loaded again
    assert processor.loads == ["clip_h"]
    processor.clip(picture(1), config="clip_h")  # the user's own IP-Adapter loaded it: it stays
    generate(host, [adapted(picture(6))])
    assert processor.clip_encoder["clip_h"] is not None and processor.loads == ["clip_h", "clip_h"]
    processor.unload_clip("clip_h")
    generate(host, [adapted(picture(8))])  # a new image loads it again, and unloads it
    assert processor.clip_encoder["clip_h"] is None and processor.loads == ["clip_h"] * 3


def test_on_a1111_without_sd_webui_controlnet_the_message_says_what_to_install(webui):
    from modules import paths

    paths.models_path = str(webui.tmp / "models")
    folder = webui.tmp / "models" / "ControlNet"
    folder.mkdir(parents=True)
    safetensors.torch.save_file(ipadapter_state_dict(), str(folder / f"{IP_FILE}.safetensors"))
    write_lora(webui)
    with pytest.raises(Exception, match="needs the sd-webui-controlnet extension"):
        generate(webui, [adapted()])


def test_the_real_sd15_layout_reads_as_a_vit_h_ip_adapter_for_an_sd15_unet():
    from delta_hosts import control

    parts = control.ipadapter_parts(sd15_ipadapter(), "ip-adapter_sd15")
    assert len(parts["ip_adapter"]) == 32 and set(parts["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight",
                                                                            "norm.bias"}
    assert control.image_encoder(parts, "ip-adapter_sd15") == "H"
    unet = torch.nn.Module()
    unet.attn2 = torch.nn.Module()
    unet.attn2.to_k = torch.nn.Linear(768, 320, bias=False)
    control.check_ipadapter(parts, unet, "ip-adapter_sd15", "sd15")
    unet.attn2.to_k = torch.nn.Linear(2048, 320, bias=False)
    with pytest.raises(DeltaError, match="made for SD1.5 .prompt width 768.*takes width 2048"):
        control.check_ipadapter(parts, unet, "ip-adapter_sd15", "sdxl")
