import gradio as gr


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    button = gr.Button(elem_id=elem_id)
    button.refresh = (refresh_component, refresh_method, refreshed_args)
    return button
