"""A1111's checkpoint registry (CheckpointInfo titles 'name [shorthash]', alias lookup)."""

import os

import torch

safe_loads: list[str] = []

checkpoints_list: dict = {}
checkpoint_aliases: dict = {}


class CheckpointInfo:
    """`shorthash=None` is A1111's lazy case: a checkpoint never loaded as the main model has no hash in
    its title until calculate_shorthash() reads the file."""

    def __init__(self, filename, shorthash):
        self.filename = filename
        self.name = os.path.splitext(os.path.basename(filename))[0]
        self.name_for_extra = self.name
        self.model_name = self.name
        self.hash = shorthash[:8] if shorthash else None
        self.sha256 = shorthash * 6 if shorthash else None
        self.shorthash = shorthash
        self.title = f"{self.name} [{shorthash}]" if shorthash else self.name
        self.short_title = self.title
        self.ids = [self.model_name, self.title, self.name] + ([self.hash, self.shorthash, self.sha256] if shorthash else [])

    def calculate_shorthash(self):
        import hashlib

        with open(self.filename, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        if self.shorthash == self.sha256[:10]:
            return self.shorthash
        self.shorthash = self.sha256[:10]
        self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]"]
        old_title = self.title
        self.title = self.short_title = f"{self.name} [{self.shorthash}]"
        checkpoints_list.pop(old_title, None)
        self.register()
        return self.shorthash

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self
        return self


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():
    pass


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    bare = search_string.rsplit(" [", 1)[0]
    found = sorted([i for i in checkpoints_list.values() if bare in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    """A1111 reads non-safetensors files with its restricted unpickler; weights_only is the equivalent."""
    safe_loads.append(checkpoint_file)
    sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return sd.get("state_dict", sd)


def repair_config(sd_config, state_dict=None):
    if not hasattr(sd_config.model.params, "use_ema"):
        sd_config.model.params.use_ema = False


def instantiate_from_config(config, state_dict=None):
    import importlib

    module, cls = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**config.get("params", {}))


def set_model_type(model, state_dict):
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if hasattr(model, "conditioner"):
        model.is_sdxl = True
    elif hasattr(model.cond_stage_model, "model"):
        model.is_sd2 = True
    else:
        model.is_sd1 = True


def set_model_fields(model):
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


alpha_overrides: list = []


def apply_alpha_schedule_override(sd_model, p=None):
    """The real one also applies the downcast / zero-terminal-SNR options, on shared.device."""
    if not hasattr(sd_model, "alphas_cumprod") or not hasattr(sd_model, "alphas_cumprod_original"):
        return
    alpha_overrides.append(id(sd_model))  # ids: a test fake must not keep models alive
    sd_model.alphas_cumprod = sd_model.alphas_cumprod_original
