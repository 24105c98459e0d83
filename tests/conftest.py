from pathlib import Path

import pytest

from vlmlab.determinism import pin

REPO = Path(__file__).resolve().parents[1]
# Tests run some stages in-process (runpy): pin before any test computes, as each stage does first.
pin()


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


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid side x side 1-bit PNG of ~50 KB: over PIL's decompression-bomb limit (2 x 89.5 M pixels),
    written row by row so the test never holds the 50 MB of pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row = zlib.compressobj(9), b"\0" * (1 + side // 8)   # filter byte + packed pixels
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def simulate_raw(root: Path, params: dict) -> dict:
    """The tiny world's sets under `root` as `prepare` makes them (seed folder root/seed, imported into
    root/raw; world-only sets in root/world). Returns the world's counts, "raw" included."""
    from vlmlab.sim.seed_import import simulate_and_import

    counts, raw = simulate_and_import(root / "seed", root / "world", root / "raw", params, workers=1)
    return {"raw": raw["samples"], **counts}


def imports_in(tree, package: str):
    """(module, imported names) of every import statement in an `ast` tree, at any depth (lazy ones too),
    relative imports resolved against `package`: `import a.b` -> ("a.b", []), `from . import c` -> (package, ["c"])."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(filter(None, [*parts, mod]))
            yield mod, [a.name for a in node.names]
