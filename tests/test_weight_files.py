"""Files chosen in the panel never run code and are never changed: malicious pickles, corrupt safetensors
and LoRAs for another architecture, in every file role, on every host's fakes (and in lib_delta itself)."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from test_a1111_lifecycle import interrupt_at_call, write_lora
from test_a1111_sampling import ds, generate
from tinyldm import CTX, DIM

from lib_delta import weights
from lib_delta.weights import WeightFileError, read_weights

ROLES = {  # role -> (DS settings using a file registered under the name "bad", the role's words in messages)
    "source": (lambda: ds(source="bad"), "source checkpoint"),
    "adapter checkpoint": (lambda: ds(adapter_kind="checkpoint", adapter="bad"), "adapter checkpoint"),
    "lora": (lambda: ds(adapter_kind="lora", adapter="bad", adapted_prompt=""), "LoRA"),
}
HOSTS = ["webui", "forge", "ldm_patched", "neo"]


class RunsCode:
    """A pickle payload whose unpickling writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, str(path))


def write_truncated(path: Path, source: str) -> None:
    data = Path(source).read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def host(request):
    return request.getfixturevalue(request.param)


def register(host, role: str, path: Path) -> None:
    if role == "lora":
        host.networks.register("bad", str(path), shorthash="00000000000b")
    else:
        host.sd_models.CheckpointInfo(str(path), "000000000b").register()


def fails_before_sampling(host, settings, match: str) -> None:
    """The generation raises a DeltaError matching `match`, no model step ran, no image; the next works."""
    from lib_delta import DeltaError

    calls = interrupt_at_call(host, 10**9, host.callbacks.on_cfg_denoiser)
    with pytest.raises(DeltaError, match=match) as raised:
        generate(host, settings)
    assert calls == [] and type(raised.value) is DeltaError  # the API reports the class name
    ok, _, _ = generate(host, ds())
    assert torch.isfinite(ok).all()


