"""Load one of the A1111 fakes (tests/fake_webui/modules), or of the Forge overlays (for Neo), that an
overlay file builds on."""

import importlib.util
from pathlib import Path

A1111_FAKES = Path(__file__).parents[2] / "fake_webui" / "modules"
FORGE_FAKES = Path(__file__).parent


def load(name, fakes=A1111_FAKES):
    spec = importlib.util.spec_from_file_location(f"modules._{fakes.parent.name}_{name}", fakes / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
