"""Session-wide fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kit import TinyKit, build_tiny_kit

# The App over a temporary models folder, with the scripted fake loader (engine tests).
pytest_plugins = ["tests.engine_fixtures"]


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory: pytest.TempPathFactory) -> TinyKit:
    """The tiny HF folder + f32/Q8_0 GGUF kit, built once per test session (a few seconds)."""
    return build_tiny_kit(tmp_path_factory.mktemp("tiny_kit"))


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): on 2
    shared cores more threads spin-wait on each other (FACTS.md)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
