"""Shared-memory blocks that carry request batches to worker processes.

The front writes each request's batch once into a block of a
:class:`SharedBatchPool`; every worker maps the block by name (once, then keeps
the mapping) and reads the batch in place. Blocks are reused across requests,
so the hot path creates no segment and pickles no array.

Names are ``colocate_<pid>_<random>_<n>``: unique per executor, created with
owner-only permissions (``0600``, Python's default for POSIX shared memory), and
all unlinked by :meth:`SharedBatchPool.close`. Python's resource tracker also
unlinks them should the serving process die without closing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import threading
from collections import OrderedDict
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from colocate.ensemble import Array
from colocate.errors import InvalidInputError

_MIN_BLOCK_BYTES = 4096
_MIB = 1 << 20
_SHM_DIR = "/dev/shm"


def _capacity(nbytes: int) -> int:
    """Block size for ``nbytes``: whole pages, at least one."""
    pages = max(1, -(-nbytes // _MIN_BLOCK_BYTES))
    return pages * _MIN_BLOCK_BYTES


def _check_room(size: int, in_use: int) -> None:
    """Refuse a block that /dev/shm has no room for (writing past a full tmpfs kills with SIGBUS)."""
    try:
        stats = os.statvfs(_SHM_DIR)
    except (OSError, AttributeError):
        return  # no /dev/shm to ask (not Linux): let the OS decide
    free = stats.f_bavail * stats.f_frsize
    if size > free:
        raise InvalidInputError(
            f"shared memory ({_SHM_DIR}) has {free / _MIB:.1f} MiB free, but the next request's batch "
            f"needs a block of {size / _MIB:.1f} MiB ({in_use} blocks of this executor in use); "
            f"lower the concurrency or the batch size, or enlarge {_SHM_DIR} (docker: --shm-size)"
        )


class SharedBlock:
    """One shared-memory segment of the pool."""

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self.shm = shm
        self.name: str = shm.name
        self.capacity: int = shm.size

    def view(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
        """A numpy array of ``shape``/``dtype`` over the start of the block."""
        array: Array = np.ndarray(shape, dtype=dtype, buffer=self.shm.buf)
        return array


class SharedBatchPool:
    """A pool of shared-memory blocks for request batches, owned by the serving process.

    Thread-safe. ``acquire`` hands out a free block at least as large as asked
    (creating one when none fits), ``release`` returns it, ``close`` unlinks
    every block the pool ever created and still holds.
    """

    def __init__(self, *, max_free: int = 32) -> None:
        self.prefix = f"colocate_{os.getpid()}_{secrets.token_hex(4)}"
        self._max_free = max_free
        self._lock = threading.Lock()
        self._free: list[SharedBlock] = []
        self._all: dict[str, SharedBlock] = {}
        self._counter = 0
        self._closed = False

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the blocks that exist now (created and not yet unlinked)."""
        with self._lock:
            return tuple(self._all)

    def acquire(self, nbytes: int) -> SharedBlock:
        """A block of at least ``nbytes`` bytes, for one request."""
        with self._lock:
            if self._closed:
                raise InvalidInputError("the shared-memory pool is closed; start a new executor")
            fitting = [b for b in self._free if b.capacity >= nbytes]
            if fitting:
                block = min(fitting, key=lambda b: b.capacity)
                self._free.remove(block)
                return block
            self._counter += 1
            name = f"{self.prefix}_{self._counter}"
            in_use = len(self._all) - len(self._free)
        size = _capacity(nbytes)
        _check_room(size, in_use)
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        block = SharedBlock(shm)
        with self._lock:
            if self._closed:
                _unlink(block)
                raise InvalidInputError("the shared-memory pool is closed; start a new executor")
            self._all[block.name] = block
        return block

    def release(self, block: SharedBlock) -> None:
        """Give ``block`` back once every slot is done with its request."""
        with self._lock:
            if self._closed or block.name not in self._all:
                return
            if len(self._free) < self._max_free:
                self._free.append(block)
                return
            del self._all[block.name]
        _unlink(block)

    def close(self) -> None:
        """Unlink every block (in use or free). Idempotent."""
        with self._lock:
            self._closed = True
            blocks = list(self._all.values())
            self._all.clear()
            self._free.clear()
        for block in blocks:
            _unlink(block)


def _unlink(block: SharedBlock) -> None:
    with contextlib.suppress(BufferError, OSError):
        block.shm.close()
    with contextlib.suppress(FileNotFoundError, OSError):
        block.shm.unlink()


class BlockCache:
    """A worker's mappings of the front's blocks, by name (least recently used dropped first)."""

    def __init__(self, max_blocks: int = 64) -> None:
        self._max = max_blocks
        self._blocks: OrderedDict[str, shared_memory.SharedMemory] = OrderedDict()

    def view(self, name: str, shape: tuple[int, ...], dtype: str) -> Array:
        """The batch in block ``name`` as an array (mapping the block on first use)."""
        shm = self._blocks.get(name)
        if shm is None:
            shm = attach(name)
            self._blocks[name] = shm
            while len(self._blocks) > self._max:
                _, old = self._blocks.popitem(last=False)
                with contextlib.suppress(BufferError, OSError):
                    old.close()
        else:
            self._blocks.move_to_end(name)
        array: Array = np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf)
        return array

    def close(self) -> None:
        """Unmap every block (never unlinks: the front owns them)."""
        for shm in self._blocks.values():
            with contextlib.suppress(BufferError, OSError):
                shm.close()
        self._blocks.clear()


def attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing block without taking ownership of it.

    From Python 3.13 the block is not registered with the resource tracker
    (``track=False``). Before 3.13 attaching registers it again with the
    tracker, which a spawned worker shares with its parent: the registration
    is the same entry and is dropped when the parent unlinks the block.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    return shared_memory.SharedMemory(name=name)


__all__ = ["BlockCache", "SharedBatchPool", "SharedBlock", "attach"]
