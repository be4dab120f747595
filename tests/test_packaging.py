"""Repository promises: host-free core, tooltips from the spec, install.py's limits, metadata."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import json
import re
from pathlib import Path

from lib_delta.spec import FIELDS

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_is_host_free():
    for path in (ROOT / "lib_delta").rglob("*.py"):
        assert not imported_modules(path) & {"modules", "gradio", "networks", "backend", "ldm_patched"}, path


def test_tooltips_in_javascript_match_the_spec():
    js = (ROOT / "javascript" / "delta_sampling_hints.js").read_text()
    titles = json.loads(re.search(r"const deltaSamplingTitles = (\{.*?\});", js, re.S).group(1))
    assert titles == {f.label: f.tooltip for f in FIELDS}


def load_install():
    spec = importlib.util.spec_from_file_location("ds_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_py_installs_only_what_is_missing_and_never_host_packages():
    install = load_install()
    everything = install.missing(is_installed=lambda name: False)
    assert everything and all("==" in req for req in everything)
    assert not {r.split("==")[0] for r in everything} & set(install.NEVER_INSTALL)
    assert install.missing(is_installed=lambda name: True) == []


def test_metadata_ini_parses():
    config = configparser.ConfigParser()
    config.read(ROOT / "metadata.ini")
    assert config.get("Extension", "Name") == "sd-webui-delta-sampling"


def test_scripts_folder_holds_only_the_webui_script():
    assert sorted(p.name for p in (ROOT / "scripts").glob("*.py")) == ["delta_sampling.py"]


def test_readme_api_table_lists_every_field_with_its_range():
    from lib_delta.spec import FIELDS

    readme = (ROOT / "README.md").read_text()
    rows = {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+)$", readme, re.M)}
    for i, field in enumerate(FIELDS):
        assert field.label in rows[i], (i, field.label)
        if field.minimum is not None:
            assert f"[{field.minimum}, {field.maximum}]" in rows[i], field.label
        assert all(f"`{choice}`" in rows[i] for choice in field.choices), field.label
