"""Optional tier: a real WebUI, driven through its HTTP API. Skipped unless WEBUI_DIR is set.

Set-up: link this repo into `$WEBUI_DIR/extensions/` and have at least one checkpoint in its models
folder. Variables: WEBUI_DIR (required), WEBUI_PYTHON (default: $WEBUI_DIR/venv/bin/python, else this
Python), WEBUI_ARGS (extra launch flags; default: the CPU flags below), WEBUI_URL (use a server that is
already running instead of starting one), DS_SOURCE (source checkpoint title; default: the first one),
DS_LORA (a LoRA made for the source; default: the first one), DS_WRONG_LORA (one made for another architecture).
Forge on CPU needs WEBUI_ARGS="--always-cpu --skip-prepare-environment --skip-torch-cuda-test --clip-in-fp32
--nowebui --api --server-name 127.0.0.1". Forge Neo on CPU: WEBUI_ARGS="--cpu --fp32-unet --fp32-vae
--fp32-text-enc --skip-prepare-environment --skip-torch-cuda-test --skip-python-version-check
--skip-version-check --api --nowebui --server-name 127.0.0.1".
The weight-file tests write (and then delete) files named ds_tier_* in the WebUI's models folders.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

WEBUI_DIR = os.environ.get("WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set: real-WebUI tier skipped")
ROOT = Path(__file__).resolve().parents[1]
CPU_ARGS = ("--skip-prepare-environment --skip-torch-cuda-test --use-cpu all --no-half --precision full "
            "--nowebui --api --server-name 127.0.0.1")


def call(url: str, path: str, payload: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server():
    if os.environ.get("WEBUI_URL"):
        yield os.environ["WEBUI_URL"].rstrip("/")
        return
    webui = Path(WEBUI_DIR)
    linked = [p for p in (webui / "extensions").glob("*") if (p / "scripts" / "delta_sampling.py").exists()]
    if not any(p.resolve() == ROOT for p in linked):
        pytest.skip(f"link {ROOT} into {webui / 'extensions'} first")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    python = os.environ.get("WEBUI_PYTHON") or str(webui / "venv" / "bin" / "python")
    python = python if Path(python).exists() else sys.executable
    args = os.environ.get("WEBUI_ARGS", CPU_ARGS).split() + ["--port", str(port)]
    log = open(webui / "ds_test_server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([python, "launch.py", *args], cwd=webui, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"WebUI exited with {proc.returncode}; see {log.name}")
            try:
                if call(url, "/sdapi/v1/sd-models", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(3)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def txt2img(url: str, ds_args: list | None = None, **kw) -> tuple[int, dict]:
    payload = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
               "seed": 1234, "sampler_name": "Euler", "cfg_scale": 6, **kw}
    if ds_args is not None:
        payload["alwayson_scripts"] = {"delta sampling": {"args": ds_args}}
    return call(url, "/sdapi/v1/txt2img", payload)


def pixels(response: dict) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(response["images"][0]))).convert("RGB").tobytes()


def source_title(url: str) -> str:
    return os.environ.get("DS_SOURCE") or call(url, "/sdapi/v1/sd-models")[1][0]["title"]


def prompt_args(url: str, lam: float, adapted: str = "a photo of a cat, oil painting") -> list:
    return [True, source_title(url), "prompt", "", 1.0, lam, "constant", 0.0, 1.0, "", adapted, "", 0]


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_lambda_zero_matches_ds_off_and_lambda_changes_the_image(server, sampler):
    status, off = txt2img(server, sampler_name=sampler)
    assert status == 200, off
    status, zero = txt2img(server, prompt_args(server, 0.0), sampler_name=sampler)
    assert status == 200, zero
    assert pixels(zero) == pixels(off)
    status, on = txt2img(server, prompt_args(server, 3.0), sampler_name=sampler)
    assert status == 200, on
    assert pixels(on) != pixels(off)
    info = json.loads(on["info"])["infotexts"][0]
    assert "Delta Sampling: " in info and "DS lambda: 3" in info


def error_text(body: dict) -> str:
    return body.get("errors") or body.get("message") or ""  # A1111 says "errors", Forge "message"


def require_api_infotext(server: str) -> None:
    plain = json.loads(txt2img(server)[1]["info"])["infotexts"][0]
    status, body = txt2img(server, None, infotext=plain)
    if status != 200:  # Forge dfdcbab: "isinstance() argument 2 cannot be a parameterized generic"
        pytest.skip(f"this WebUI's API cannot apply any infotext, with or without DS: {error_text(body)}")


def test_infotext_restores_settings_through_the_api(server):
    require_api_infotext(server)
    status, on = txt2img(server, prompt_args(server, 2.5))
    info = json.loads(on["info"])["infotexts"][0]
    status, again = txt2img(server, None, infotext=info)
    assert status == 200, again
    assert "DS lambda: 2.5" in json.loads(again["info"])["infotexts"][0]
    assert pixels(again) == pixels(on)


@pytest.mark.parametrize(
    ("args_change", "message"),
    [({5: float("nan")}, "lambda"), ({1: "no_such_model"}, "not found"), ({2: "lora", 3: "no_such_lora"}, "not found")],
)
def test_bad_input_is_an_api_error_and_the_next_request_works(server, args_change, message):
    args = prompt_args(server, 1.0)
    for index, value in args_change.items():
        args[index] = value
    status, body = txt2img(server, args)
    assert status == 500 and body.get("error") == "DeltaError" and message in error_text(body), body
    assert txt2img(server, prompt_args(server, 1.0))[0] == 200


def test_malformed_infotext_is_an_api_error(server):
    require_api_infotext(server)
    status, body = txt2img(server, None, infotext='a cat\nSteps: 4, Sampler: Euler, Delta Sampling: "{bad"')
    assert status == 500 and "Malformed" in json.dumps(body)


def lora_name(server: str) -> str:
    """DS_LORA, else the first LoRA listed that is not one of this tier's own test files."""
    if os.environ.get("DS_LORA"):
        return os.environ["DS_LORA"]
    loras = [entry["name"] for entry in call(server, "/sdapi/v1/loras")[1] if not entry["name"].startswith("ds_tier_")]
    if not loras:
        pytest.skip("no LoRA in the WebUI's Lora folder")
    return loras[0]


