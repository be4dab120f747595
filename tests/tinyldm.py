"""A tiny eps-prediction latent diffusion model with real SD1.5 ldm module names, for host-glue tests."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

DIM, CTX, TOKENS, VOCAB = 16, 12, 5, 97


def _seq(**modules: nn.Module) -> nn.Module:
    m = nn.Module()
    for name, child in modules.items():
        m.add_module(name, child)
    return m


class _Block(nn.ModuleList):
    """A called UNet block (like ldm's TimestepEmbedSequential), so per-block hooks fire as on the real one."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                transformer_options: dict | None = None) -> torch.Tensor:
        if isinstance(self[0], nn.Conv2d):
            return self[0](h) + emb[:, :, None, None]
        return _attend(self[1], h, context, transformer_options or {})


def _attend(tr: nn.Module, h: torch.Tensor, context: torch.Tensor, transformer_options: dict) -> torch.Tensor:
    """Cross-attention; Forge's UNet calls a `patches_replace["attn2"]` entry for its block instead (IP-Adapter)."""
    b, c, hh, ww = h.shape
    tokens = tr.proj_in(h).flatten(2).transpose(1, 2)
    attn = tr.transformer_blocks[0].attn2
    patch = transformer_options.get("patches_replace", {}).get("attn2", {}).get(transformer_options.get("block"))
    if patch is not None:
        q, k, v = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)
        extra = {k: v for k, v in transformer_options.items() if k != "patches_replace"}
        tokens = tokens + attn.to_out(patch(q, k, v, {**extra, "n_heads": 1, "dim_head": DIM,
                                                      "original_shape": list(h.shape)}))
    else:
        tokens = tokens + attn(tokens, context)
    tokens = tokens + torch.tanh(tr.transformer_blocks[0].ff.net[0].proj(tokens))
    return h + tr.proj_out(tokens.transpose(1, 2).reshape(b, c, hh, ww))


class CrossAttention(nn.Module):
    """ldm's CrossAttention names and call (x, context); one head."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 1
        self.to_q, self.to_k, self.to_v = nn.Linear(DIM, DIM, bias=False), nn.Linear(CTX, DIM, bias=False), \
            nn.Linear(CTX, DIM, bias=False)
        self.to_out = nn.Sequential(nn.Linear(DIM, DIM))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(torch.softmax(q @ k.transpose(1, 2) / DIM**0.5, -1) @ v)


class TinyUNet(nn.Module):
    """input_blocks.0.0 conv -> cross-attention block input_blocks.1.1 -> out.2 conv, with time_embed."""

    def __init__(self) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(8, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        attn = CrossAttention()
        block = _seq(attn2=attn, ff=_seq(net=nn.ModuleList([_seq(proj=nn.Linear(DIM, DIM))])))
        transformer = _seq(proj_in=nn.Conv2d(DIM, DIM, 1), transformer_blocks=nn.ModuleList([block]),
                           proj_out=nn.Conv2d(DIM, DIM, 1))
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(4, DIM, 3, padding=1)]),
                                           _Block([nn.Identity(), transformer])])
        self.out = nn.Sequential(nn.GroupNorm(4, DIM), nn.SiLU(), nn.Conv2d(DIM, 4, 3, padding=1))
        self.in_channels = 4

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: dict[str, list[torch.Tensor]] | None = None,
                transformer_options: dict | None = None) -> torch.Tensor:
        """`control`: a ControlNet's residuals, popped like Forge's UNet does (after a block, after the middle).
        `transformer_options`: Forge's, with the block being run set in it as Forge's UNet does."""
        emb = self.time_embed(timestep_features(t))
        h = x
        options = dict(transformer_options or {})
        for i, block in enumerate(self.input_blocks):
            options["block"] = ("input", i)
            h = block(h, emb, context, options)
            if control is not None and control.get("output"):
                h = h + control["output"].pop()
        if control is not None and control.get("middle"):
            h = h + control["middle"].pop()
        return self.out(h)


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    freqs = torch.exp(-torch.arange(4, dtype=torch.float32) * 2.0)
    angles = t.float()[:, None] / 100.0 * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class TinyControlNet(nn.Module):
    """A ControlNet for TinyUNet with cldm's module names: time_embed and input_blocks (the encoder copy),
    input_hint_block (pixels -> latent), zero_convs and middle_block_out. Outputs one residual per zero conv,
    then the middle one, as cldm's forward does."""

    def __init__(self) -> None:
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(8, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(4, DIM, 3, padding=1)])])
        self.input_hint_block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, DIM, 8, stride=8))
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(DIM, DIM, 1))])
        self.middle_block_out = nn.Sequential(nn.Conv2d(DIM, DIM, 1))
        self.calls: list[dict[str, torch.Tensor]] = []  # what each forward was given (tests read it)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, **kwargs: object) -> list[torch.Tensor]:
        self.calls.append({"x": x, "timesteps": timesteps, "context": context, "hint": hint})
        emb = self.time_embed(timestep_features(timesteps))
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(hint)
        context_bias = torch.tanh(context.mean((1, 2)))[:, None, None, None]
        return [self.zero_convs[0](h), self.middle_block_out(h) * context_bias]


