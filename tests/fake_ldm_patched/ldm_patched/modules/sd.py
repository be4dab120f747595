"""ldm_patched/modules/sd.py: load_lora_for_models returns patched clones, or the inputs on a mismatch."""

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    lora_unet, unmatched = load_lora(lora, model_lora_keys_unet(model.model, {}))
    lora_clip, unmatched = load_lora(unmatched, model_lora_keys_clip(clip.cond_stage_model, {}))
    if len(unmatched) > 12:
        return model, clip
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(lora_unet, strength_model)
        model = new_model
    if lora_clip:
        new_clip.add_patches(lora_clip, strength_clip)
        clip = new_clip
    return model, clip
