"""modules/sd_models_config.py: the ldm config A1111 picks for a state dict."""


def find_checkpoint_config(state_dict, info):
    return "configs/v1-inference.yaml"
