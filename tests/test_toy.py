"""bench/toy.py in --quick mode: trained models, real DS transfer, exact shortcuts exact, outputs written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import toy  # noqa: E402
import toy_models as tm  # noqa: E402
from torch.func import functional_call  # noqa: E402

from lib_delta.lora import LoraAdapter  # noqa: E402


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    return toy.run(["--quick", "--seed", "0", "--out", str(tmp_path_factory.mktemp("toy"))])


def out_dir(res) -> Path:
    return Path(res.out)


def test_outputs_are_written(res):
    out = out_dir(res)
    for name in ("toy.md", "toy_chart.png", "toy_grid.png", "toy_errors.json", "toy_models.pt"):
        assert (out / name).stat().st_size > 0, name
    errors = json.loads((out / "toy_errors.json").read_text())
    assert errors["exact"] == 0.0 and set(errors) >= {"balanced", "fast", "custom: reuse=2"}
    md = (out / "toy.md").read_text()
    assert "## lambda sweep" in md and "## Fast modes" in md and "## Auto strength" in md


def test_lambda_zero_is_plain_bit_for_bit(res):
    zero = res.sweep[0.0]
    assert torch.equal(zero.x, res.plain.x)
    assert zero.run.applied_steps == 0 and zero.run.source_calls == 0


def test_lambda_one_moves_the_target_toward_a_prime(res):
    plain, one = (res.refs.measure(s.img, None) for s in (res.plain, res.sweep[1.0]))
    assert plain.yellow == 0.0  # the target never saw yellow
    assert one.fd_a2 < 0.7 * plain.fd_a2, (plain.fd_a2, one.fd_a2)  # quick run: about 0.5x
    assert one.yellow >= 0.25, one.yellow  # quick run: about 0.4
    assert one.fd_a > plain.fd_a  # and away from A


def test_transfer_grows_with_lambda_then_breaks(res):
    ms = {lam: res.refs.measure(s.img, res.plain.img) for lam, s in res.sweep.items()}
    shifts = [ms[lam].shift for lam in sorted(ms)]
    assert shifts == sorted(shifts)  # the samples move further with every lambda step
    best = min(ms, key=lambda lam: ms[lam].fd_a2)
    assert 0.5 <= best <= 4.0 and ms[8.0].fd_a2 > 2 * ms[best].fd_a2  # too large a lambda overshoots A'
    assert ms[8.0].out > ms[1.0].out  # and saturates


def test_batched_pair_equals_separate_passes(res):
    batched, separate = res.modes["exact"], res.modes["custom: batched=False"]
    assert batched.run.settings.knob("batched") and not separate.run.settings.knob("batched")
    assert torch.equal(batched.x, separate.x)
    assert res.errors["custom: batched=False"] == 0.0


def test_sampling_is_deterministic(res):
    again = res.toy.sample(toy.ds(1.0))
    assert torch.equal(again.x, res.sweep[1.0].x)


def test_fast_modes_are_measured_against_exact(res):
    for name in ("balanced", "fast", "custom: reuse=2", "custom: native_size=True", "custom: cond_only=True"):
        assert 0.0 < res.errors[name] < 3.0, (name, res.errors[name])
        assert res.modes[name].run.settings.speed in ("balanced", "fast", "custom")
    assert res.modes["custom: reuse=2"].run.source_calls == math.ceil(res.toy.rc.steps / 2)


def test_auto_strength_evens_out_a_weak_and_a_strong_pair(res):
    fixed, _ = toy.shift_ratio(res, "fixed")
    auto, _ = toy.shift_ratio(res, "auto")
    assert fixed > 1.8  # the x0.3 LoRA moves the samples much less at the same lambda
    assert abs(math.log(auto)) < 0.5 * abs(math.log(fixed)), (fixed, auto)


def test_the_kohya_lora_is_the_trained_lora(res):
    """LoraAdapter on the exported keys reproduces the training forward (W + up @ down, alpha = rank)."""
    base, sd = res.toy.trained.base, res.toy.trained.lora
    merged = dict(base.diffusion_model.named_parameters())
    for path, module in tm.lora_modules(base).items():
        key = tm.kohya_key(path)
        up, down = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"]
        w = module.weight
        merged[f"{path}.weight"] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (
            float(sd[f"{key}.alpha"]) / down.shape[0])
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0.1, 1.0, 5.0, 20.0])
    cond = tm.one_hot(torch.tensor([0, 1, 2, tm.NULL]))
    adapter = LoraAdapter.from_state_dict(sd, base, 1.0)
    with torch.no_grad():
        with adapter.enabled():
            via_adapter = base(x, sigma, cond)
        c_skip, c_out, c_in = base.scalings(sigma)
        direct = c_skip * x + c_out * functional_call(base.diffusion_model, merged, (x * c_in, sigma.log() / 4, cond))
        plain = base(x, sigma, cond)
    torch.testing.assert_close(via_adapter, direct, rtol=1e-4, atol=1e-5)
    assert float((via_adapter - plain).abs().max()) > 1e-2


def test_a_rerun_loads_the_cached_models(res):
    cache = out_dir(res) / "toy_models.pt"
    trained, cached = tm.load_or_train(res.toy.cfg, cache)
    assert cached
    for a, b in ((trained.base, res.toy.trained.base), (trained.target, res.toy.trained.target)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
