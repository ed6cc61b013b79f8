"""Fixtures of the end-to-end tests: the real SmolLM2 and calibration blocks, loaded once per session."""

import pytest

import slmkit


@pytest.fixture(scope="session")
def reference(smollm2_path):
    """The dense float32 SmolLM2-135M-Instruct (tests deep-copy it before changing it)."""
    return slmkit.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def calib(reference):
    """16 × 256 calibration tokens of the embedded corpus."""
    return slmkit.calib_data(reference, n=16, seq_len=256)
