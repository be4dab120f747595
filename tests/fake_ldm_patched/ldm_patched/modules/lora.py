"""ldm_patched/modules/lora.py: ComfyUI's key maps and load_lora (the same shapes as Forge's)."""

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet  # noqa: F401
