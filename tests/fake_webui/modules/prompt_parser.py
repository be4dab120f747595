"""A1111's prompt_parser data structures with AND/weights; prompt editing is reduced to one schedule."""

import re

import torch


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class ScheduledPromptConditioning:
    def __init__(self, end_at_step, cond):
        self.end_at_step, self.cond = end_at_step, cond


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    conds = model.get_learned_conditioning(list(prompts))
    return [[ScheduledPromptConditioning(steps, conds[i])] for i in range(len(prompts))]


re_and = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    flat, indexes = [], []
    for prompt in prompts:
        entry = []
        for sub in re_and.split(prompt):
            text, weight = re_weight.search(sub).groups()
            entry.append((len(flat), float(weight) if weight is not None else 1.0))
            flat.append(text)
        indexes.append(entry)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in entry] for entry in indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def reconstruct_cond_batch(c, current_step):
    return torch.stack([_pick(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step))
        conds_list.append(conds_for_batch)
    return conds_list, torch.stack(tensors)
