"""Session-wide fixtures shared by every test module."""

from __future__ import annotations

import pytest

from tests.kit import TinyKit, build_tiny_kit

# The App over a temporary models folder, with the scripted fake loader (engine tests).
pytest_plugins = ["tests.engine_fixtures"]


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory) -> TinyKit:
    """The tiny HF folder + f32/Q8_0 GGUF kit, built once per test session (a few seconds)."""
    return build_tiny_kit(tmp_path_factory.mktemp("tiny_kit"))
