"""LoRA file keys -> where they apply in a source model (A1111 ldm module names).

Kohya keys are `stem.suffix`; diffusers/PEFT keys are dotted paths under `unet.` / `text_encoder(_2).`.
UNet stems resolve in ldm or diffusers naming; text-encoder stems resolve in the HF CLIP encoder (SD1,
SDXL's first) or in an OpenCLIP encoder (SD2, SDXL's second), whose attention packs q/k/v into one
`in_proj_weight` and reads `out_proj.weight` itself, so those targets name the attention module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from . import DeltaError

_SUFFIX_ALIASES = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight", "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
}  # fmt: skip
_DOTTED_SUFFIXES = sorted((*_SUFFIX_ALIASES, "alpha"), key=len, reverse=True)  # longest first
_DOTTED_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
_RESNET_SUFFIX = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
    "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}  # fmt: skip


def stem_and_suffix(key: str) -> tuple[str, str]:
    """(kohya-style module stem, factor suffix) of a file key. Kohya keys are `stem.suffix`; diffusers and
    PEFT keys are dotted module paths under `unet.` / `text_encoder(_2).`, renamed to kohya stems."""
    prefix = next((p for p in _DOTTED_PREFIXES if key.startswith(p)), None)
    suffix = next((x for x in _DOTTED_SUFFIXES if key.endswith("." + x)), None)
    if prefix is None or suffix is None:
        stem, _, suffix = key.partition(".")
        return stem, _SUFFIX_ALIASES.get(suffix, suffix)
    path = key[len(prefix) : -len(suffix) - 1].replace(".processor.", ".").removesuffix(".lora_linear_layer")
    path = re.sub(r"\.to_(q|k|v)_lora$", r".to_\1", path).replace(".to_out_lora", ".to_out.0")
    return _DOTTED_PREFIXES[prefix] + path.replace(".", "_"), _SUFFIX_ALIASES.get(suffix, suffix)


def _diffusers_to_ldm(name: str) -> list[str]:
    """Candidate ldm (underscore) paths for a diffusers-style UNet name."""
    m = re.fullmatch(r"(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        side, block, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        rest = _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest
        number = 3 * block + index + 1 if side == "down" else 3 * block + index
        prefix = "input_blocks" if side == "down" else "output_blocks"
        return [f"{prefix}_{number}_{1 if kind == 'attentions' else 0}_{rest}"]
    m = re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        rest = _RESNET_SUFFIX.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return [f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_{rest}"]
    m = re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return [f"input_blocks_{3 * int(m[1]) + 3}_0_op"]
    m = re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:  # after the resnet, or after resnet + attention
        number = 3 * int(m[1]) + 2
        return [f"output_blocks_{number}_1_conv", f"output_blocks_{number}_2_conv"]
    m = re.fullmatch(r"(time|add)_embedding_linear_(\d+)", name)
    if m:
        target = "time_embed" if m[1] == "time" else "label_emb_0"
        return [f"{target}_{2 * int(m[2]) - 2}"]
    fixed = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "conv_norm_out": "out_0"}
    return [fixed[name]] if name in fixed else []


def _weighted_modules(root: nn.Module, root_name: str, stem: str) -> dict[str, str]:
    """{stem + underscore path: full dotted name} for the modules under root that own a weight."""
    index = {}
    for sub, module in root.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            full = ".".join(part for part in (root_name, sub) if part)
            index.setdefault(stem + sub.replace(".", "_"), full)
    return index


@dataclass
@dataclass(frozen=True)
class Target:
    """Where one LoRA module applies: the module whose forward reads the weight (hooked), the parameter
    below it, and a row range of it (one of q/k/v in an attention's packed projection)."""

    module: str
    param: str = "weight"
    rows: tuple[int, int] | None = None


_OPENCLIP_LAYER = {"mlp_fc1": ("mlp.c_fc", "weight"), "mlp_fc2": ("mlp.c_proj", "weight"),
                   "self_attn_out_proj": ("attn", "out_proj.weight")}  # fmt: skip
_QKV = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")


@dataclass
class ModelIndex:
    """Where the UNet and the text encoders live in the source model."""

    unet: dict[str, str]
    text_encoder: dict[str, str]  # HF CLIP (SD1, SDXL's first)
    openclip: dict[str, tuple[str, int]]  # kohya prefix -> (resblocks module, width): SD2, SDXL's second
    family: str

    @classmethod
    def of(cls, model: nn.Module) -> ModelIndex:
        names = dict(model.named_modules())
        unet_name = next((n for n in names if n.split(".")[-1] == "diffusion_model"), None)
        if unet_name is None and hasattr(model, "input_blocks"):
            unet_name = ""  # a bare UNet
        if unet_name is None:
            raise LoraError("The source model has no UNet (no 'diffusion_model' module).")
        unet = names[unet_name] if unet_name else model
        unet_index = _weighted_modules(unet, unet_name, "")
        te_name = next(
            (n for n in names if n.endswith("text_model")
             and (n.startswith("cond_stage_model.") or n.startswith("conditioner.embedders.0."))),
            None,
        )  # fmt: skip
        te_index = _weighted_modules(names[te_name], te_name, "text_model_") if te_name else {}
        openclip = {}
        for prefix, under in (("lora_te2_", "conditioner.embedders.1."), ("lora_te_", "cond_stage_model.")):
            blocks = next((n for n in names if n.startswith(under) and n.endswith("transformer.resblocks")), None)
            attn = names.get(f"{blocks}.0.attn")
            if attn is not None:
                openclip[prefix] = (blocks, int(getattr(attn, "embed_dim", 0) or attn.out_proj.in_features))
        if hasattr(model, "conditioner"):
            family = "SDXL"
        elif hasattr(model, "cond_stage_model"):
            family = "SD1" if te_name else "SD2"
        else:
            family = "unknown architecture"
        return cls(unet_index, te_index, openclip, family)

    def resolve(self, base: str) -> Target | None:
        """Where a kohya key stem applies; None if nothing in the model fits."""
        if base.startswith("lora_unet_"):
            rest = base[len("lora_unet_") :]
            for candidate in [rest, *_diffusers_to_ldm(rest)]:
                if candidate in self.unet:
                    return Target(self.unet[candidate])
            return None
        m = re.fullmatch(r"lora_te1?_(.+)", base)
        if m and m[1] in self.text_encoder:
            return Target(self.text_encoder[m[1]])
        return self._openclip(base)

    def _openclip(self, base: str) -> Target | None:
        m = re.fullmatch(r"(lora_te\d?_)text_model_encoder_layers_(\d+)_(.+)", base)
        prefix = "lora_te_" if m and m[1] == "lora_te1_" else m and m[1]
        if not m or prefix not in self.openclip:
            return None
        blocks, width = self.openclip[prefix]
        layer = f"{blocks}.{m[2]}"
        if m[3] in _QKV:
            i = _QKV.index(m[3])
            return Target(f"{layer}.attn", "in_proj_weight", (i * width, (i + 1) * width))
        sub, param = _OPENCLIP_LAYER.get(m[3], (None, None))
        return Target(f"{layer}.{sub}", param) if sub else None

    def skips(self, base: str) -> bool:
        """Text-encoder keys for an encoder this model does not have (SDXL TE2 keys on an SD1 source)."""
        m = re.match(r"lora_te(\d*)_", base)
        if not m:
            return False
        if m[1] in ("", "1"):
            return not self.text_encoder and "lora_te_" not in self.openclip
        return f"lora_te{m[1]}_" not in self.openclip


class LoraError(DeltaError):
    """An adapter file that cannot be read or does not fit the source model."""
