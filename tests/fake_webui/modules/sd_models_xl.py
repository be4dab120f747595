"""modules/sd_models_xl.py: SDXL conditioning helpers added to an SDXL model."""


def extend_sdxl(model):
    model.sdxl_extended = True
