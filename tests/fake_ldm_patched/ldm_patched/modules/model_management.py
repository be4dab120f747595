"""ldm_patched/modules/model_management.py: loading a patcher merges its LoRA patches in place."""

from backend.memory_management import (  # noqa: F401 - the same list and functions
    LoadedModel,
    current_loaded_models,
    load_model_gpu,
    load_models_gpu,
    soft_empty_cache,
    unload_all_models,
)
