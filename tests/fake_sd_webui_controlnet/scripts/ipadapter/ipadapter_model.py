"""scripts/ipadapter/ipadapter_model.py: ImageEmbed (per-row cond/uncond image tokens by cond_mark) and
IPAdapterModel for plain IP-Adapters (image_proj over the CLIP image embedding; one to_k/v_ip per site)."""

from typing import NamedTuple

import torch


class ImageEmbed(NamedTuple):
    cond_emb: torch.Tensor
    uncond_emb: torch.Tensor

    def eval(self, cond_mark: torch.Tensor) -> torch.Tensor:
        assert cond_mark.ndim == 4
        cond_mark = cond_mark[:, :, :, 0].to(self.cond_emb)
        return self.cond_emb.to(cond_mark) * cond_mark + self.uncond_emb.to(cond_mark) * (1 - cond_mark)

    @staticmethod
    def average_of(*args):
        conds, unconds = zip(*args, strict=True)
        return ImageEmbed(torch.stack(conds).mean(0), torch.stack(unconds).mean(0))


class ImageProjModel(torch.nn.Module):
    def __init__(self, cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens=4):
        super().__init__()
        self.cross_attention_dim, self.clip_extra_context_tokens = cross_attention_dim, clip_extra_context_tokens
        self.proj = torch.nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class To_KV(torch.nn.Module):
    def __init__(self, state_dict):
        super().__init__()
        self.to_kvs = torch.nn.ModuleDict()
        for key, value in state_dict.items():
            name = key.replace(".weight", "").replace(".", "_")
            self.to_kvs[name] = torch.nn.Linear(value.shape[1], value.shape[0], bias=False)
            self.to_kvs[name].weight.data = value


class IPAdapterModel(torch.nn.Module):
    def __init__(self, state_dict, clip_embeddings_dim, cross_attention_dim, is_sdxl):
        super().__init__()
        self.device = "cpu"
        self.is_sdxl = is_sdxl
        self.image_proj_model = ImageProjModel(cross_attention_dim, clip_embeddings_dim)
        self.image_proj_model.load_state_dict(state_dict["image_proj"])
        self.ip_layers = To_KV(state_dict["ip_adapter"])

    @staticmethod
    def load(state_dict, model_name):
        cross_attention_dim = state_dict["ip_adapter"]["1.to_k_ip.weight"].shape[1]
        return IPAdapterModel(state_dict, int(state_dict["image_proj"]["proj.weight"].shape[1]), cross_attention_dim,
                              cross_attention_dim == 2048)

    @torch.inference_mode()
    def get_image_emb(self, preprocessor_output) -> ImageEmbed:
        self.image_proj_model.to(self.device)
        embeds = preprocessor_output["image_embeds"].to(device=self.device, dtype=torch.float32)
        return ImageEmbed(self.image_proj_model(embeds), self.image_proj_model(torch.zeros_like(embeds)))
