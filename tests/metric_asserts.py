"""What the evaluation tests compare a written metrics file against."""

import numpy as np
import pytest


def assert_metrics_equal(written: dict, expected: dict) -> None:
    """``written`` (a metrics.json ``metrics`` entry: NaN stored as null) holds exactly ``expected``'s metrics."""
    assert set(written) == set(expected)
    for name, value in expected.items():
        if np.isnan(value):
            assert written[name] is None or np.isnan(written[name]), name
        else:
            assert written[name] == pytest.approx(value, abs=1e-9), name
