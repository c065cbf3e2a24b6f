"""Raw kernel keys -> small integers, a whole poll's records at once.

Why: the agent looks up every burst record's flow. A Python dict keyed by the
record's 40 key bytes costs a bytes object, a hash and a probe per record
(about 3 µs a record with what hangs off it), which alone takes a core at
250,000 records/s. :class:`KeyIndex` is an open-addressing hash table kept in
numpy arrays: a poll's keys go in as one bytes buffer, their 64-bit words are
hashed and probed as array operations (linear probing, one vectorised step per
probe distance, at most half full), and only keys never seen before leave numpy.

It is a cache beside the dict the flow view keeps (:class:`~iqn_ctl.live.flows.LiveFlows`):
entries are only added, or all dropped at once (:meth:`clear`), so it never
disagrees with that dict (tests/test_keyindex.py holds it to a dict on random
keys, colliding hashes included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
_MUL = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93,
                 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5, 0x85EBCA77C2B2AE63], np.uint64)
_INITIAL = 1024


def words(keys: Sequence[bytes] | bytes, width: int) -> U64:
    """Keys of ``width`` bytes (a sequence, or already joined) as rows of
    little-endian 64-bit words, zero-padded to a whole word."""
    buf = keys if isinstance(keys, bytes) else b"".join(keys)
    n = len(buf) // width if width else 0
    a = np.frombuffer(buf, np.uint8).reshape(n, width)
    pad = -width % 8
    if pad:
        a = np.concatenate((a, np.zeros((n, pad), np.uint8)), axis=1)
    return np.ascontiguousarray(a).view("<u8")  # type: ignore[no-any-return]


def fingerprints(w: U64) -> U64:
    """A 64-bit hash of each row of words: each word times its own odd
    constant, xor-folded, then a finaliser (splitmix64's) so the low bits used
    for the table's position depend on every byte."""
    mul = np.resize(_MUL, w.shape[1])
    with np.errstate(over="ignore"):
        h = np.bitwise_xor.reduce(w * mul, axis=1)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h  # type: ignore[no-any-return]


class KeyIndex:
    """Fixed-width byte keys -> int values, looked up a batch at a time.
    ``hasher`` replaces :func:`fingerprints` (tests force collisions with it)."""

    def __init__(self, width: int, hasher: Callable[[U64], U64] = fingerprints) -> None:
        if width < 1:
            raise ValueError("key width must be >= 1")
        self.width = width
        self._nw = (width + 7) // 8
        self._hash = hasher
        self.clear()

    def clear(self) -> None:
        """Forget every key (the table shrinks back to its first size)."""
        self._table = np.full(_INITIAL, -1, np.int64)  # position -> entry, -1: empty
        self._keys = np.zeros((_INITIAL // 2, self._nw), np.uint64)  # entry -> key words
        self._vals = np.zeros(_INITIAL // 2, np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def fits(self, keys: Sequence[bytes]) -> bool:
        """Whether every key is ``width`` bytes (else the caller looks them up another way)."""
        return not keys or min(map(len, keys)) == max(map(len, keys)) == self.width

    def lookup(self, keys: Sequence[bytes] | U64) -> I64:
        """Each key's value, -1 for keys not in the index; ``keys`` all
        ``width`` bytes long (:meth:`fits`), or their :func:`words`."""
        w = keys if isinstance(keys, np.ndarray) else words(keys, self.width)
        e = self.lookup_entries(w)
        return np.where(e >= 0, self._vals[np.maximum(e, 0)], -1)

    def add(self, keys: Sequence[bytes] | U64, values: Sequence[int] | I64) -> None:
        """Map each key (``width`` bytes, or rows of :func:`words`) to its
        value; a key already there gets the new value. Vectorised like
        :meth:`lookup`: a poll's new keys cost a few array operations."""
        if isinstance(keys, np.ndarray):
            w = keys
        else:
            if any(len(k) != self.width for k in keys):
                raise ValueError(f"keys must be {self.width} bytes long")
            w = words(keys, self.width)
        vals = np.asarray(values, np.int64)
        if w.shape[0] != vals.size:
            raise ValueError("keys and values differ in length")
        if not vals.size:
            return
        # the last value of a key given twice wins, as in a dict; keys whose hashes all
        # differ are all different, and finding that takes a sort of one word a key, not
        # the sort of whole rows (~1 µs a key: an outage's onset adds 50,000 within one p)
        h = np.sort(self._hash(w))
        if h.size > 1 and not (h[1:] != h[:-1]).all():
            rev = np.unique(w[::-1], axis=0, return_index=True)[1]
            last = np.sort(w.shape[0] - 1 - rev)
            w, vals = w[last], vals[last]
        there = self.lookup_entries(w)
        old = there >= 0
        self._vals[there[old]] = vals[old]
        w, vals = w[~old], vals[~old]
        if not vals.size:
            return
        size = self._table.size
        while 2 * (self._n + vals.size) > size:
            size *= 2
        if size != self._table.size:
            self._grow(size)
        e = np.arange(self._n, self._n + vals.size)
        self._keys[e] = w
        self._vals[e] = vals
        self._n += vals.size
        self._place(e)

    def lookup_entries(self, w: U64) -> I64:
        """Each row of words' entry number, -1 where absent."""
        out = np.full(w.shape[0], -1, np.int64)
        if not self._n or not w.shape[0]:
            return out
        mask = np.uint64(self._table.size - 1)
        pos = self._hash(w) & mask
        todo = np.arange(w.shape[0])
        while todo.size:
            e = self._table[pos.astype(np.int64)]
            filled = e >= 0
            todo, pos, e = todo[filled], pos[filled], e[filled]  # an empty position: not there
            hit = (self._keys[e] == w[todo]).all(axis=1)
            out[todo[hit]] = e[hit]
            miss = ~hit
            todo, pos = todo[miss], (pos[miss] + np.uint64(1)) & mask
        return out

    def _grow(self, size: int) -> None:
        keys = np.zeros((size // 2, self._nw), np.uint64)
        keys[: self._n] = self._keys[: self._n]
        vals = np.zeros(size // 2, np.int64)
        vals[: self._n] = self._vals[: self._n]
        self._keys, self._vals = keys, vals
        self._table = np.full(size, -1, np.int64)
        self._place(np.arange(self._n))

    def _place(self, todo: I64) -> None:
        """Put entries ``todo`` (keys already stored) into empty positions,
        linear probing from each one's hash; every position an entry passes is
        taken, so a lookup from the hash finds it before any empty one."""
        mask = np.uint64(self._table.size - 1)
        pos = self._hash(self._keys[todo]) & mask
        while todo.size:
            p = pos.astype(np.int64)
            free = np.flatnonzero(self._table[p] < 0)
            # of several entries wanting one free position, the first takes it
            first = np.unique(p[free], return_index=True)[1]
            took = free[first]
            self._table[p[took]] = todo[took]
            placed = np.zeros(todo.size, np.bool_)
            placed[took] = True
            todo, pos = todo[~placed], (pos[~placed] + np.uint64(1)) & mask
