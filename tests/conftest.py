import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAKE_WEBUI = ROOT / "tests" / "fake_webui"
FAKE_FORGE = ROOT / "tests" / "fake_forge"
FAKE_LDM_PATCHED = ROOT / "tests" / "fake_ldm_patched"
FAKE_NEO = ROOT / "tests" / "fake_neo"
NEO_OVERLAYS = ("backend", "backend.patcher", "backend.sampling", "backend.diffusion_engine", "lib_ipadapter")
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

torch.set_num_threads(1)  # tiny models: thread start-up dominates on small CPUs

HOST_MODULES = ("modules", "delta_hosts", "gradio", "networks", "delta_sampling.py", "backend", "ldm_patched",
                "modules_forge", "lib_ipadapter", "forge_ipadapter")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_MODULES:
            del sys.modules[name]


def _write_checkpoints(tmp_path, sd_models):
    import safetensors.torch
    from tinyldm import TinyLDM

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    checkpoints = {}
    for name, seed in (("sd15_a", 1), ("sd15_b", 2)):
        path = models_dir / f"{name}.safetensors"
        safetensors.torch.save_file(TinyLDM(seed=seed).state_dict(), str(path))
        checkpoints[name] = sd_models.CheckpointInfo(str(path), f"{seed:010d}").register()
    return checkpoints


