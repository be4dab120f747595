"""lib_delta.lora: adapters merged per forward on a tiny tree with real SD1.5 ldm module names."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lib_delta.lora import KeyReport, LoraAdapter, LoraError, read_safetensors

U = "model.diffusion_model."
TE = "cond_stage_model.wrapped.transformer.text_model."
ATTN = U + "input_blocks.1.1.transformer_blocks.0."
Tensors = dict[str, torch.Tensor]
Expected = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # module -> (dW, bias diff) before multiplier


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs are ~100x slower with intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv(cin: int, cout: int, k: int = 3, **kw: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


def sd15_leaves() -> dict[str, nn.Module]:
    return {
        U + "time_embed.0": nn.Linear(4, 8),
        U + "time_embed.2": nn.Linear(8, 8),
        U + "input_blocks.0.0": conv(4, 8),
        U + "input_blocks.1.0.in_layers.0": nn.GroupNorm(2, 8),
        U + "input_blocks.1.0.in_layers.2": conv(8, 8),
        U + "input_blocks.1.0.emb_layers.1": nn.Linear(8, 8),
        U + "input_blocks.1.0.out_layers.3": conv(8, 8),
        U + "input_blocks.1.1.proj_in": conv(8, 8, 1),
        ATTN + "attn1.to_q": nn.Linear(8, 8, bias=False),
        ATTN + "attn1.to_k": nn.Linear(8, 8, bias=False),
        ATTN + "attn1.to_v": nn.Linear(8, 8, bias=False),
        ATTN + "attn1.to_out.0": nn.Linear(8, 8),
        ATTN + "attn2.to_k": nn.Linear(6, 8, bias=False),
        ATTN + "ff.net.0.proj": nn.Linear(8, 16),
        ATTN + "ff.net.2": nn.Linear(8, 8),
        U + "input_blocks.1.1.proj_out": conv(8, 8, 1),
        U + "input_blocks.3.0.op": conv(8, 8, stride=2),
        U + "middle_block.0.in_layers.2": conv(8, 8),
        U + "middle_block.1.proj_in": conv(8, 8, 1),
        U + "middle_block.1.transformer_blocks.0.attn1.to_q": nn.Linear(8, 8, bias=False),
        U + "middle_block.2.out_layers.3": conv(8, 8),
        U + "output_blocks.2.1.conv": conv(8, 8),  # upsampler without attention
        U + "output_blocks.3.0.in_layers.2": conv(16, 8),
        U + "output_blocks.3.0.skip_connection": conv(16, 8, 1),
        U + "output_blocks.3.1.proj_in": conv(8, 8, 1),
        U + "output_blocks.5.1.proj_out": conv(8, 8, 1),
        U + "output_blocks.5.2.conv": conv(8, 8),  # upsampler after an attention
        U + "out.0": nn.GroupNorm(2, 8),
        U + "out.2": conv(8, 4),
        TE + "encoder.layers.0.self_attn.q_proj": nn.Linear(6, 6),
        TE + "encoder.layers.0.mlp.fc1": nn.Linear(6, 12),
    }


def build_tree(leaves: dict[str, nn.Module]) -> nn.Module:
    """Nested containers from dotted names, so named_modules() reproduces them."""
    root = nn.Module()
    for dotted, leaf in leaves.items():
        *path, last = dotted.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(last, leaf)
    return root


@pytest.fixture
def tree() -> nn.Module:
    torch.manual_seed(0)
    return build_tree(sd15_leaves())


def run_all(tree: nn.Module) -> dict[str, torch.Tensor]:
    """Every leaf called on fixed random input (through __call__, so hooks fire)."""
    gen = torch.Generator().manual_seed(123)
    out = {}
    for name, m in tree.named_modules():
        if isinstance(m, nn.Linear):
            x = torch.randn(3, m.in_features, generator=gen)
        elif isinstance(m, nn.Conv2d):
            x = torch.randn(1, m.in_channels, 6, 6, generator=gen)
        elif isinstance(m, nn.GroupNorm):
            x = torch.randn(1, m.num_channels, 4, 4, generator=gen)
        else:
            continue
        out[name] = m(x)
    return out


def reference(tree: nn.Module, expected: Expected, multiplier: float) -> nn.Module:
    ref = copy.deepcopy(tree)
    with torch.no_grad():
        for name, (dw, db) in expected.items():
            m = ref.get_submodule(name)
            m.weight += multiplier * dw.reshape(m.weight.shape)
            if db is not None:
                m.bias = nn.Parameter(multiplier * db if m.bias is None else m.bias + multiplier * db)
    return ref


def assert_untouched(tree: nn.Module, params: dict[str, nn.Parameter]) -> None:
    for m in tree.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    now = dict(tree.named_parameters())
    assert now.keys() == params.keys()
    assert all(now[k] is params[k] for k in params)


def r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.3


def w(tree: nn.Module, name: str) -> torch.Tensor:
    return tree.get_submodule(name).weight.detach()


# ---------------------------------------------------------------- one builder per format


def kohya_ldm(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name, (out, inn), conv1x1 in [
        ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", ATTN + "attn1.to_q", (8, 8), False),
        ("input_blocks_1_1_transformer_blocks_0_ff_net_0_proj", ATTN + "ff.net.0.proj", (16, 8), False),
        ("input_blocks_1_1_proj_in", U + "input_blocks.1.1.proj_in", (8, 8), True),
        ("time_embed_0", U + "time_embed.0", (8, 4), False),
    ]:
        up, down = r(out, 2), r(2, inn)
        tail = (1, 1) if conv1x1 else ()
        sd |= {f"lora_unet_{key}.lora_up.weight": up.reshape(out, 2, *tail)}
        sd |= {f"lora_unet_{key}.lora_down.weight": down.reshape(2, inn, *tail)}
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(1.0)
        exp[name] = (up @ down * 0.5, None)
    up, down = r(8, 4), r(4, 8)  # PEFT-style suffixes, no alpha
    sd |= {"lora_unet_time_embed_2.lora_B.weight": up, "lora_unet_time_embed_2.lora_A.weight": down}
    exp[U + "time_embed.2"] = (up @ down, None)
    sd["bundle_emb.foo.string_to_param.*"] = r(1, 6)  # bundled embedding: ignored
    return sd, exp


DIFFUSERS_NAMES = {
    "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k": ATTN + "attn1.to_k",
    "down_blocks_0_resnets_0_conv1": U + "input_blocks.1.0.in_layers.2",
    "down_blocks_0_resnets_0_time_emb_proj": U + "input_blocks.1.0.emb_layers.1",
    "down_blocks_0_downsamplers_0_conv": U + "input_blocks.3.0.op",
    "mid_block_attentions_0_proj_in": U + "middle_block.1.proj_in",
    "mid_block_resnets_0_conv1": U + "middle_block.0.in_layers.2",
    "mid_block_resnets_1_conv2": U + "middle_block.2.out_layers.3",
    "up_blocks_0_upsamplers_0_conv": U + "output_blocks.2.1.conv",
    "up_blocks_1_resnets_0_conv_shortcut": U + "output_blocks.3.0.skip_connection",
    "up_blocks_1_attentions_0_proj_in": U + "output_blocks.3.1.proj_in",
    "up_blocks_1_upsamplers_0_conv": U + "output_blocks.5.2.conv",
    "time_embedding_linear_1": U + "time_embed.0",
    "conv_in": U + "input_blocks.0.0",
    "conv_out": U + "out.2",
}


def kohya_diffusers(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name in DIFFUSERS_NAMES.items():
        weight = w(tree, name)
        up, down = r(weight.shape[0], 3), r(3, *weight.shape[1:])  # conv: 3x3 down, 1x1 up
        sd[f"lora_unet_{key}.lora_up.weight"] = up.reshape(*up.shape, *[1] * (weight.dim() - 2))
        sd[f"lora_unet_{key}.lora_down.weight"] = down
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(6.0)
        exp[name] = ((up @ down.reshape(3, -1)).reshape(weight.shape) * 2.0, None)
    return sd, exp


def locon_conv(tree: nn.Module) -> tuple[Tensors, Expected]:
    up, down = r(8, 4, 1, 1), r(4, 16, 3, 3)
    key = "lora_unet_output_blocks_3_0_in_layers_2"
    sd = {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)}
    dw = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * 0.5
    return sd, {U + "output_blocks.3.0.in_layers.2": (dw, None)}


def lora_cp(tree: nn.Module) -> tuple[Tensors, Expected]:
    up, mid, down = r(8, 3, 1, 1), r(3, 3, 3, 3), r(3, 8, 1, 1)
    key = "lora_unet_middle_block_0_in_layers_2"
    sd = {f"{key}.lora_up.weight": up, f"{key}.lora_mid.weight": mid, f"{key}.lora_down.weight": down}
    dw = (up[:, :, 0, 0] @ mid.permute(2, 3, 0, 1) @ down[:, :, 0, 0]).permute(2, 3, 0, 1)
    return sd, {U + "middle_block.0.in_layers.2": (dw, None)}


def loha(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name, out, inn in [
        ("input_blocks_1_1_transformer_blocks_0_attn1_to_v", ATTN + "attn1.to_v", 8, 8),
        ("input_blocks_1_0_out_layers_3", U + "input_blocks.1.0.out_layers.3", 8, 72),  # conv, flattened
    ]:
        f = {"hada_w1_a": r(out, 2), "hada_w1_b": r(2, inn), "hada_w2_a": r(out, 2), "hada_w2_b": r(2, inn)}
        sd |= {f"lora_unet_{key}.{k}": v for k, v in f.items()} | {
            f"lora_unet_{key}.alpha": torch.tensor(1.0)
        }
        dw = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 0.5
        exp[name] = (dw, None)
    return sd, exp


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return (wa.T @ t.permute(2, 3, 0, 1) @ wb).permute(2, 3, 0, 1)


def loha_tucker(tree: nn.Module) -> tuple[Tensors, Expected]:
    f = {"hada_t1": r(2, 2, 3, 3), "hada_w1_a": r(2, 8), "hada_w1_b": r(2, 8)}
    f |= {"hada_t2": r(2, 2, 3, 3), "hada_w2_a": r(2, 8), "hada_w2_b": r(2, 8)}
    key = "lora_unet_output_blocks_5_2_conv"
    sd = {f"{key}.{k}": v for k, v in f.items()}
    dw = tucker_rebuild(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
    dw = dw * tucker_rebuild(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    return sd, {U + "output_blocks.5.2.conv": (dw, None)}


def lokr(tree: nn.Module) -> tuple[Tensors, Expected]:
    w1, w2a, w2b = r(2, 2), r(4, 2), r(2, 4)
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
    sd = {
        f"{key}.lokr_w1": w1,
        f"{key}.lokr_w2_a": w2a,
        f"{key}.lokr_w2_b": w2b,
        f"{key}.alpha": torch.tensor(1.0),
    }
    w2 = w2a @ w2b
    linear = torch.einsum("ab,cd->acbd", w1, w2).reshape(8, 8) * 0.5
    cw1, cw2 = r(2, 2), r(4, 4, 3, 3)  # conv: full w1 and w2, no rank -> scale 1
    sd |= {"lora_unet_output_blocks_2_1_conv.lokr_w1": cw1, "lora_unet_output_blocks_2_1_conv.lokr_w2": cw2}
    conv_dw = torch.einsum("ab,cdkl->acbdkl", cw1, cw2).reshape(8, 8, 3, 3)
    return sd, {ATTN + "attn1.to_out.0": (linear, None), U + "output_blocks.2.1.conv": (conv_dw, None)}


def dora(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name, by_output in [
        ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", ATTN + "attn1.to_q", False),
        ("input_blocks_1_1_proj_out", U + "input_blocks.1.1.proj_out", False),
        ("input_blocks_1_1_transformer_blocks_0_ff_net_0_proj", ATTN + "ff.net.0.proj", True),
    ]:
        weight = w(tree, name)
        out, inn = weight.shape[:2]
        up, down = r(out, 2), r(2, inn)
        tail = [1] * (weight.dim() - 2)
        merged = weight + (up @ down).reshape(weight.shape) * 0.5  # alpha 1 / rank 2
        if by_output:  # magnitude per output row, stored (out, 1)
            norm = merged.reshape(out, -1).norm(dim=1).reshape(out, 1, *tail)
            magnitude = norm * (1 + r(out, 1, *tail))
        else:  # A1111 / LyCORIS default: per input column, stored (1, in)
            norm = merged.transpose(0, 1).reshape(inn, -1).norm(dim=1).reshape(1, inn, *tail)
            magnitude = norm * (1 + r(1, inn, *tail))
        sd[f"lora_unet_{key}.lora_up.weight"] = up.reshape(out, 2, *tail)
        sd[f"lora_unet_{key}.lora_down.weight"] = down.reshape(2, inn, *tail)
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(1.0)
        sd[f"lora_unet_{key}.dora_scale"] = magnitude
        exp[name] = (merged * magnitude / norm - weight, None)
    return sd, exp


def full_diff(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name in [
        ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", ATTN + "attn1.to_q"),  # has no bias
        ("input_blocks_1_0_emb_layers_1", U + "input_blocks.1.0.emb_layers.1"),
        ("conv_norm_out", U + "out.0"),  # a GroupNorm, diffusers name
    ]:
        dw, db = r(*w(tree, name).shape), r(8)
        sd |= {f"lora_unet_{key}.diff": dw, f"lora_unet_{key}.diff_b": db}
        exp[name] = (dw, db)
    return sd, exp


def norm(tree: nn.Module) -> tuple[Tensors, Expected]:
    """LyCORIS train_norm: full weight and bias diffs of normalisation layers (A1111 network_norm)."""
    sd, exp = {}, {}
    for key, name in [("input_blocks_1_0_in_layers_0", U + "input_blocks.1.0.in_layers.0"), ("out_0", U + "out.0")]:
        dw, db = r(8), r(8)
        sd |= {f"lora_unet_{key}.w_norm": dw, f"lora_unet_{key}.b_norm": db}
        exp[name] = (dw, db)
    return sd, exp


def ia3(tree: nn.Module) -> tuple[Tensors, Expected]:
    """(IA)^3: dW = W * w per output row, or per input column when on_input (A1111 network_ia3)."""
    sd, exp = {}, {}
    for key, name, on_input in [
        ("input_blocks_1_1_transformer_blocks_0_attn2_to_k", ATTN + "attn2.to_k", False),  # Linear(6, 8)
        ("input_blocks_1_1_transformer_blocks_0_ff_net_2", ATTN + "ff.net.2", True),
    ]:
        weight = w(tree, name)
        scale = r(weight.shape[1] if on_input else weight.shape[0])
        sd |= {f"lora_unet_{key}.weight": scale, f"lora_unet_{key}.on_input": torch.tensor(on_input)}
        exp[name] = (weight * (scale.reshape(1, -1) if on_input else scale.reshape(-1, 1)), None)
    return sd, exp


def peft(tree: nn.Module) -> tuple[Tensors, Expected]:
    """diffusers / PEFT keys: dotted module paths under unet. and text_encoder., lora_A / lora_B, with and
    without alpha; the older attention-processor names; a 1-D DoRA magnitude (per output row)."""
    sd, exp = {}, {}
    blocks = "unet.down_blocks.0.attentions.0"
    for key, name, alpha in [
        (f"{blocks}.transformer_blocks.0.attn1.to_q", ATTN + "attn1.to_q", None),
        (f"{blocks}.transformer_blocks.0.attn1.to_out.0", ATTN + "attn1.to_out.0", 1.0),
        (f"{blocks}.proj_in", U + "input_blocks.1.1.proj_in", None),
        ("unet.mid_block.attentions.0.proj_in", U + "middle_block.1.proj_in", 4.0),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1", TE + "encoder.layers.0.mlp.fc1", None),
    ]:
        weight = w(tree, name)
        tail = [1] * (weight.dim() - 2)
        up, down = r(weight.shape[0], 2), r(2, weight.shape[1])
        sd |= {f"{key}.lora_B.weight": up.reshape(*up.shape, *tail), f"{key}.lora_A.weight": down.reshape(*down.shape, *tail)}
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        exp[name] = ((up @ down).reshape(weight.shape) * (alpha / 2 if alpha else 1.0), None)
    for stem, name in [  # attention processors (diffusers < 0.21)
        (f"{blocks}.transformer_blocks.0.attn1.processor.to_k_lora", ATTN + "attn1.to_k"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer",
         TE + "encoder.layers.0.self_attn.q_proj"),
    ]:
        up, down = r(*w(tree, name).shape[:1], 2), r(2, w(tree, name).shape[1])
        sd |= {f"{stem}.up.weight": up, f"{stem}.down.weight": down}
        exp[name] = (up @ down, None)
    key, name = f"{blocks}.transformer_blocks.0.attn1.to_v", ATTN + "attn1.to_v"  # square: rows, not columns
    weight, up, down = w(tree, name), r(8, 2), r(2, 8)
    merged = weight + up @ down
    norm_rows = merged.norm(dim=1, keepdim=True)
    magnitude = norm_rows.flatten() * (1 + r(8))
    sd |= {f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down, f"{key}.lora_magnitude_vector": magnitude}
    exp[name] = (merged * magnitude.reshape(8, 1) / norm_rows - weight, None)
    return sd, exp


def text_encoder(tree: nn.Module) -> tuple[Tensors, Expected]:
    sd, exp = {}, {}
    for key, name, out, inn in [
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            TE + "encoder.layers.0.self_attn.q_proj",
            6,
            6,
        ),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", TE + "encoder.layers.0.mlp.fc1", 12, 6),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", None, 6, 6),  # OpenCLIP: skipped
    ]:
        up, down = r(out, 2), r(2, inn)
        sd |= {
            f"{key}.lora_up.weight": up,
            f"{key}.lora_down.weight": down,
            f"{key}.alpha": torch.tensor(2.0),
        }
        if name:
            exp[name] = (up @ down, None)
    return sd, exp


FORMATS: dict[str, Callable[[nn.Module], tuple[Tensors, Expected]]] = {
    f.__name__: f
    for f in [
        kohya_ldm,
        kohya_diffusers,
        locon_conv,
        lora_cp,
        loha,
        loha_tucker,
        lokr,
        dora,
        full_diff,
        norm,
        ia3,
        peft,
        text_encoder,
    ]
}


def load(tree: nn.Module, sd: Tensors, tmp_path, multiplier: float = 1.0) -> LoraAdapter:
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return LoraAdapter.from_state_dict(read_safetensors(str(path)), tree, multiplier)


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("fmt", FORMATS)
def test_enabled_matches_independent_merge(tree, tmp_path, fmt, multiplier):
    sd, expected = FORMATS[fmt](tree)
    adapter = load(tree, sd, tmp_path, multiplier)
    assert set(adapter.module_names) == set(expected)
    params = dict(tree.named_parameters())
    before = run_all(tree)
    with adapter.enabled():
        inside = run_all(tree)
    after = run_all(tree)
    assert_untouched(tree, params)
    want = run_all(reference(tree, expected, multiplier))
    for name in before:
        assert torch.equal(after[name], before[name]), name
        assert torch.allclose(inside[name], want[name], rtol=1e-5, atol=1e-6), name
        if name not in expected:
            assert torch.equal(inside[name], before[name]), name
    for name, (dw, db) in expected.items():
        merged, bias = adapter.merged_weight(name)
        assert torch.allclose(merged, w(tree, name) + multiplier * dw.reshape(merged.shape), atol=1e-6)
        assert (bias is None) == (db is None)
    merged_model = copy.deepcopy(tree)
    adapter.merge_into_(merged_model)
    got = run_all(merged_model)
    assert all(torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6) for n in want)


def test_report_counts(tree, tmp_path):
    sd, _ = text_encoder(tree)
    adapter = load(tree, sd, tmp_path)
    assert adapter.report == KeyReport(matched=6, unmatched=0, skipped_text_encoder=3, unmatched_examples=())
    sd, _ = kohya_diffusers(tree)
    assert load(tree, sd, tmp_path).report.matched == 3 * len(DIFFUSERS_NAMES)


def test_multiplier_scales_delta(tree, tmp_path):
    sd, _ = kohya_ldm(tree)
    name = ATTN + "attn1.to_q"
    deltas = [load(tree, sd, tmp_path, m).merged_weight(name)[0] - w(tree, name) for m in (1.0, 0.25, -2.0)]
    assert torch.allclose(deltas[1], 0.25 * deltas[0], atol=1e-6)
    assert torch.allclose(deltas[2], -2.0 * deltas[0], atol=1e-6)


def test_exception_inside_context_leaves_nothing(tree, tmp_path):
    adapter = load(tree, kohya_ldm(tree)[0], tmp_path)
    params, before = dict(tree.named_parameters()), run_all(tree)
    with pytest.raises(KeyError), adapter.enabled():
        run_all(tree)
        raise KeyError("boom")
    assert_untouched(tree, params)
    assert all(torch.equal(a, b) for a, b in zip(run_all(tree).values(), before.values(), strict=True))


def test_failed_forward_is_restored(tree, tmp_path):
    sd, expected = kohya_ldm(tree)
    adapter = load(tree, sd, tmp_path)
    params, to_q = dict(tree.named_parameters()), tree.get_submodule(ATTN + "attn1.to_q")
    x = torch.randn(2, 8)
    with adapter.enabled():
        with pytest.raises(RuntimeError):
            to_q(torch.randn(2, 5))  # pre-hook swapped, forward raised, post-hook never ran
        got = to_q(x)  # the next call still uses W + dW, not a merge of the merge
    assert torch.allclose(
        got, x @ (w(tree, ATTN + "attn1.to_q") + expected[ATTN + "attn1.to_q"][0]).T, atol=1e-6
    )
    assert_untouched(tree, params)


def test_nested_enable_is_refused(tree, tmp_path):
    adapter = load(tree, kohya_ldm(tree)[0], tmp_path)
    with adapter.enabled(), pytest.raises(RuntimeError), adapter.enabled():
        pass
    assert_untouched(tree, dict(tree.named_parameters()))


def test_two_adapters_stack_and_unwind(tree, tmp_path):
    sd_a, exp_a = kohya_ldm(tree)
    sd_b, exp_b = full_diff(tree)  # shares to_q with kohya_ldm
    first, second = load(tree, sd_a, tmp_path, 0.5), load(tree, sd_b, tmp_path, 1.0)
    params, before = dict(tree.named_parameters()), run_all(tree)
    want = run_all(reference(reference(tree, exp_a, 0.5), exp_b, 1.0))
    with first.enabled(), second.enabled():
        got = [run_all(tree) for _ in range(2)]
    assert all(torch.allclose(g[n], want[n], rtol=1e-5, atol=1e-6) for g in got for n in want)
    assert_untouched(tree, params)
    assert all(torch.equal(a, b) for a, b in zip(run_all(tree).values(), before.values(), strict=True))


def test_half_precision_weights_merge_in_their_dtype(tree, tmp_path):
    tree = tree.to(torch.bfloat16)
    adapter = load(tree, kohya_ldm(tree)[0], tmp_path)
    merged, _ = adapter.merged_weight(ATTN + "attn1.to_q")
    assert merged.dtype == torch.bfloat16
    with adapter.enabled():
        assert (
            tree.get_submodule(ATTN + "attn1.to_q")(torch.randn(2, 8, dtype=torch.bfloat16)).dtype
            == torch.bfloat16
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_half_precision_merge_matches_fp32_within_rounding(tree, tmp_path, fmt, dtype):
    """Each format merged in a bf16 / fp16 model (factors cast to the weight's dtype) is within a few
    ulps of the fp32 merge: errors are measured against max(|W|, |W'|), what the dtype can represent."""
    sd, expected = FORMATS[fmt](tree)
    want = {name: load(tree, sd, tmp_path).merged_weight(name)[0] for name in expected}
    half = copy.deepcopy(tree).to(dtype)
    adapter = load(half, sd, tmp_path)
    for name, full in want.items():
        merged, _ = adapter.merged_weight(name)
        assert merged.dtype == dtype
        scale = torch.maximum(full.abs().max(), w(tree, name).abs().max())
        assert (merged.float() - full).abs().max() <= 8 * torch.finfo(dtype).eps * scale, name


def test_works_under_inference_mode(tree, tmp_path):
    sd, expected = kohya_ldm(tree)
    adapter = load(tree, sd, tmp_path)
    params, want = dict(tree.named_parameters()), run_all(reference(tree, expected, 1.0))
    with torch.inference_mode(), adapter.enabled():
        got = run_all(tree)
    assert all(torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6) for n in want)
    assert_untouched(tree, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_merges_on_device(tree, tmp_path):
    sd, expected = dora(tree)
    reference_model = reference(tree, expected, 1.0).cuda().half()
    tree = tree.cuda().half()
    adapter = load(tree, sd, tmp_path)
    name = ATTN + "attn1.to_q"
    merged, _ = adapter.merged_weight(name)
    assert merged.device.type == "cuda" and merged.dtype == torch.float16
    assert torch.allclose(merged.float(), w(reference_model, name).float(), atol=2e-2)
    x = torch.randn(2, 8, device="cuda", dtype=torch.float16)
    with adapter.enabled():
        got = tree.get_submodule(name)(x)
    assert torch.allclose(got.float(), reference_model.get_submodule(name)(x).float(), atol=3e-2)
    assert_untouched(tree, dict(tree.named_parameters()))


def test_other_architecture_is_refused_with_counts(tree, tmp_path):
    sd = {}
    for key, up, down in [
        ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", r(8, 2), r(2, 8)),  # fits
        ("input_blocks_4_1_transformer_blocks_1_attn1_to_q", r(8, 2), r(2, 8)),  # SDXL-only module
        ("input_blocks_1_1_transformer_blocks_0_attn2_to_k", r(8, 2), r(2, 2048)),  # SDXL context width
    ]:
        sd |= {f"lora_unet_{key}.lora_up.weight": up, f"lora_unet_{key}.lora_down.weight": down}
    with pytest.raises(LoraError) as err:
        load(tree, sd, tmp_path)
    message = str(err.value)
    assert "does not fit the source model (SD1)" in message
    assert "2 of 6 keys matched, 4 unmatched" in message
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q" in message


MALFORMED = {
    "lora rank": {"lora_up.weight": r(8, 2), "lora_down.weight": r(3, 8)},
    "lora transposed": {"lora_up.weight": r(2, 8), "lora_down.weight": r(8, 2)},
    "lora mid": {
        "lora_up.weight": r(8, 2, 1, 1),
        "lora_mid.weight": r(3, 2, 1, 1),
        "lora_down.weight": r(2, 8, 1, 1),
    },
    "loha halves": {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 8), "hada_w2_a": r(4, 2), "hada_w2_b": r(2, 16)},
    "lokr size": {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 2), "lokr_w2_b": r(2, 8)},
    "full size": {"diff": r(8, 4)},
    "dora size": {"lora_up.weight": r(8, 2), "lora_down.weight": r(2, 8), "dora_scale": r(1, 4)},
    "diff_b size": {"diff": r(8, 8), "diff_b": r(4)},
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_shapes_are_refused(tree, tmp_path, case):
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k"  # Linear(8, 8)
    sd = {f"{key}.{suffix}": t for suffix, t in MALFORMED[case].items()}
    with pytest.raises(LoraError, match=f"0 of {len(sd)} keys matched, {len(sd)} unmatched"):
        load(tree, sd, tmp_path)


def test_nothing_applicable_is_refused(tree, tmp_path):
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    with pytest.raises(LoraError, match="0 of 2 keys matched"):
        load(tree, {f"{key}.lora_up.weight": r(6, 2), f"{key}.lora_down.weight": r(2, 6)}, tmp_path)


UNSUPPORTED = {  # OFT and GLoRA, which A1111 loads and this extension does not apply
    "lora_unet_output_blocks_3_1_proj_in.oft_blocks": r(4, 2, 2),
    "lora_unet_output_blocks_3_1_proj_in.alpha": torch.tensor(1.0),
    **{f"lora_unet_input_blocks_1_1_proj_out.{k}.weight": r(2, 8) for k in ("a1", "a2", "b1", "b2")},
}


def test_unsupported_module_types_are_skipped_with_one_warning(tree, tmp_path, caplog):
    sd, expected = kohya_ldm(tree)
    with caplog.at_level(logging.WARNING, logger="delta_sampling"):
        adapter = load(tree, sd | UNSUPPORTED, tmp_path)
    assert set(adapter.module_names) == set(expected)
    assert adapter.report.skipped_types == 6 and adapter.report.unmatched == 0
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "6 keys of module types this extension does not apply were skipped" in warnings[0]
    assert "oft_blocks (2 keys)" in warnings[0] and "a1.weight+a2.weight+b1.weight+b2.weight (4 keys)" in warnings[0]


def test_a_file_of_only_unsupported_types_is_refused(tree, tmp_path):
    with pytest.raises(LoraError, match=r"0 of 6 keys matched, 0 unmatched, 6 keys of unsupported module types"):
        load(tree, UNSUPPORTED, tmp_path)


class OpenClipBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: packed q/k/v in an nn.MultiheadAttention, mlp c_fc / c_proj."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 2 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def openclip_tree(root: str) -> tuple[nn.Module, nn.Module]:
    """A UNet plus an OpenCLIP text encoder at `root` (SDXL's second encoder, or SD2's only one)."""
    torch.manual_seed(0)
    leaves = {k: v for k, v in sd15_leaves().items() if not k.startswith("cond_stage_model")}
    blocks = nn.Sequential(OpenClipBlock(6), OpenClipBlock(6))
    return build_tree({**leaves, f"{root}.model.transformer.resblocks": blocks}), blocks


@pytest.mark.parametrize(("root", "prefix"), [("conditioner.embedders.1", "lora_te2_"), ("cond_stage_model", "lora_te_")])
def test_openclip_text_encoder_keys_apply_like_a1111(tmp_path, root, prefix):
    """SDXL's second / SD2's text encoder: q/k/v go into rows of the packed in_proj_weight, out_proj into the
    attention's own projection (its forward reads the weight, never calls the Linear), fc1/fc2 into c_fc/c_proj."""
    tree, blocks = openclip_tree(root)
    sd, expected = kohya_ldm(tree)
    ref_model = reference(tree, expected, 0.6)
    ref_blocks = ref_model.get_submodule(f"{root}.model.transformer.resblocks")
    for i, block in enumerate(ref_blocks):
        for name, rows, param in [("self_attn_q_proj", 0, "in_proj_weight"), ("self_attn_k_proj", 1, "in_proj_weight"),
                                  ("self_attn_v_proj", 2, "in_proj_weight"), ("self_attn_out_proj", None, "out_proj"),
                                  ("mlp_fc1", None, "c_fc"), ("mlp_fc2", None, "c_proj")]:
            weight = {"in_proj_weight": block.attn.in_proj_weight, "out_proj": block.attn.out_proj.weight,
                      "c_fc": block.mlp.c_fc.weight, "c_proj": block.mlp.c_proj.weight}[param]
            out = 6 if rows is not None else weight.shape[0]
            up, down = r(out, 2), r(2, weight.shape[1])
            key = f"{prefix}text_model_encoder_layers_{i}_{name}"
            sd |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(1.0)}
            with torch.no_grad():
                (weight if rows is None else weight[6 * rows : 6 * rows + 6]).add_(0.6 * 0.5 * up @ down)
    adapter = load(tree, sd, tmp_path, 0.6)
    assert adapter.report.matched == len(sd) - 1 and adapter.report.skipped_text_encoder == 0  # all but bundle_emb
    params = dict(tree.named_parameters())
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        want, plain = ref_blocks(x), blocks(x)
        with adapter.enabled():
            got = blocks(x)
            unet_got = run_all(tree)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2
    unet_want = run_all(ref_model)
    assert all(torch.allclose(unet_got[n], unet_want[n], atol=1e-5) for n in expected)
    assert_untouched(tree, params)
    torch.testing.assert_close(blocks(x), plain)


