"""The identity check's arithmetic (``pipeline_data.check.gain_and_margin``) on hand-made similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_data.check import gain_and_margin


@pytest.mark.parametrize(
    ("S", "gain", "margin"),
    [
        # base row, then each identity's generator row; column j = identity j's held-out photos
        ([[0.5, 0.5], [0.7, 0.6], [0.4, 0.9]], [0.2, 0.4], [0.3, 0.3]),
        ([[0.2, 0.3, 0.1], [0.2, 0.3, 0.1], [0.2, 0.3, 0.1], [0.2, 0.3, 0.1]], [0, 0, 0], [0, 0, 0]),
        ([[0.0, 0.0, 0.0], [0.9, 0.0, 0.3], [0.1, 0.8, 0.3], [0.5, 0.2, 0.6]], [0.9, 0.8, 0.6], [0.6, 0.7, 0.3]),
    ],
)
def test_gain_is_own_minus_base_and_margin_is_own_minus_the_other_generators(S, gain, margin) -> None:
    g, m, own = gain_and_margin(np.asarray(S, dtype=np.float64))
    np.testing.assert_allclose(g, gain, atol=1e-12)
    np.testing.assert_allclose(m, margin, atol=1e-12)
    np.testing.assert_allclose(own, np.diag(np.asarray(S)[1:]), atol=0)
