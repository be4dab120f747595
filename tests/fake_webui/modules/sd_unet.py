"""modules/sd_unet.py: a selected SD Unet (TensorRT, ...) answers every UNetModel.forward."""

current_unet_option = None
current_unet = None
original_forward = None


def create_unet_forward(original_forward):
    def UNetModel_forward(self, x, timesteps=None, context=None, *args, **kwargs):  # noqa: N802 - A1111's name
        if current_unet is not None:
            return current_unet.forward(x, timesteps, context, *args, **kwargs)
        return original_forward(self, x, timesteps, context, *args, **kwargs)

    return UNetModel_forward