def test_read_safetensors_errors(tmp_path):
    with pytest.raises(LoraError, match="not found"):
        read_safetensors(str(tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(LoraError, match="not a valid safetensors file"):
        read_safetensors(str(corrupt))
    ckpt = tmp_path / "adapter.ckpt"
    torch.save({"x": torch.zeros(1)}, str(ckpt))
    with pytest.raises(LoraError, match=r"Only \.safetensors"):
        read_safetensors(str(ckpt))


# ---------------------------------------------------------------- LyCORIS as an independent reference


@pytest.fixture(scope="module")
def lycoris():
    return pytest.importorskip("lycoris.functional")


def lycoris_delta(lf, fmt: str, sd: Tensors, tree: nn.Module) -> tuple[str, torch.Tensor]:
    """(module, dW before the multiplier) as lycoris.functional computes it (torch backend)."""
    if fmt == "lora_cp":
        key = "lora_unet_middle_block_0_in_layers_2"
        down, up, mid = (sd[f"{key}.lora_{k}.weight"] for k in ("down", "up", "mid"))
        return U + "middle_block.0.in_layers.2", lf.locon.diff_weight(down, up, mid, backend="torch")
    if fmt == "loha":  # lycoris order: w1d, w1u, w2d, w2u, t1, t2
        h = {
            k: sd.get(f"lora_unet_input_blocks_1_0_out_layers_3.hada_{k}")
            for k in ("w1_a", "w1_b", "w2_a", "w2_b")
        }
        dw = lf.loha.diff_weight(
            h["w1_b"], h["w1_a"], h["w2_b"], h["w2_a"], None, None, gamma=0.5, backend="torch"
        )
        return U + "input_blocks.1.0.out_layers.3", dw
    if fmt == "loha_tucker":
        h = {
            k: sd[f"lora_unet_output_blocks_5_2_conv.hada_{k}"]
            for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        }
        dw = lf.loha.diff_weight(
            h["w1_b"], h["w1_a"], h["w2_b"], h["w2_a"], h["t1"], h["t2"], backend="torch"
        )
        return U + "output_blocks.5.2.conv", dw
    if fmt == "lokr":  # gamma is alpha here: lycoris divides by the rank itself
        key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
        f = [sd.get(f"{key}.lokr_{k}") for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
        return ATTN + "attn1.to_out.0", lf.lokr.diff_weight(*f, gamma=1.0, backend="torch")
    key, name = "lora_unet_input_blocks_1_1_proj_out", U + "input_blocks.1.1.proj_out"  # dora
    rebuilt = lf.locon.diff_weight(
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], None, gamma=0.5, backend="torch"
    )
    merged = lf.general.apply_dora_scale(w(tree, name), rebuilt, sd[f"{key}.dora_scale"], 1.0)
    return name, merged - w(tree, name)


@pytest.mark.parametrize("fmt", ["lora_cp", "loha", "loha_tucker", "lokr", "dora"])
def test_matches_lycoris_functional(tree, tmp_path, lycoris, fmt):
    sd, _ = FORMATS[fmt](tree)
    name, delta = lycoris_delta(lycoris, fmt, sd, tree)
    merged, _ = load(tree, sd, tmp_path, 0.6).merged_weight(name)
    assert torch.allclose(merged, w(tree, name) + 0.6 * delta.reshape(merged.shape), atol=1e-6)
