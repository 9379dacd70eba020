"""The two kernels every metric rests on: grouped histogram sums and the class-dimension argmax."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medjdt.metrics._argmax import class_max
from medjdt.metrics._binning import grouped_sums


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    groups=st.integers(1, 4),
    n=st.sampled_from([1, 7, 4095, 4096, 4097, 9000]),
    n_keys=st.integers(1, 12),
    masked=st.booleans(),
)
def test_grouped_sums_match_bincount(seed, groups, n, n_keys, masked):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, n_keys, (groups, 2, n), generator=g)
    values = torch.rand(groups, 2, n, generator=g, dtype=torch.float64)
    valid = torch.rand(groups, 1, n, generator=g) < 0.6 if masked else None
    out = grouped_sums(keys.clone().int(), n_keys, (values.float(), values), valid)
    assert out.shape == (3, groups, 2, n_keys) and out.dtype == torch.float64
    for a in range(groups):
        for b in range(2):
            keep = valid[a, 0] if masked else torch.ones(n, dtype=torch.bool)
            k, v = keys[a, b][keep], values[a, b][keep]
            torch.testing.assert_close(out[0, a, b], torch.bincount(k, minlength=n_keys).double(), rtol=0, atol=0)
            reference = torch.bincount(k, weights=v, minlength=n_keys).double()
            torch.testing.assert_close(out[2, a, b], reference)
            torch.testing.assert_close(out[1, a, b], reference, rtol=1e-6, atol=1e-6)  # float32 values


def test_grouped_sums_stay_accurate_beyond_float32_running_sums():
    # 2**25 float32 values of 0.1 in one bin. A float32 running sum (one index_add_ slot) stalls near 2**21;
    # the blocked sum stays within the float32 rounding of the block sums.
    n = 2**25
    values = torch.full((1, n), 0.1)
    exact = n * values[0, 0].double().item()
    running = torch.zeros(1).index_add_(0, torch.zeros(n, dtype=torch.long), values[0]).item()
    assert abs(running - exact) / exact > 0.1
    out = grouped_sums(torch.zeros(1, n, dtype=torch.int32), 1, (values,))
    assert out[0, 0, 0].item() == n
    assert abs(out[1, 0, 0].item() - exact) / exact < 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), num_classes=st.integers(1, 6), levels=st.integers(1, 4))
def test_class_max_matches_torch_max_with_ties(seed, num_classes, levels):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values make ties frequent; torch.max returns the first maximal index.
    x = torch.randint(0, levels, (2, num_classes, 50), generator=g).float() / levels
    values, indices = class_max(x)
    expected = x.max(dim=1)
    torch.testing.assert_close(values, expected.values)
    torch.testing.assert_close(indices, expected.indices)
    torch.testing.assert_close(indices, x.argmax(dim=1))
