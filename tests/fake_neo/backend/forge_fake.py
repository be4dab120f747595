"""Load one of the Forge fakes (tests/fake_forge/backend) that a Neo overlay file builds on."""

import importlib.util
from pathlib import Path

FORGE_FAKES = Path(__file__).parents[2] / "fake_forge" / "backend"


def load(relative):
    name = "backend._forge_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, FORGE_FAKES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
