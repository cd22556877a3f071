"""A mixed step's segments are checked the same way by the torch slot cache and the torch-free one,
and both keep (truncate) and copy (copy_prefix) a slot's positions the same way."""

from __future__ import annotations

import pytest

from bitnet158 import native
from bitnet158.cache import SlotKVCache
from bitnet158.config import ModelConfig
from bitnet158.errors import ConfigError

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                  max_seq_len=16)
BAD = [
    ([], "distinct slots"),
    ([(0, 1), (0, 2)], "distinct slots"),
    ([(1, 0)], "at least one token"),
    ([(3, 1)], r"slots must lie in \[0, 3\), got \[3\]"),
    ([(-1, 1)], r"slots must lie in \[0, 3\)"),
]


def caches():
    yield SlotKVCache(CFG, 3, 8)
    if native.extension_available():
        from bitnet158.runtime import NativeSlotCache

        yield NativeSlotCache(CFG, 3, 8)


@pytest.mark.parametrize("segments,message", BAD)
def test_bad_segments_are_one_line_errors(segments, message):
    for cache in caches():
        with pytest.raises(ConfigError, match=message):
            cache.bind_rows(segments)


def test_a_segment_past_the_cache_is_refused_before_the_forward():
    for cache in caches():
        cache.lengths[1] = 6
        with pytest.raises(ConfigError, match="exceed the KV cache length 8"):
            binding = cache.bind_rows([(0, 2), (1, 3)])
            if hasattr(binding, "positions"):  # the torch binding checks when the forward asks where rows go
                binding.positions(5)
        assert cache.bind_rows([(0, 2), (1, 2)]).rows == 4


def test_truncate_and_copy_prefix_keep_and_copy_positions():
    for cache in caches():
        tables = cache.kv_tables()
        assert len(tables) == 2 * CFG.num_layers
        for i, table in enumerate(tables):
            table[1, :, :6] = i + 1.0  # slot 1 holds 6 positions
        cache.lengths[1] = 6
        cache.copy_prefix(1, 2, 4)
        assert cache.lengths == [0, 6, 4]
        for i, table in enumerate(tables):
            assert (table[2, :, :4] == i + 1.0).all() and (table[2, :, 4:] == 0).all()
            assert (table[1, :, :6] == i + 1.0).all()  # the lender keeps its own
        cache.truncate(1, 2)
        assert cache.lengths == [0, 2, 4]
        with pytest.raises(ConfigError, match="slot 1 holds 2 positions; cannot copy 3"):
            cache.copy_prefix(1, 0, 3)
        with pytest.raises(ConfigError, match="cannot keep 5"):
            cache.truncate(2, 5)
        with pytest.raises(ConfigError, match="from itself"):
            cache.copy_prefix(2, 2, 1)
