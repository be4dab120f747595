"""Run by the WebUI (with its root on PYTHONPATH) on install and at start-up.

Installs only what the host lacks, pinned. The WebUI provides torch, torchvision, k-diffusion and
gradio; this file never installs or upgrades them.
"""

from __future__ import annotations

NEVER_INSTALL = ("torch", "torchvision", "k-diffusion", "k_diffusion", "gradio")
# (distribution name, pip requirement): only packages a WebUI may lack
REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("safetensors", "safetensors==0.4.5"),
)


def missing(requirements=REQUIREMENTS, is_installed=None) -> list[str]:
    if is_installed is None:
        import launch

        is_installed = launch.is_installed
    wanted = [req for name, req in requirements if not is_installed(name)]
    assert not any(req.split("=")[0].strip().lower() in NEVER_INSTALL for req in wanted)
    return wanted


def main() -> None:
    import launch

    for requirement in missing():
        launch.run_pip(f"install {requirement}", f"Delta Sampling requirement: {requirement}")


if __name__ == "__main__":
    main()