def test_lora_adapter_runs_when_a_lora_is_installed(server):
    """Set DS_LORA to a LoRA made for the source (default: the first LoRA listed)."""
    name = lora_name(server)
    args = [True, source_title(server), "lora", name, 1.0, 2.0, "cosine", 0.0, 1.0, "", "", "", 0]
    status, body = txt2img(server, args)
    assert status == 200, error_text(body)
    assert f"DS adapter: {name}" in json.loads(body["info"])["infotexts"][0]


def mean_abs_diff(a: dict, b: dict) -> float:
    pa, pb = pixels(a), pixels(b)
    return sum(abs(x - y) for x, y in zip(pa, pb, strict=True)) / len(pa)


def test_source_equals_target_lora_at_lambda_one_matches_the_prompt_lora(server):
    name = lora_name(server)
    model = call(server, "/sdapi/v1/options")[1]["sd_model_checkpoint"]
    args = [True, model, "lora", name, 1.0, 1.0, "constant", 0.0, 1.0, "", "", "", 0]
    status, ds_image = txt2img(server, args)
    if status == 500 and "keys matched" in error_text(ds_image):
        pytest.skip(f"{name} does not fit the active checkpoint")
    status, native = txt2img(server, prompt=f"a photo of a cat <lora:{name}:1>")
    assert status == 200, native
    status, plain = txt2img(server)
    assert mean_abs_diff(ds_image, native) < 0.5 < mean_abs_diff(plain, native)


def test_hires_fix_runs_with_ds(server):
    modes = call(server, "/sdapi/v1/latent-upscale-modes")[1]  # Neo has none: its plain resize is "None"
    upscaler = "Latent" if any(m["name"] == "Latent" for m in modes) else "None"
    extra = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": upscaler, "hr_second_pass_steps": 2,
             "denoising_strength": 0.5, "hr_additional_modules": ["Use same choices"]}  # Forge needs the last key
    status, off = txt2img(server, **extra)
    assert status == 200, off
    status, zero = txt2img(server, prompt_args(server, 0.0), **extra)
    assert status == 200 and pixels(zero) == pixels(off), zero
    status, on = txt2img(server, prompt_args(server, 2.0), **extra)
    assert status == 200 and pixels(on) != pixels(off), on


