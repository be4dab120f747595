import gradio as gr


class InputAccordion(gr.Checkbox):
    """A1111: a hidden checkbox whose value is True when the accordion is open."""

    def __init__(self, value, **kwargs):
        super().__init__(value, **kwargs)
        self.accordion_id = kwargs.get("elem_id")


class ToolButton(gr.Button):
    """A1111: a small emoji button (FormComponent + gr.Button)."""
