"""The source pair's batching: rows like A1111's CFG denoiser, dict (SDXL) conds, long prompts, skipped uncond."""

from __future__ import annotations

import torch

from lib_delta.delta import combine_cfg
from lib_delta.source import Branch, ModelCache

X = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
SIGMA = torch.tensor([2.0, 2.0])
CONDS_LIST = [[(0, 1.0), (1, 0.5)], [(2, 1.0)]]  # image 0 has an AND sub-prompt


def recording_model(calls):
    def model_fn(x, sigma, cond):
        calls.append((x.shape[0], cond))
        vector = cond["vector"] if isinstance(cond, dict) else cond.mean(1)
        return x * sigma.view(-1, 1, 1, 1) + vector[:, :1, None, None]

    return model_fn


def test_dict_conds_are_batched_cond_rows_then_uncond_rows():
    cond = {"crossattn": torch.randn(3, 77, 8), "vector": torch.arange(3.0)[:, None].repeat(1, 5)}
    uncond = {"crossattn": torch.randn(2, 77, 8), "vector": torch.full((2, 5), -1.0)}
    calls = []
    out = Branch(recording_model(calls), lambda step: (CONDS_LIST, cond, uncond)).denoise(X, SIGMA, 0, 4.0, False)
    (rows, batched), = calls
    assert rows == 5 and batched["vector"][:, 0].tolist() == [0.0, 1.0, 2.0, -1.0, -1.0]
    x_in = torch.cat([X[0:1], X[0:1], X[1:2], X])
    expected = combine_cfg(x_in * 2.0 + batched["vector"][:, :1, None, None], CONDS_LIST, 4.0)
    torch.testing.assert_close(out, expected)


def test_different_token_lengths_run_cond_and_uncond_separately():
    calls = []
    cond, uncond = torch.randn(3, 154, 8), torch.randn(2, 77, 8)
    Branch(recording_model(calls), lambda step: (CONDS_LIST, cond, uncond)).denoise(X, SIGMA, 0, 4.0, False)
    assert [c[0] for c in calls] == [3, 2]


def test_skipped_uncond_uses_the_first_cond_row_at_scale_one():
    calls = []
    cond, uncond = torch.randn(3, 77, 8), torch.randn(2, 77, 8)
    out = Branch(recording_model(calls), lambda step: (CONDS_LIST, cond, uncond)).denoise(X, SIGMA, 0, 9.0, True)
    assert [c[0] for c in calls] == [3]
    rows = torch.cat([X[0:1], X[0:1], X[1:2]]) * 2.0 + cond.mean(1)[:, :1, None, None]
    expected = combine_cfg(torch.cat([rows, rows[[0, 2]]]), CONDS_LIST, 1.0)
    torch.testing.assert_close(out, expected)


def test_model_cache_is_lru_and_releases_evicted_entries():
    released = []
    cache = ModelCache(capacity=2, release=released.append)
    for key in ("a", "b", "a", "c"):
        cache.get(key, lambda key=key: key.upper())
    assert list(cache.entries) == ["a", "c"] and released == ["B"] and cache.loads == 3
    cache.clear()
    assert released == ["B", "A", "C"] and not cache.entries


def test_cfg_one_runs_only_the_cond_rows():
    calls = []

    def model_fn(x, sigma, cond):
        calls.append(x.shape[0])
        return x * 0 + cond.mean()

    cond, uncond = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    branch = Branch(model_fn, lambda step: ([[(0, 1.0)], [(1, 1.0)]], cond, uncond))
    out = branch.denoise(torch.zeros(2, 4, 2, 2), torch.ones(2), step=0, scale=1.0, skip_uncond=False)
    assert calls == [2] and torch.equal(out, torch.ones(2, 4, 2, 2))
    branch.denoise(torch.zeros(2, 4, 2, 2), torch.ones(2), step=0, scale=5.0, skip_uncond=False)
    assert calls == [2, 4]
