"""backend/memory_management.py: the loaded-model list, clone unloading, and cache emptying."""

current_loaded_models: list = []
signal_empty_cache = False
preserved: list[int] = []  # hard_memory_preservation of each load_models_gpu call
empty_cache_calls = 0


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.model.refresh_loras()

    def model_unload(self, avoid_model_moving=False):
        pass

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if model.is_clone(current_loaded_models[i].model):
            current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    preserved.append(hard_memory_preservation)
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
            continue
        unload_model_clones(model)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    while current_loaded_models:
        current_loaded_models.pop().model_unload()


def soft_empty_cache(force=False):
    global empty_cache_calls
    empty_cache_calls += 1
