"""Fixtures for the Kubernetes runtime tests: a fake API server serving the chart's CRDs."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakeapi import FakeApiServer

CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "csi-virtvol" / "crds"


@pytest.fixture
def fake_api() -> Iterator[FakeApiServer]:
    with FakeApiServer(crd_dir=CRD_DIR) as api:
        yield api


@pytest.fixture
def client(fake_api: FakeApiServer) -> Iterator[Any]:
    from csi_virtvol.kube.crdstore import api_client

    c = api_client(host=fake_api.url)
    yield c
    c.close()