# -- every host, every role ---------------------------------------------------------------------------
@pytest.mark.parametrize("host", HOSTS, indirect=True)
@pytest.mark.parametrize("role", ROLES)
def test_a_malicious_pickle_never_runs(host, role, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "bad.ckpt"
    write_malicious(path, marker)
    register(host, role, path)
    settings, words = ROLES[role]
    fails_before_sampling(host, settings(), rf"refused to read the {words} 'bad.ckpt'.*'posix.system'")
    assert not marker.exists()


@pytest.mark.parametrize("host", HOSTS, indirect=True)
@pytest.mark.parametrize("role", ROLES)
def test_a_truncated_safetensors_is_refused_and_left_unchanged(host, role, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_truncated(path, host.checkpoints["sd15_b"].filename if role != "lora" else write_lora(host))
    before = digest(path)
    register(host, role, path)
    settings, words = ROLES[role]
    fails_before_sampling(host, settings(), rf"the {words} 'bad.safetensors' is corrupt: it is truncated")
    assert path.exists() and digest(path) == before and not Path(f"{path}.corrupted").exists()


@pytest.mark.parametrize("host", HOSTS, indirect=True)
def test_a_lora_whose_names_match_but_shapes_do_not_is_refused_with_counts(host):
    """Some SDXL kohya names exist in SD1.5 too: the second key has the right name, twice the inputs."""
    write_lora(host, "bad", keys={"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v": (DIM, CTX),
                                  "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (DIM, 2 * CTX)})
    fails_before_sampling(host, ROLES["lora"][0](), r"3 of 6 keys matched, 3 unmatched")


@pytest.mark.parametrize("host", ["forge", "ldm_patched", "neo"], indirect=True)
def test_a_ckpt_source_gives_the_safetensors_image_and_the_host_never_reads_it(host, tmp_path):
    path = tmp_path / "models" / "pickled.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(host.checkpoints["sd15_a"].filename)}, str(path))
    host.sd_models.CheckpointInfo(str(path), "00000000cc").register()
    via_ckpt, _, _ = generate(host, ds(strength=1.0, source="pickled"))
    via_safetensors, _, _ = generate(host, ds(strength=1.0))
    assert torch.equal(via_ckpt, via_safetensors)
    assert str(path) not in getattr(getattr(host, "utils", None), "unsafe_loads", [])  # Forge's permissive read


def test_forge_hands_its_loader_tensors_not_the_file(forge, tmp_path):
    """Forge's own read renames files it fails on; with DS it never reads a source file at all."""
    reads = []
    original = forge.utils.load_torch_file
    forge.loader.load_torch_file = lambda ckpt, *a, **k: reads.append(ckpt) or original(ckpt, *a, **k)
    generate(forge, ds(source="sd15_b"))
    assert reads == []


# -- lib_delta.weights ----------------------------------------------------------------------------------
def write_lightning_ckpt(path: Path) -> None:
    """A PyTorch Lightning-style .ckpt: weights beside a callback object and numpy scalars."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(names[-1])

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = torch.tensor(0.5)
            self.monitor = "val/loss"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for n in names:
        sys.modules[n] = module if n == names[-1] else types.ModuleType(n)
    try:
        torch.save({"state_dict": {"w": torch.arange(3.0)}, "global_step": np.int64(470000),
                    "epoch": np.float64(6.0), "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": ModelCheckpoint()}}, str(path))
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)


def test_a_lightning_ckpt_reads_weights_only_without_importing_lightning(tmp_path):
    path = tmp_path / "sd-v1-4.ckpt"
    write_lightning_ckpt(path)
    assert "pytorch_lightning" not in sys.modules
    assert torch.equal(read_weights(str(path), "source checkpoint")["w"], torch.arange(3.0))
    assert "pytorch_lightning" not in sys.modules


def test_old_torch_falls_back_to_the_hosts_restricted_unpickler(webui, tmp_path, monkeypatch):
    """torch < 2.4 cannot allow placeholders: A1111's modules.safe allowlist reads the file instead."""
    from delta_hosts import files

    monkeypatch.delattr(torch.serialization, "safe_globals")
    lightning = tmp_path / "old.ckpt"
    write_lightning_ckpt(lightning)
    with pytest.raises(WeightFileError, match="needs PyTorch 2.4"):
        read_weights(str(lightning), "source checkpoint")
    package, callbacks = types.ModuleType("pytorch_lightning"), types.ModuleType("pytorch_lightning.callbacks")
    stub = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")  # A1111 installs Lightning
    package.callbacks, callbacks.model_checkpoint = callbacks, stub
    stub.ModelCheckpoint = type("ModelCheckpoint", (), {})
    for module in (package, callbacks, stub):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    assert torch.equal(files.read_weights(str(lightning), "source checkpoint")["w"], torch.arange(3.0))
    marker, evil = tmp_path / "code_ran", tmp_path / "evil.ckpt"
    torch.save({"global_step": np.int64(1), "payload": RunsCode(marker)}, str(evil))  # numpy first: fallback
    with pytest.raises(WeightFileError, match="refused to read the LoRA 'evil.ckpt'.*'posix/system'"):
        files.read_weights(str(evil), "LoRA")
    assert not marker.exists()


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "too few for a safetensors header"),
        (struct.pack("<Q", 10**6) + b"{}", "its header claims 1000000 bytes"),
        (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, bytes(12)),
         "12 bytes for a F32 of shape \\[4\\]"),
        (safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
         "truncated: its tensors need 16 bytes of data, the file holds 8"),
        (safetensors_bytes({"w": {"dtype": "NOPE", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
         "tensor 'w' has a malformed entry"),
    ],
)
def test_corrupt_safetensors_are_named_and_never_parsed(tmp_path, content, why):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match=rf"the adapter checkpoint 'broken.safetensors' is corrupt: .*{why}"):
        read_weights(str(path), "adapter checkpoint")
    assert path.read_bytes() == content


def test_valid_safetensors_and_pickles_read_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    safetensors.torch.save_file(tensors, str(tmp_path / "x.safetensors"))
    torch.save(tensors, str(tmp_path / "x.pt"))
    for name in ("x.safetensors", "x.pt"):
        out = read_weights(str(tmp_path / name), "LoRA")
        assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(WeightFileError, match="LoRA 'garbage.pt' is corrupt or not a PyTorch weight file"):
        read_weights(str(tmp_path / "garbage.pt"), "LoRA")
    with pytest.raises(WeightFileError, match="LoRA file is missing"):
        read_weights(str(tmp_path / "nope.safetensors"), "LoRA")


def test_hosts_wrapping_torch_load_do_not_matter(tmp_path, monkeypatch):
    """Forge replaces torch.load with a wrapper that hides weights_only; the reader never calls it."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("load_file was called"))
    marker, evil = tmp_path / "code_ran", tmp_path / "evil.pt"
    write_malicious(evil, marker)
    with pytest.raises(WeightFileError, match="refused"):
        read_weights(str(evil), "LoRA")
    safetensors.torch.save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(read_weights(str(tmp_path / "ok.safetensors"), "LoRA")["w"], torch.ones(2))
    assert not marker.exists() and weights.BENIGN_PICKLE_CLASSES


@pytest.mark.parametrize(("error", "outcome"), [
    ("Weights only load failed. Unsupported class posix.system", "refused to read the LoRA 'x.pt'.*'posix.system'"),
    ("Weights only load failed. Unsupported class numpy.core.multiarray.scalar", "needs PyTorch 2.4"),
])
def test_torch_before_2_4_wording_is_understood(tmp_path, monkeypatch, error, outcome):
    """torch 2.3 (Forge's pin) says 'Unsupported class x' and has no safe_globals."""
    import pickle

    def refuse(f, map_location=None, pickle_module=None, *, weights_only=None):
        raise pickle.UnpicklingError(error)

    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.setattr(torch.serialization, "load", refuse)
    (tmp_path / "x.pt").write_bytes(b"whatever")
    with pytest.raises(WeightFileError, match=outcome):
        read_weights(str(tmp_path / "x.pt"), "LoRA")
