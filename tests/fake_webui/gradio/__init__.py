"""Fake gradio (3.41 signatures used by the panel): components record their kwargs."""

from __future__ import annotations

from typing import Any

warnings: list[str] = []


class Error(Exception):
    pass


def Warning(message: str) -> None:  # noqa: N802 - gradio's name
    warnings.append(message)


def Info(message: str) -> None:  # noqa: N802 - gradio's name
    warnings.append(message)


def update(**kwargs: Any) -> dict[str, Any]:
    return {"__type__": "generic_update", **kwargs}


class Block:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def change(self, **kwargs: Any) -> None:
        self.events.append(("change", kwargs))

    click = change


class Slider(Block):
    pass


NAMED_CHOICES = False  # gradio 4 keeps (name, value) choices; gradio 3.41 str()s every choice


class Dropdown(Block):
    def __init__(self, *args: Any, choices: list | None = None, **kwargs: Any) -> None:
        super().__init__(*args, choices=choices, **kwargs)
        named = [tuple(c) if isinstance(c, tuple | list) else (str(c), c) for c in choices or []]
        self.choices = named if NAMED_CHOICES else [str(c) for c in choices or []]


class Textbox(Block):
    pass


class Checkbox(Block):
    pass


class Radio(Block):
    pass


class Button(Block):
    pass


class Row(Block):
    pass


class Accordion(Block):
    pass


class Markdown(Block):
    pass


class Tabs(Block):
    pass


class Tab(Block):  # gradio 3.41 and 4: Tab = TabItem(label, ...)
    pass


class Image(Block):
    pass
