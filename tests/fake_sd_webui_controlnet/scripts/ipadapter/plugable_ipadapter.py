"""scripts/ipadapter/plugable_ipadapter.py: PlugableIPAdapter.hook replaces each cross-attention module's
`forward` with `attn_forward_hacked` (its originals in the module-global `all_hacks`), and sets the global
`current_model`, whose `cond_mark` and `current_sampling_percent` every patched call reads. The tiny UNet
has one cross-attention site (the real SD1.5 list's first, input block 1): the fake hooks the sites that exist."""

import torch

from .ipadapter_model import ImageEmbed, IPAdapterModel

SD1_SITES = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)] + [("middle", 0)]


def attn_forward_hacked(self, x, context=None, **kwargs):
    batch_size, _, inner_dim = x.shape
    h = self.heads
    head_dim = inner_dim // h
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    q, k, v = (t.view(batch_size, -1, h, head_dim).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch_size, -1, h * head_dim)
    for f in self.ipadapter_hacks:
        out = out + f(self, x, q)
    return self.to_out(out)


all_hacks = {}
current_model = None


def hack_blk(block, function, type):
    if not hasattr(block, "ipadapter_hacks"):
        block.ipadapter_hacks = []
    if len(block.ipadapter_hacks) == 0:
        all_hacks[block] = block.forward
        block.forward = attn_forward_hacked.__get__(block, type)
    block.ipadapter_hacks.append(function)


def clear_all_ip_adapter():
    global all_hacks, current_model
    for k, v in all_hacks.items():
        k.forward = v
        k.ipadapter_hacks = []
    all_hacks = {}
    current_model = None


def _site(model, kind, block_id):
    blocks = {"input": model.input_blocks, "middle": [getattr(model, "middle_block", None)],
              "output": getattr(model, "output_blocks", [])}[kind]
    if block_id >= len(blocks) or blocks[block_id] is None or len(blocks[block_id]) < 2:
        return None
    return blocks[block_id][1].transformer_blocks[0].attn2


class PlugableIPAdapter(torch.nn.Module):
    def __init__(self, ipadapter: IPAdapterModel):
        super().__init__()
        self.ipadapter = ipadapter
        self.cache = None
        self.weight, self.p_start, self.p_end = 1.0, 0.0, 1.0

    def reset(self):
        self.cache = {}

    @torch.no_grad()
    def hook(self, model, preprocessor_outputs, weight, start, end, latent_width, latent_height,
             effective_region_mask, pulid_attn_setting=None, dtype=torch.float32):
        global current_model
        current_model = model
        self.p_start, self.p_end, self.weight, self.cache = start, end, weight, {}
        self.ipadapter.to("cpu", dtype=dtype)
        outputs = preprocessor_outputs if isinstance(preprocessor_outputs, list | tuple) else [preprocessor_outputs]
        self.image_emb = ImageEmbed.average_of(*[self.ipadapter.get_image_emb(o) for o in outputs])
        for number, (kind, block_id) in enumerate(SD1_SITES):
            module = _site(model, kind, block_id)
            if module is not None:
                hack_blk(module, self.patch_forward(number), type(module))

    def call_ip(self, key, feat, device):
        if key not in self.cache:
            self.cache[key] = self.ipadapter.ip_layers.to_kvs[key](feat).to(device)
        return self.cache[key]

    def patch_forward(self, number):
        @torch.no_grad()
        def forward(attn_blk, x, q):
            batch_size, _, inner_dim = x.shape
            h = attn_blk.heads
            head_dim = inner_dim // h
            percent = getattr(current_model, "current_sampling_percent", 0.5)
            if percent < self.p_start or percent > self.p_end or self.weight == 0.0:
                return 0.0
            emb = self.image_emb.eval(current_model.cond_mark)
            ip_k = self.call_ip(f"{number * 2 + 1}_to_k_ip", emb, q.device)
            ip_v = self.call_ip(f"{number * 2 + 1}_to_v_ip", emb, q.device)
            ip_k, ip_v = (t.view(batch_size, -1, h, head_dim).transpose(1, 2).to(q.dtype) for t in (ip_k, ip_v))
            out = torch.nn.functional.scaled_dot_product_attention(q, ip_k, ip_v)
            return out.transpose(1, 2).reshape(batch_size, -1, h * head_dim) * self.weight

        return forward
