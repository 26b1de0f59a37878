"""Skip bookkeeping: each item counted once, the summary, the empty-source error."""
from __future__ import annotations

from condistill.data.skips import EmptySourceError, SkipItem, SourceStats


def test_source_stats_counts_each_key_once_and_summarises():
    stats = SourceStats(name="demo")
    stats.observe("a", ["rgba"])
    stats.observe("a", ["rgba"])  # a second epoch does not double count
    stats.observe("b", skipped=SkipItem("corrupt", "bad header"))
    assert (stats.seen, stats.yielded) == (2, 1)
    assert stats.converted["rgba"] == 1 and stats.skipped["corrupt"] == 1
    text = stats.summary()
    assert "1 of 2 items used" in text and "rgba=1" in text and "corrupt=1" in text and "b: bad header" in text


def test_empty_error_names_the_skips_the_advice_and_the_hint():
    stats = SourceStats(name="demo")
    assert str(stats.empty_error()) == "demo is empty: it contains no items."
    stats.error("corrupt_shard", "s.tar: bad")
    assert str(stats.empty_error("Shards read: 1.")) == (
        "demo is empty: no item could be read; errors: corrupt_shard=1. Example corrupt_shard: s.tar: bad. Shards read: 1."
    )
    stats = SourceStats(name="demo")
    stats.observe("a", skipped=SkipItem("too_small", "8x8 is below min_size=16"))
    stats.observe("b", skipped=SkipItem("odd"))
    error = stats.empty_error()
    assert isinstance(error, EmptySourceError) and isinstance(error, ValueError)
    assert str(error) == (
        "demo is empty: all 2 items were skipped (odd=1, too_small=1). To fix: lower min_size or use larger "
        "images. Example odd: b. Example too_small: a: 8x8 is below min_size=16."
    )
