"""The tests' fp32 comparison: relative to the norm, blind to cancellation, never to a real difference."""
import numpy as np
import pytest
import torch

from tests.numerics import assert_close_rel, rel_err


def test_rounding_on_a_cancelled_element_passes_where_an_elementwise_check_fails():
    expected = torch.tensor([1.0, -1.0, 1e-4])  # the last element: a sum that cancelled
    actual = expected + torch.tensor([0.0, 0.0, 1e-7])  # absolute rounding error of the large summands
    with pytest.raises(AssertionError):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-8)
    assert_close_rel(actual, expected, 1e-5)


def test_wrong_values_shapes_and_nans_fail():
    e = torch.randn(4, 8, dtype=torch.float64)
    a = e.clone()
    a[2, 3] += 1e-3 * e.norm()
    with pytest.raises(AssertionError, match=r"router grad: relative error 1\.0+e-03"):
        assert_close_rel(a, e, 1e-5, "router grad")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_rel(e[:, :4], e, 1e-5)
    nan = e.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close_rel(nan, e, 1e-5)
    with pytest.raises(AssertionError):
        assert_close_rel(e, nan, 1e-5)


def test_zero_and_empty_references():
    assert rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    assert rel_err(torch.tensor([0.0, 1e-30]), torch.zeros(2)) == float("inf")
    assert rel_err(torch.zeros(0, 5), torch.zeros(0, 5)) == 0.0


def test_numpy_floats_and_tensors_mix_in_float64():
    e = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert rel_err(torch.from_numpy(e), e) == 0.0
    assert rel_err(3.0, 3.0 + 3e-6) == pytest.approx(1e-6, rel=1e-5)
