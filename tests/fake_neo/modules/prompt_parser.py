"""Neo's prompt_parser: A1111's, without the `use_old_scheduling` argument (Neo dropped the option)."""

from modules import a1111_fake

_a1111 = a1111_fake.load("prompt_parser")
SdConditioning = _a1111.SdConditioning
reconstruct_cond_batch, reconstruct_multicond_batch = _a1111.reconstruct_cond_batch, _a1111.reconstruct_multicond_batch


def get_learned_conditioning(model, prompts, steps, hires_steps=None):
    return _a1111.get_learned_conditioning(model, prompts, steps, hires_steps)


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None):
    return _a1111.get_multicond_learned_conditioning(model, prompts, steps, hires_steps)
