"""backend/memory_management.py (Neo): weakly held LoadedModel entries; loading a patcher pops every
loaded clone of its module (the weights follow the uuid in partially_load); model_unload(memory, unpatch)."""

import weakref

import torch

current_loaded_models: list = []
empty_cache_calls = 0


preserved: list[int] = []  # minimum_memory_required of each load_models_gpu call

class LoadedModel:
    def __init__(self, model):
        self._model = weakref.ref(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True

    @property
    def model(self):
        return self._model()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        self.model.partially_load(self.device, 0, force_patch_weights=force_patch_weights)
        self.real_model = weakref.ref(self.model.model)

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.detach(unpatch_weights)
        return True

    def __eq__(self, other):
        return self.model is other.model


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    preserved.append(minimum_memory_required)
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
            continue
        for i in range(len(current_loaded_models) - 1, -1, -1):
            if model.is_clone(current_loaded_models[i].model):
                current_loaded_models.pop(i).model.detach(unpatch_all=False)
        loaded.model_load(force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def soft_empty_cache(force=False):
    global empty_cache_calls
    empty_cache_calls += 1


def lora_compute_dtype(device):
    return torch.float32
