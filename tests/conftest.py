from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real-format fixture slices in ../shared/fixtures (see its README)."""
    for base in (REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures"):
        if base.is_dir():
            return base
    pytest.skip("../shared/fixtures is absent: real-format fixture tests need it")
