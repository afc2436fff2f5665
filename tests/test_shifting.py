"""Frame preparation without scipy.signal: the periodic windows and the Wiener prefilter equal
scipy's to rounding (scipy is the independent reference here, imported only by the test)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from scherzer.processing.shifting import wiener_prefilter, window_1d, window_2d


@pytest.mark.parametrize("n", [7, 64, 255, 512])
def test_periodic_windows_equal_scipy(n):
    np.testing.assert_allclose(window_1d(n, "hann"), signal.windows.hann(n, sym=False), atol=1e-12)
    np.testing.assert_allclose(
        window_1d(n, "hamming"), signal.windows.hamming(n, sym=False), atol=1e-12
    )
    for alpha in (0.0, 0.25, 0.5, 1.0):
        np.testing.assert_allclose(
            window_1d(n, "tukey", alpha), signal.windows.tukey(n, alpha, sym=False), atol=1e-12
        )
    assert window_2d((n, 9), "none").shape == (n, 9)


def test_wiener_prefilter_equals_scipy():
    rng = np.random.default_rng(0)
    image = rng.poisson(20.0, size=(64, 80)).astype(np.float64)
    np.testing.assert_allclose(wiener_prefilter(image, 5), signal.wiener(image, (5, 5)), atol=1e-9)
