"""Load one of the A1111 fakes (tests/fake_webui/modules) that a Forge overlay file builds on."""

import importlib.util
from pathlib import Path

A1111_FAKES = Path(__file__).parents[2] / "fake_webui" / "modules"


def load(name):
    spec = importlib.util.spec_from_file_location(f"modules._a1111_{name}", A1111_FAKES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