def _load_script():
    spec = importlib.util.spec_from_file_location("delta_sampling.py", ROOT / "scripts" / "delta_sampling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["delta_sampling.py"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """The extension loaded into fake A1111 modules, with tiny random-weight checkpoints on disk."""
    from tinyldm import TinyLDM

    _purge()
    sys.path.insert(0, str(FAKE_WEBUI))
    try:
        import networks
        from modules import processing, script_callbacks, scripts, sd_models, shared

        shared.sd_model = TinyLDM(seed=1).eval().requires_grad_(False)
        shared.state.interrupted = False
        checkpoints = _write_checkpoints(tmp_path, sd_models)
        shared.sd_model.sd_checkpoint_info = checkpoints["sd15_a"]
        module = _load_script()
        from delta_hosts import a1111, a1111_models

        loads: list[str] = []

        def load_tiny_source(info, role="source checkpoint"):
            loads.append(info.title)
            model = TinyLDM()
            model.load_state_dict(a1111_models.read_weights(info.filename, role))
            model.eval().requires_grad_(False)
            return a1111_models.SourceModel(info.title, model, a1111_models._denoiser(model),
                                            a1111_models.target_format(model))

        real_load_source = a1111_models.load_source
        monkeypatch.setattr(a1111_models, "load_source", load_tiny_source)
        a1111.CACHE.clear()
        yield SimpleNamespace(
            script=module.DeltaSamplingScript(), module=module, a1111=a1111, models=a1111_models, shared=shared,
            processing=processing, callbacks=script_callbacks, scripts=scripts, sd_models=sd_models,
            networks=networks, checkpoints=checkpoints, loads=loads, tmp=tmp_path, real_load_source=real_load_source,
        )
    finally:
        sys.path.remove(str(FAKE_WEBUI))
        _purge()


def _forge_host(tmp_path, fakes, host, overlay=None):
    """Fakes first on sys.path; `overlay` (Neo) goes in front of Forge's fake packages, file by file."""
    sys.path[:0] = [str(p) for p in fakes]
    import modules

    modules.__path__.insert(0, str(FAKE_FORGE / "modules"))
    if overlay is not None:
        modules.__path__.insert(0, str(overlay / "modules"))
        for package in NEO_OVERLAYS:
            importlib.import_module(package).__path__.insert(0, str(overlay / package.replace(".", "/")))
    import modules_forge

    import delta_hosts

    modules_forge.__path__.append(str(FAKE_FORGE / "modules_forge"))
    from modules_forge import patch_basic

    patch_basic.patch_all_basics()  # Forge wraps torch.load and safetensors' load_file at start-up
    import forge_ipadapter  # noqa: F401  the built-in IP-Adapter extension registers its CLIP encoders
    delta_hosts.HOST = host  # both fake hosts are importable here; detection is tested on its own
    from modules import sd_models, shared

    shared.state.interrupted = False
    return _write_checkpoints(tmp_path, sd_models)


def _backend_host(tmp_path, overlay=None):
    """The extension loaded into a fake `backend/` Forge: Forge's fakes, or Neo's overlaid on them."""
    _purge()
    try:
        checkpoints = _forge_host(tmp_path, (FAKE_FORGE, FAKE_WEBUI), "forge", overlay=overlay)
        import networks
        from backend import loader, memory_management, utils
        from modules import processing, script_callbacks, sd_models, shared

        if overlay is not None:
            shared.opts.data.pop("use_old_scheduling")  # Neo dropped this option
        shared.sd_model = loader.forge_loader(checkpoints["sd15_a"].filename)
        shared.sd_model.sd_checkpoint_info = checkpoints["sd15_a"]
        loader.loads.clear()
        module = _load_script()
        from delta_hosts import forge, forge_models, generation

        generation.CACHE.clear()
        yield SimpleNamespace(
            script=module.DeltaSamplingScript(), module=module, adapter=forge, models=forge_models,
            generation=generation, shared=shared, processing=processing, callbacks=script_callbacks,
            sd_models=sd_models, networks=networks, checkpoints=checkpoints, loader=loader,
            memory=memory_management, utils=utils, tmp=tmp_path,
        )
    finally:
        _unload((FAKE_FORGE, FAKE_WEBUI))


@pytest.fixture
def forge(tmp_path):
    """The extension loaded into fake new-Forge modules (tests/fake_forge over tests/fake_webui)."""
    yield from _backend_host(tmp_path)


@pytest.fixture
def neo(tmp_path):
    """The extension on fake Forge Neo 2.26 backend files (tests/fake_neo over the Forge and A1111 fakes)."""
    for host in _backend_host(tmp_path, overlay=FAKE_NEO):
        from backend.args import dynamic_args

        host.dynamic_args = dynamic_args
        yield host


@pytest.fixture
def ldm_patched(tmp_path):
    """The extension on fake reForge / Forge Classic APIs (tests/fake_ldm_patched over the Forge fakes)."""
    _purge()
    try:
        checkpoints = _forge_host(tmp_path, (FAKE_LDM_PATCHED, FAKE_FORGE, FAKE_WEBUI), "ldm_patched")
        import networks
        from backend import memory_management
        from modules import processing, script_callbacks, sd_models, shared
        from modules_forge import forge_loader

        from lib_delta.lora import read_safetensors

        info = checkpoints["sd15_a"]
        shared.sd_model = forge_loader.load_model_for_a1111(None, info, read_safetensors(info.filename))
        forge_loader.loads.clear()
        module = _load_script()
        from delta_hosts import forge, generation, ldm_patched_models

        generation.CACHE.clear()
        yield SimpleNamespace(
            script=module.DeltaSamplingScript(), module=module, adapter=forge, models=ldm_patched_models,
            generation=generation, shared=shared, processing=processing, callbacks=script_callbacks,
            sd_models=sd_models, networks=networks, checkpoints=checkpoints, loader=forge_loader,
            memory=memory_management, tmp=tmp_path,
        )
    finally:
        _unload((FAKE_LDM_PATCHED, FAKE_FORGE, FAKE_WEBUI))


def _unload(fakes) -> None:
    patch_basic = sys.modules.get("modules_forge.patch_basic")
    if patch_basic is not None:
        patch_basic.unpatch_all_basics()
    for path in fakes:
        sys.path.remove(str(path))
    _purge()


@pytest.fixture(autouse=True)
def plenty_of_ram(monkeypatch):
    """The machine's free RAM must not decide a test (DS releases sources when it is low): a psutil that
    reports half of it available; tests of the low-RAM rule set their own."""
    memory = SimpleNamespace(total=16 << 30, available=8 << 30)
    monkeypatch.setitem(sys.modules, "psutil", SimpleNamespace(virtual_memory=lambda: memory))
