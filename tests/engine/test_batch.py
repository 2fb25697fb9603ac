import numpy as np
import pytest

from adaserve_jax.engine.batch import FlatBatch, Move, Segment


def test_tree_segment_layout():
    # root(0) -> 1 -> 3 ; root -> 2
    tree = Segment(
        slot=1, ctx_len=10, tokens=np.array([5, 6, 7, 8]), parents=np.array([-1, 0, 0, 1])
    )
    chain = Segment.chain(slot=0, ctx_len=0, tokens=[1, 2, 3])
    b = FlatBatch.build([chain, tree], (4, 8), (16, 32), moves=[Move(1, 12, 11)], max_moves=2)
    a = b.arrays
    assert b.bucket == 8 and b.attended_len == 16 and b.offsets == (0, 3) and b.num_tokens == 7
    assert a["slot"].tolist() == [0, 0, 0, 1, 1, 1, 1, -1]
    assert a["position"][3:7].tolist() == [10, 11, 11, 12]
    assert a["cache_index"][3:7].tolist() == [10, 11, 12, 13]
    assert a["ctx_len"].tolist()[:7] == [0, 0, 0, 10, 10, 10, 10]
    m = a["tree_mask"]
    assert m[:3, :3].tolist() == np.tril(np.ones((3, 3), bool)).tolist()
    assert m[6, 3:7].tolist() == [True, True, False, True]  # node 3 sees root, 1, itself
    assert m[5, 3:7].tolist() == [True, False, True, False]
    assert not m[3:7, :3].any() and not m[:3, 3:7].any()  # requests never see each other
    assert m[7, 7]  # padding sees itself only
    assert a["move_slot"].tolist() == [1, -1]


def test_bucket_overflow_errors():
    seg = Segment.chain(0, 0, list(range(9)))
    with pytest.raises(ValueError, match="largest token bucket"):
        FlatBatch.build([seg], (4, 8), (16,))
    with pytest.raises(ValueError, match="largest context bucket"):
        FlatBatch.build([Segment.chain(0, 20, [1])], (4,), (16,))


def test_segment_validation():
    bad = Segment(0, 0, np.array([1, 2]), np.array([-1, 1]))
    with pytest.raises(ValueError, match="no cycles"):
        bad.validate(vocab_size=10, num_slots=2, max_len=8)
    with pytest.raises(ValueError, match="cache rows"):
        Segment.chain(0, 7, [1, 2]).validate(10, 2, 8)
    with pytest.raises(ValueError, match="token ids"):
        Segment.chain(0, 0, [10]).validate(10, 2, 8)