# -- files chosen in the panel never run code and are never changed (issue 13) -------------------------
class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def placed(server: str, folder: str, name: str, content: bytes):
    """Write a file into the WebUI's models folder and refresh the host's lists; returns its path."""
    path = Path(WEBUI_DIR) / "models" / folder / name
    path.write_bytes(content)
    refresh(server, folder)
    return path


def removed(server: str, path: Path) -> None:
    """Delete a placed file and refresh the host's lists, so no later test picks a file that is gone."""
    path.unlink(missing_ok=True)
    refresh(server, path.parent.name)


def refresh(server: str, folder: str) -> None:
    call(server, "/sdapi/v1/refresh-checkpoints" if folder == "Stable-diffusion" else "/sdapi/v1/refresh-loras", {})


def checkpoint_title(server: str, filename: str) -> str:
    return next(m["title"] for m in call(server, "/sdapi/v1/sd-models")[1] if m["filename"].endswith(filename))


ROLE_ARGS = {  # role -> (models folder, DS args for a file registered as `name`, words in the message)
    "source": ("Stable-diffusion", lambda url, name: [True, name, "prompt", "", 1.0, 1.0, "constant", 0.0, 1.0,
                                                      "", "a cat, oil painting", "", 0], "source checkpoint"),
    "adapter checkpoint": ("Stable-diffusion", lambda url, name: [True, source_title(url), "checkpoint", name, 1.0,
                                                                  1.0, "constant", 0.0, 1.0, "", "", "", 0],
                           "adapter checkpoint"),
    "lora": ("Lora", lambda url, name: [True, source_title(url), "lora", name, 1.0, 1.0, "constant", 0.0, 1.0, "",
                                        "", "", 0], "LoRA"),
}


def malicious_pickle(marker: str) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("role", ROLE_ARGS)
def test_a_malicious_pickle_never_runs_in_any_role(server, role, tmp_path):
    folder, args, words = ROLE_ARGS[role]
    marker = tmp_path / "code_ran"
    name = f"ds_tier_evil_{role.replace(' ', '_')}"
    path = placed(server, folder, f"{name}.ckpt", malicious_pickle(str(marker)))
    try:
        title = checkpoint_title(server, path.name) if folder == "Stable-diffusion" else name
        status, body = txt2img(server, args(server, title))
        assert status == 500 and body.get("error") == "DeltaError", body
        assert f"refused to read the {words} '{path.name}'" in error_text(body), body
        assert not marker.exists()
    finally:
        removed(server, path)
    assert txt2img(server, prompt_args(server, 1.0))[0] == 200


