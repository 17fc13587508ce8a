"""WeightedSampler: draws follow the weights, and sums stay exact under any sequence of updates."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keypool._sampler import WeightedSampler


def build(weights: list[int]) -> WeightedSampler:
    sampler = WeightedSampler()
    for w in weights:
        sampler.append(w)
    return sampler


def chi_square(observed: list[int], weights: list[int]) -> float:
    n = sum(observed)
    total = sum(weights)
    stat = 0.0
    for o, w in zip(observed, weights, strict=True):
        if w == 0:
            assert o == 0
            continue
        expected = n * w / total
        stat += (o - expected) ** 2 / expected
    return stat


def test_draws_follow_the_weights() -> None:
    weights = [1000, 2000, 3000, 4000, 0, 500]
    sampler = build(weights)
    rng = random.Random(1234)
    counts = [0] * len(weights)
    for _ in range(50_000):
        index = sampler.draw(rng)
        assert index is not None
        counts[index] += 1
    assert counts[4] == 0
    # 5 degrees of freedom: the 99.9 % quantile is 20.5
    assert chi_square(counts, weights) < 20.5


def test_draws_follow_the_weights_after_updates() -> None:
    sampler = build([5] * 20)
    rng = random.Random(99)
    weights = [5] * 20
    for i in range(0, 20, 3):
        weights[i] = 0
        sampler.set(i, 0)
    weights[1] = 40
    sampler.set(1, 40)
    counts = [0] * 20
    for _ in range(40_000):
        index = sampler.draw(rng)
        assert index is not None
        counts[index] += 1
    nonzero = sum(1 for w in weights if w) - 1
    assert nonzero == 12
    # 12 degrees of freedom: the 99.9 % quantile is 32.9
    assert chi_square(counts, weights) < 32.9


def test_empty_and_all_zero_draw_nothing() -> None:
    rng = random.Random(0)
    assert WeightedSampler().draw(rng) is None
    sampler = build([0, 0, 0])
    assert sampler.total == 0
    assert sampler.draw(rng) is None
    sampler.set(2, 1)
    assert {sampler.draw(rng) for _ in range(20)} == {2}


def test_negative_weight_is_refused() -> None:
    sampler = build([1])
    with pytest.raises(ValueError, match="weight"):
        sampler.set(0, -1)
    with pytest.raises(ValueError, match="weight"):
        sampler.append(-5)
    assert sampler.weight(0) == 1


def test_find_covers_each_range_exactly() -> None:
    weights = [3, 0, 1, 0, 0, 4, 2]
    sampler = build(weights)
    expected = [i for i, w in enumerate(weights) for _ in range(w)]
    assert [sampler.find(t) for t in range(sampler.total)] == expected


def test_many_keys_stay_exact() -> None:
    rng = random.Random(5)
    weights = [rng.randrange(0, 5000) for _ in range(10_000)]
    sampler = build(weights)
    for _ in range(50_000):
        i = rng.randrange(len(weights))
        w = rng.randrange(0, 5000)
        weights[i] = w
        sampler.set(i, w)
    assert sampler.total == sum(weights)
    prefix = list(itertools.accumulate(weights))
    for _ in range(2000):
        target = rng.randrange(sampler.total)
        assert sampler.find(target) == bisect.bisect_right(prefix, target)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 1_000_000)),
        st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 1_000_000)),
        st.tuples(st.just("zero"), st.integers(0, 10_000)),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(initial=st.lists(st.integers(0, 50), max_size=40), operations=ops, seed=st.integers(0, 2**32))
def test_matches_a_brute_force_reference(
    initial: list[int], operations: list[tuple[object, ...]], seed: int
) -> None:
    sampler = build(initial)
    weights = list(initial)
    for op in operations:
        if op[0] == "append":
            w = int(op[1])  # type: ignore[call-overload]
            assert sampler.append(w) == len(weights)
            weights.append(w)
        elif weights:
            i = int(op[1]) % len(weights)  # type: ignore[call-overload]
            w = 0 if op[0] == "zero" else int(op[2])  # type: ignore[call-overload]
            sampler.set(i, w)
            weights[i] = w
        assert len(sampler) == len(weights)
        assert sampler.total == sum(weights)
    assert [sampler.weight(i) for i in range(len(weights))] == weights
    prefix = list(itertools.accumulate(weights))
    total = sum(weights)
    rng = random.Random(seed)
    targets = {0, total - 1, *(rng.randrange(total) for _ in range(50))} if total else set()
    for target in targets:
        index = sampler.find(target)
        assert index == bisect.bisect_right(prefix, target)
        assert weights[index] > 0
    drawn = sampler.draw(rng)
    assert (drawn is None) == (total == 0)
    if drawn is not None:
        assert weights[drawn] > 0
