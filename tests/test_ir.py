import numpy as np
import pytest

from fxmerge.analysis.permute import PermutationSampler
from fxmerge.analysis.ir import (
    Concat, Dep, Dim, IRConflict, as_product, find, make_dep, pin, resolve, split_dim, unify,
)


def test_unify_shares_root_and_pin_propagates():
    a, b, c = Dim(4), Dim(4), Dim(4)
    unify(a, b)
    assert find(a) is find(b)
    pin(c)
    unify(b, c)
    assert find(a).pinned


def test_size_mismatch_conflicts():
    with pytest.raises(IRConflict):
        unify(Dim(3), Dim(4))


def test_concats_with_different_boundaries_refine_to_common_cuts():
    x, y = Dim(6), Dim(6)
    px = split_dim(x, [2])  # [2 | 4]
    py = split_dim(y, [4])  # [4 | 2]
    unify(x, y)
    parts = find(x).structure.parts
    assert [p.size for p in parts] == [2, 2, 2]
    assert find(px[0]) is find(parts[0]) and find(py[1]) is find(parts[2])


def test_product_seen_as_concat_pins_block_order():
    d = Dim(6)
    p = as_product(d, 3)
    e = Dim(6)
    split_dim(e, [2, 4])
    unify(d, e)
    assert find(p.outer).pinned
    assert isinstance(find(d).structure, Concat)


def test_product_permutation_moves_blocks_with_their_own_inner_permutation():
    d = Dim(12)
    p = as_product(d, 3)  # 3 blocks of 4
    s = PermutationSampler(np.random.default_rng(1))
    idx = s.index(d)
    blocks = np.arange(12).reshape(3, 4)
    outer = s.index(p.outer)
    for new_block in range(3):
        old_block = outer[new_block]
        inner = s.index(p.inners[old_block])
        assert list(idx[new_block * 4:(new_block + 1) * 4]) == list(blocks[old_block][inner])
    assert sorted(idx) == list(range(12))


def test_pinned_dims_are_identity_and_others_are_not():
    a, b = Dim(5), Dim(5, pinned=True)
    s = PermutationSampler(np.random.default_rng(0))
    assert not np.array_equal(s.index(a), np.arange(5))
    assert np.array_equal(s.index(b), np.arange(5))


def test_dep_resolution_and_uniform_collapse():
    h = Dim(2)
    d0, d1 = Dim(3), Dim(3)
    dep = make_dep(h, [d0, d1])
    assert isinstance(dep, Dep)
    assert resolve(dep, h, 1) is d1
    assert make_dep(h, [d0, d0]) is d0  # uniform: a plain dim
    x = Dim(3)
    unify(dep, x)  # a dependent axis tied to an independent one: all entries agree
    assert find(d0) is find(d1) is find(x)
