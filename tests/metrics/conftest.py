"""The digits classifier, trained once per test session (or loaded from the user's cache)."""

from __future__ import annotations

import pytest

from ditlab.metrics.features import DigitsClassifier, digits_classifier


@pytest.fixture(scope="session")
def digits_features() -> DigitsClassifier:
    return digits_classifier()
