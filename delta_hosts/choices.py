"""Names the panel and X/Y/Z offer: the host's checkpoints and LoRAs, and resolving pasted names."""

from __future__ import annotations

from lib_delta import DeltaError


def checkpoints() -> list[str]:
    from modules import sd_models

    return sorted(sd_models.checkpoint_tiles())


def refresh_checkpoints() -> None:
    from modules import sd_models

    sd_models.list_models()


def loras() -> list[str]:
    try:
        import networks
    except ImportError:  # the built-in Lora extension is disabled
        return []
    return sorted(networks.available_networks)


def refresh_adapters() -> None:
    refresh_checkpoints()
    try:
        import networks
    except ImportError:
        return
    networks.list_available_networks()


def adapters(kind: str | None) -> list[str]:
    """Adapter names for a kind; None lists both kinds (used by the refresh button)."""
    if kind == "prompt":
        return []
    if kind == "checkpoint":
        return checkpoints()
    if kind == "lora":
        return loras()
    return loras() + checkpoints()


def resolve_checkpoint(title: str) -> str:
    """The panel's label for a pasted 'name [hash]' (A1111 lists titles, Forge file names); unknown
    names are kept as typed."""
    from . import files

    try:
        info = files.find_checkpoint(title)
    except DeltaError:
        return title
    listed = checkpoints()
    for label in (info.title, getattr(info, "name", None), getattr(info, "short_title", None)):
        if label in listed:
            return label
    return info.title


def resolve_adapter(kind: str, name: str) -> str:
    if kind == "checkpoint":
        return resolve_checkpoint(name)
    if kind == "lora":
        from . import files

        try:
            return files.split_title(files.find_lora(name)[1])[0]
        except DeltaError:
            return name
    return name
