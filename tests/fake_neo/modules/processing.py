"""Neo's processing order: forge_objects reset from forge_objects_after_applying_lora when a batch starts
and before every pass, and process_before_every_sampling called once per pass (hires included)."""

from modules import a1111_fake

_a1111 = a1111_fake.load("processing")
StableDiffusionProcessing, Processed, script_errors = _a1111.StableDiffusionProcessing, _a1111.Processed, _a1111.script_errors
process_images = _a1111.process_images


def _reset(p):
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()


def _before_every_sampling(p, hires, **kwargs):
    _reset(p)
    _a1111._hook(p, "process_before_every_sampling", **kwargs)


_a1111._start_batch = _reset
_a1111._before_every_sampling = _before_every_sampling