@pytest.mark.parametrize("role", ROLE_ARGS)
def test_a_truncated_safetensors_is_refused_and_left_as_it_is(server, role):
    folder, args, words = ROLE_ARGS[role]
    models = Path(WEBUI_DIR) / "models"
    good = min((models / folder).glob("*.safetensors"), key=lambda f: f.stat().st_size).read_bytes()
    name = f"ds_tier_trunc_{role.replace(' ', '_')}"
    path = placed(server, folder, f"{name}.safetensors", good[: len(good) * 2 // 3])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        title = checkpoint_title(server, path.name) if folder == "Stable-diffusion" else name
        status, body = txt2img(server, args(server, title))
        assert status == 500 and f"the {words} '{path.name}' is corrupt" in error_text(body), body
        assert path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == digest
        assert not Path(f"{path}.corrupted").exists()
    finally:
        removed(server, path)


def test_a_lora_for_another_architecture_is_refused_with_counts(server):
    """Set DS_WRONG_LORA to a LoRA whose key names partly exist on the source with other shapes."""
    name = os.environ.get("DS_WRONG_LORA")
    if not name:
        pytest.skip("DS_WRONG_LORA is not set")
    status, body = txt2img(server, ROLE_ARGS["lora"][1](server, name))
    assert status == 500 and "keys matched" in error_text(body) and "unmatched" in error_text(body), body


# -- units, and a ControlNet / IP-Adapter on the source (issue 10) ------------------------------------
def unit(url: str, **fields) -> dict:
    """One DS unit in the API's dict form: a LoRA adapter on the source."""
    return {"source": source_title(url), "adapter_kind": "lora", "adapter": lora_name(url), **fields}


def max_abs_diff(a: dict, b: dict) -> int:
    return max(abs(x - y) for x, y in zip(pixels(a), pixels(b), strict=True))


def picture_png(seed: int) -> str:
    """A 64x64 PNG of random rectangles (edges for canny), base64."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    image = np.zeros((64, 64, 3), np.uint8)
    for _ in range(4):
        x0, y0 = g.integers(0, 48, 2)
        image[y0 : y0 + 16, x0 : x0 + 16] = g.integers(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_two_units_add_their_lambdas(server):
    status, one = txt2img(server, [unit(server, strength=2.0)])
    assert status == 200, error_text(one)
    status, two = txt2img(server, [unit(server, strength=0.8), unit(server, strength=1.2)])
    assert status == 200, error_text(two)
    assert max_abs_diff(one, two) <= 2  # the same sum, up to rounding


def source_unet(url: str) -> dict:
    import safetensors.torch

    info = next(m for m in call(url, "/sdapi/v1/sd-models")[1] if m["title"] == source_title(url))
    if not info["filename"].endswith(".safetensors"):
        pytest.skip("the source is not a safetensors file")
    weights = safetensors.torch.load_file(info["filename"])
    if "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in weights or \
            weights["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape[0] != 320:
        pytest.skip("the source is not an SD1.5 checkpoint")
    return {k: v for k, v in weights.items() if k.startswith("model.diffusion_model.")}


def control_file(url: str, name: str, make) -> Path:
    """A random-weight file in the WebUI's models/ControlNet (deleted by the caller)."""
    import safetensors.torch

    folder = Path(WEBUI_DIR) / "models" / "ControlNet"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file(make(), str(path))
    return path


def skip_without_host_support(body: dict) -> None:
    text = error_text(body)
    if "sd-webui-controlnet" in text or "not supported yet" in text or "image encoder" in text:
        pytest.skip(text)


def test_a_controlnet_on_the_source_acts_and_at_weight_zero_is_none(server):
    from webui_models import sd15_controlnet

    unet = source_unet(server)
    path = control_file(server, "ds_tier_controlnet", lambda: sd15_controlnet(unet))
    try:
        base = unit(server, strength=1.5)
        control = {**base, "control_model": "ds_tier_controlnet", "control_image": picture_png(1)}
        status, without = txt2img(server, [base])
        assert status == 200, error_text(without)
        status, zero = txt2img(server, [{**control, "control_weight": 0.0}])
        skip_without_host_support(zero)
        assert status == 200 and pixels(zero) == pixels(without), error_text(zero)
        status, one = txt2img(server, [control])
        assert status == 200 and pixels(one) != pixels(without), error_text(one)
        info = json.loads(one["info"])["infotexts"][0]
        assert "cn=ds_tier_controlnet" in info and "iVBOR" not in info  # the image is not in the infotext
    finally:
        path.unlink(missing_ok=True)


def test_an_ip_adapter_on_the_source_acts_and_at_weight_zero_is_none(server):
    """Needs the host's CLIP ViT-H image encoder file (Forge: models/ControlNetPreprocessor/
    CLIP-ViT-H-14.safetensors; A1111 + sd-webui-controlnet: its annotator/downloads/clip_vision/clip_h.pth);
    skipped without."""
    from webui_models import sd15_ipadapter

    models = Path(WEBUI_DIR) / "models"
    annotator = Path(WEBUI_DIR) / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
    if not any(f.exists() for f in (models / "ControlNetPreprocessor" / "CLIP-ViT-H-14.safetensors",
                                    annotator / "clip_vision" / "clip_h.pth")):
        pytest.skip("no CLIP ViT-H image encoder file (the host would download one)")
    source_unet(server)
    path = control_file(server, "ds_tier_ip-adapter", sd15_ipadapter)
    try:
        base = unit(server, strength=1.5)
        adapted = {**base, "ipadapter_model": "ds_tier_ip-adapter", "ipadapter_image": picture_png(2)}
        status, without = txt2img(server, [base])
        assert status == 200, error_text(without)
        status, one = txt2img(server, [adapted])
        skip_without_host_support(one)
        assert status == 200 and pixels(one) != pixels(without), error_text(one)
        assert "ip=ds_tier_ip-adapter" in json.loads(one["info"])["infotexts"][0]
        status, zero = txt2img(server, [{**adapted, "ipadapter_weight": 0.0}])
        assert status == 200 and pixels(zero) == pixels(without), error_text(zero)
    finally:
        path.unlink(missing_ok=True)
