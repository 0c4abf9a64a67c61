"""Fixtures for the data-plane tests: disk images (dense random, sparse, thick-zero), nbdkit servers
over them with optional fault-injection filters, and a check that the real components are installed."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_component
from vmferry.adapters.dataplane import nbdlib
from vmferry.adapters.dataplane.nbdkit import NbdkitCommand, NbdkitFilter, NbdkitServer
from vmferry.adapters.dataplane.sources import LocalSource

MiB = 1 << 20
DISK_SIZE = 32 * MiB
HOW = "run scripts/setup-dataplane (apt installs nbdkit, libnbd-bin, python3-libnbd, qemu-utils)"


@pytest.fixture(scope="session")
def dataplane_tools() -> None:
    """nbdkit, nbdcopy, qemu-img and the libnbd binding, or a failure (CI) / skip (locally)."""
    for tool in ("nbdkit", "nbdcopy", "qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            missing_component(tool, HOW)
    if not nbdlib.available():
        missing_component("the libnbd Python binding (python3-libnbd)", HOW)


@dataclass(frozen=True)
class Images:
    """Source images of DISK_SIZE bytes with known content."""

    dense: Path  # random data everywhere
    sparse: Path  # ~10 % random data, the rest holes
    thick: Path  # same content as sparse, fully allocated (zeroes written out)
    data_bytes: int  # bytes of random data in sparse/thick


def _write_sparse(path: Path, seed: int) -> int:
    generator = random.Random(seed)
    data = 0
    with path.open("wb") as handle:
        handle.truncate(DISK_SIZE)
        offset = 0
        while offset < DISK_SIZE:
            offset += generator.randrange(64, 1024) * 4096  # 4 KiB-aligned, not 64 KiB-aligned
            length = min(generator.randrange(16, 64) * 4096, DISK_SIZE - offset)
            if length <= 0:
                break
            handle.seek(offset)
            handle.write(generator.randbytes(length))
            data += length
            offset += length
    return data


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    folder = tmp_path_factory.mktemp("images")
    dense = folder / "dense.img"
    dense.write_bytes(random.Random(1).randbytes(DISK_SIZE))
    sparse = folder / "sparse.img"
    data = _write_sparse(sparse, seed=2)
    thick = folder / "thick.img"
    thick.write_bytes(sparse.read_bytes())
    return Images(dense=dense, sparse=sparse, thick=thick, data_bytes=data)


ServeFactory = Callable[..., NbdkitServer]


@pytest.fixture
def serve(dataplane_tools: None) -> Iterator[ServeFactory]:
    """Start nbdkit serving a local image (read-only unless told), with filters; stopped afterwards."""
    servers: list[NbdkitServer] = []

    def start(
        path: Path, *filters: NbdkitFilter, readonly: bool = True, verbose: bool = False
    ) -> NbdkitServer:
        command = LocalSource(path, format="raw").nbdkit_command().with_filters(*filters)
        if not readonly:
            command = NbdkitCommand(
                plugin=command.plugin,
                params=command.params,
                description=command.description,
                filters=command.filters,
                readonly=False,
            )
        server = NbdkitServer(command, verbose=verbose)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def blocks_allocated(path: Path) -> int:
    """Bytes the file occupies on disk."""
    return path.stat().st_blocks * 512
