"""The shared-memory pool that carries batches to workers."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from colocate.errors import InvalidInputError
from colocate.execution import _shm
from colocate.execution._shm import BlockCache, SharedBatchPool

from .helpers import shm_left


def test_blocks_are_reused_private_and_unlinked_on_close() -> None:
    pool = SharedBatchPool()
    block = pool.acquire(1000)
    assert block.capacity >= 1000 and block.name.startswith(pool.prefix)
    if os.path.isdir("/dev/shm"):
        assert os.stat(f"/dev/shm/{block.name}").st_mode & 0o077 == 0  # owner only
    view = block.view((10, 25), np.dtype("float32"))
    view[:] = 3.0
    cache = BlockCache()
    assert float(cache.view(block.name, (10, 25), "<f4").sum()) == 750.0  # a worker's mapping
    pool.release(block)
    assert pool.acquire(500).name == block.name  # reused, not created again
    other = pool.acquire(5000)
    assert other.name != block.name and set(pool.names) == {block.name, other.name}
    del view
    cache.close()
    pool.close()
    assert pool.names == () and shm_left(pool.prefix) == []
    with pytest.raises(InvalidInputError, match="closed"):
        pool.acquire(10)


def test_no_room_in_shared_memory_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shm.os, "statvfs", lambda path: SimpleNamespace(f_bavail=1, f_frsize=4096))
    pool = SharedBatchPool()
    with pytest.raises(InvalidInputError, match=r"shared memory .* --shm-size"):
        pool.acquire(1 << 20)
    pool.close()
    assert shm_left(pool.prefix) == []
