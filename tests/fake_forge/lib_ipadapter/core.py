"""The parts of Forge's lib_ipadapter/IPAdapterPlus.py that Forge and Neo share (plain IP-Adapters only):
the image projection, the per-site key/value layers, and `CrossAttentionPatch`, which Forge's UNet calls
instead of its cross-attention for every site in transformer_options["patches_replace"]["attn2"]."""

import torch
from torch import nn

SD15_SITES = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]


def attention(q, k, v, heads):
    b, _, inner = q.shape
    split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, -1, inner)


class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens):
        super().__init__()
        self.cross_attention_dim, self.clip_extra_context_tokens = cross_attention_dim, clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class To_KV(nn.Module):
    def __init__(self, state_dict):
        super().__init__()
        self.to_kvs = nn.ModuleDict()
        for key, value in state_dict.items():
            name = key.replace(".weight", "").replace(".", "_")
            self.to_kvs[name] = nn.Linear(value.shape[1], value.shape[0], bias=False)
            self.to_kvs[name].weight.data = value


class IPAdapter(nn.Module):
    def __init__(self, ipadapter_model, cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens):
        super().__init__()
        self.image_proj_model = ImageProjModel(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.image_proj_model.load_state_dict(ipadapter_model["image_proj"])
        self.ip_layers = To_KV(ipadapter_model["ip_adapter"])

    def get_image_embeds(self, clip_embed, clip_embed_zeroed):  # no no_grad here or in encode_image, as in Forge
        return self.image_proj_model(clip_embed), self.image_proj_model(clip_embed_zeroed)


class CrossAttentionPatch:
    def __init__(self, weight, ipadapter, number, cond, uncond, weight_type, mask=None, sigma_start=0.0,
                 sigma_end=1.0, unfold_batch=False):
        self.weights, self.ipadapters, self.conds, self.unconds = [weight], [ipadapter], [cond], [uncond]
        self.sigma_start, self.sigma_end = [sigma_start], [sigma_end]
        self.number = number
        self.k_key, self.v_key = f"{number * 2 + 1}_to_k_ip", f"{number * 2 + 1}_to_v_ip"

    def set_new_condition(self, weight, ipadapter, number, cond, uncond, weight_type, mask=None, sigma_start=0.0,
                          sigma_end=1.0, unfold_batch=False):
        self.weights.append(weight)
        self.ipadapters.append(ipadapter)
        self.conds.append(cond)
        self.unconds.append(uncond)
        self.sigma_start.append(sigma_start)
        self.sigma_end.append(sigma_end)

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        cond_or_uncond = extra_options["cond_or_uncond"]  # a KeyError without it, as in Forge
        sigma = extra_options["sigmas"][0].item() if "sigmas" in extra_options else 999999999.9
        batch_prompt = n.shape[0] // len(cond_or_uncond)
        out = attention(n, context_attn2, value_attn2, extra_options["n_heads"])
        for weight, cond, uncond, ipadapter, start, end in zip(self.weights, self.conds, self.unconds,
                                                              self.ipadapters, self.sigma_start, self.sigma_end, strict=True):
            if sigma > start or sigma < end:
                continue
            kv = ipadapter.ip_layers.to_kvs
            k_cond, k_uncond = kv[self.k_key](cond), kv[self.k_key](uncond)
            v_cond, v_uncond = kv[self.v_key](cond), kv[self.v_key](uncond)
            ip_k = torch.cat([(k_cond, k_uncond)[i].repeat(batch_prompt, 1, 1) for i in cond_or_uncond])
            ip_v = torch.cat([(v_cond, v_uncond)[i].repeat(batch_prompt, 1, 1) for i in cond_or_uncond])
            out = out + weight * attention(n, ip_k.to(n), ip_v.to(n), extra_options["n_heads"])
        return out.to(n.dtype)


def set_model_patch_replace(model, patch_kwargs, key):
    to = model.model_options["transformer_options"]
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    if key not in attn2:
        attn2[key] = CrossAttentionPatch(**patch_kwargs)
    else:
        attn2[key].set_new_condition(**patch_kwargs)


def apply(ipadapter, model, weight, clip_vision, image, embeds, start_at, end_at, insightface):
    """The body of Forge's apply_ipadapter for plain IP-Adapters: returns the patched clone."""
    if "0.to_q_lora.down.weight" in ipadapter["ip_adapter"] and not insightface:
        raise Exception("InsightFace must be provided for FaceID models.")
    cross_attention_dim = ipadapter["ip_adapter"]["1.to_k_ip.weight"].shape[1]
    if embeds is not None:
        clip_embed, clip_embed_zeroed = torch.unbind(embeds)
    else:
        clip_embed = clip_vision.encode_image(image).image_embeds
        clip_embed_zeroed = torch.zeros_like(clip_embed)
    module = IPAdapter(ipadapter, cross_attention_dim, clip_embed.shape[-1], 4)
    cond, uncond = module.get_image_embeds(clip_embed, clip_embed_zeroed)
    work_model = model.clone()
    patch_kwargs = {"number": 0, "weight": weight, "ipadapter": module, "cond": cond, "uncond": uncond,
                    "weight_type": "original", "sigma_start": model.model.predictor.percent_to_sigma(start_at),
                    "sigma_end": model.model.predictor.percent_to_sigma(end_at)}
    for key in SD15_SITES:
        set_model_patch_replace(work_model, patch_kwargs, key)
        patch_kwargs["number"] += 1
    return work_model
