"""The in-place KV cache holds exactly what transformers' concatenating DynamicLayer holds,
through buffer growth, row selection, cropping and repetition; caches it cannot stand in for
are left as they are."""

from __future__ import annotations

import torch
from torch.testing import assert_close
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from peftlab.models.growing_cache import GrowingLayer, cache_layers, growing, growing_cache


def _kv(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 3,
                                                                       generator=g)


def _same(ours: GrowingLayer, theirs: DynamicLayer) -> None:
    assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
    assert_close(ours.values, theirs.values, rtol=0, atol=0)
    assert ours.get_seq_length() == theirs.get_seq_length()


def test_growing_layer_matches_dynamic_layer_through_growth_select_crop_repeat():
    prompt = _kv(3, 5, seed=0)
    theirs = DynamicLayer()
    theirs.update(*prompt)
    ours = GrowingLayer(*prompt, spare=2)
    room = ours._k.shape[-2]
    for step in range(6):  # past the spare room: the buffers double
        new = _kv(3, 1, seed=10 + step)
        k, v = ours.update(*new)
        theirs.update(*new)
        assert_close(k, theirs.keys, rtol=0, atol=0)
        assert_close(v, theirs.values, rtol=0, atol=0)
    assert ours._k.shape[-2] > room and ours.get_seq_length() == 11
    two_tokens = _kv(3, 2, seed=20)  # a chunk of several positions at once
    ours.update(*two_tokens)
    theirs.update(*two_tokens)
    _same(ours, theirs)

    index = torch.tensor([2, 0])
    ours.batch_select_indices(index)
    theirs.batch_select_indices(index)
    _same(ours, theirs)
    ours.crop(-3)
    theirs.crop(-3)
    _same(ours, theirs)
    after_crop = _kv(2, 1, seed=30)  # writes where the cropped positions were
    assert_close(ours.update(*after_crop)[0], theirs.update(*after_crop)[0], rtol=0, atol=0)
    ours.batch_repeat_interleave(2)
    theirs.batch_repeat_interleave(2)
    _same(ours, theirs)
    assert ours.keys.shape[0] == 4


def test_growing_converts_a_prefilled_cache_and_keeps_sliding_windows():
    layers = [_kv(2, 4, seed=i) for i in range(3)]
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    grown = growing(cache)
    assert all(isinstance(layer, GrowingLayer) for layer in grown.layers)
    assert grown.get_seq_length() == 4
    for (k, v), (gk, gv) in zip(layers, cache_layers(grown), strict=True):
        assert_close(gk, k, rtol=0, atol=0)
        assert_close(gv, v, rtol=0, atol=0)
    step = _kv(2, 1, seed=9)
    keys, _ = grown.update(*step, 1)
    assert_close(keys, torch.cat([layers[1][0], step[0]], dim=-2), rtol=0, atol=0)
    assert growing_cache(layers).get_seq_length() == 4

    sliding = DynamicCache()
    sliding.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    assert growing(sliding) is sliding  # its own rules for which positions it keeps
