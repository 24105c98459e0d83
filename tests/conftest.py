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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and lose a lot when the 2 cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