def controlnet_state_dict(seed: int = 11, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A random-weight TinyControlNet as a cldm file's tensors (`control_model.` prefix)."""
    torch.manual_seed(seed)
    model = TinyControlNet()
    return {f"control_model.{k}": v.detach() * (scale if "zero_convs" in k or "middle_block_out" in k else 1.0)
            for k, v in model.state_dict().items()}


def ipadapter_state_dict(seed: int = 12, embed_dim: int = 1024, context: int = CTX) -> dict[str, torch.Tensor]:
    """A random-weight plain IP-Adapter for TinyUNet's one cross-attention site (Forge's site number 0) in the
    .safetensors layout: image_proj.{proj,norm} and ip_adapter.1.to_{k,v}_ip."""
    g = torch.Generator().manual_seed(seed)
    return {"image_proj.proj.weight": torch.randn(4 * context, embed_dim, generator=g) * 0.05,
            "image_proj.proj.bias": torch.zeros(4 * context), "image_proj.norm.weight": torch.ones(context),
            "image_proj.norm.bias": torch.zeros(context),
            "ip_adapter.1.to_k_ip.weight": torch.randn(DIM, context, generator=g) * 0.5,
            "ip_adapter.1.to_v_ip.weight": torch.randn(DIM, context, generator=g) * 0.5}


class TinyTextModel(nn.Module):
    """HF CLIP-like names: transformer.text_model.encoder.layers.0.self_attn.{q,k,v,out}_proj."""

    def __init__(self) -> None:
        super().__init__()
        attn = _seq(q_proj=nn.Linear(CTX, CTX), k_proj=nn.Linear(CTX, CTX), v_proj=nn.Linear(CTX, CTX),
                    out_proj=nn.Linear(CTX, CTX))
        layer = _seq(self_attn=attn)
        text_model = _seq(embeddings=_seq(token_embedding=nn.Embedding(VOCAB, CTX)),
                          encoder=_seq(layers=nn.ModuleList([layer])))
        self.transformer = _TinyTransformer(text_model)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.transformer(torch.tensor([tokenize(t) for t in texts]))


class _TinyTransformer(nn.Module):
    """Called as a module, like the HF CLIPTextModel that A1111's low-VRAM hooks wrap."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tm = self.text_model
        h = tm.embeddings.token_embedding(ids)
        a = tm.encoder.layers[0].self_attn
        w = torch.softmax(a.q_proj(h) @ a.k_proj(h).transpose(1, 2) / CTX**0.5, -1)
        return h + a.out_proj(w @ a.v_proj(h))


def tokenize(text: str) -> list[int]:
    words = (text.lower().split() + ["<pad>"] * TOKENS)[:TOKENS]
    return [int(hashlib.md5(w.encode()).hexdigest(), 16) % VOCAB for w in words]


class DiffusionWrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = TinyUNet()
        self.conditioning_key = "crossattn"

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_crossattn: list[torch.Tensor]) -> torch.Tensor:
        return self.diffusion_model(x, t, c_crossattn[0])


class TinyLDM(nn.Module):
    """The A1111-facing surface of an ldm LatentDiffusion: apply_model, get_learned_conditioning, alphas."""

    parameterization = "eps"
    is_sdxl = is_sd2 = is_sd3 = False
    is_sd1 = True
    cond_stage_key = "txt"

    def __init__(self, seed: int = 0, **ldm_params: object) -> None:  # ldm config params (use_ema, ...) unused
        super().__init__()
        torch.manual_seed(seed)
        self.model = DiffusionWrapper()
        self.cond_stage_model = TinyTextModel()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model(x, t, c_crossattn=cond["c_crossattn"])

    def get_learned_conditioning(self, texts: list[str]) -> torch.Tensor:
        return self.cond_stage_model(texts)
