"""The agent's overload backlog (issue 19): burst records drained from the
ring and not yet fed to the engine.

Why a backlog in user space: when the agent falls behind, the kernel's ring
fills and the kernel drops the *newest* records. So the agent keeps draining
the ring into this backlog every round and feeds the engine at most a chunk
of its oldest candidates per round. Past its limit (``--backlog``, counted in
candidates) the *oldest* candidates go, counted as shed: when the agent cannot
keep up it keeps the newest data. Shedding drops whole records first, then
the oldest candidates of the next record, so exactly the excess goes.

Sans-I/O: batches in, batches out; the agent logs and counts.
"""

from __future__ import annotations

from collections import deque

from iqn_ctl.live.bursttable import BurstBatch, concat, empty_batch


class Backlog:
    """Burst batches waiting, oldest first, bounded to ``limit`` candidates."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._q: deque[BurstBatch] = deque()
        #: candidates held now, and the most ever held
        self.held = 0
        self.held_max = 0

    def __len__(self) -> int:
        """Candidates waiting."""
        return self.held

    def __bool__(self) -> bool:
        return self.held > 0

    def push(self, batch: BurstBatch) -> int:
        """Add a drained batch; returns how many of the oldest candidates were
        shed to stay within the limit."""
        if len(batch):
            self._q.append(batch)
            self.held += batch.candidates
        over = self.held - self.limit
        shed = 0
        while over > 0 and self._q:
            head = self._q[0]
            c = head.candidates
            if c <= over:
                self._q.popleft()
                cut = c
            else:
                self._q[0] = head.drop_head(over)
                cut = over
            over -= cut
            shed += cut
        self.held -= shed
        self.held_max = max(self.held_max, self.held)
        return shed

    def take(self, chunk: int) -> BurstBatch | None:
        """The oldest records, at most ``chunk`` candidates (at least one record
        whatever its size, so the backlog always shrinks); None when empty."""
        if not self._q:
            return None
        out: list[BurstBatch] = []
        room = chunk
        while self._q and room > 0:
            head = self._q[0]
            c = head.candidates
            if c <= room:
                out.append(self._q.popleft())
                room -= c
                continue
            fits = int((head.count.cumsum() <= room).sum())
            if fits == 0 and out:
                break
            fits = max(fits, 1)
            part = head.select(slice(0, fits))
            self._q[0] = head.select(slice(fits, None))
            out.append(part)
            room -= part.candidates
            break
        got = concat(out) if out else empty_batch(self._q[0].off.shape[1])
        self.held -= got.candidates
        return got

    def oldest(self) -> float | None:
        """The first time (s, CLOCK_MONOTONIC) of the oldest waiting batch's
        records, None when nothing waits: the engine is advanced no further."""
        if not self._q:
            return None
        return float(self._q[0].first.min()) / 1e9
