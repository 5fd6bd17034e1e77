"""Rank 0's background writer: outputs are encoded (PNG, MP4) and written on one thread, so that
in a batch the next decode overlaps with writing the previous output."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

DEPTH = 2  # outputs the writer holds: the one being written and one queued behind it


class Writer:
    """Runs writes in order on one background thread, holding at most ``depth`` of them.

    A failed write's error is raised by the next :meth:`make_room`, :meth:`submit` or :meth:`flush`.
    """

    def __init__(self, depth: int = DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"a writer holds at least one output, got depth {depth}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaepar-writer")
        self._pending: deque[Future[None]] = deque()

    def make_room(self) -> None:
        """Wait until fewer than ``depth`` writes are pending; raise the first failed write's error."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()

    def submit(self, write: Callable[[], None]) -> None:
        """Queue ``write``, first waiting for room if ``depth`` writes are pending."""
        if len(self._pending) >= self.depth:
            self.make_room()
        self._pending.append(self._pool.submit(write))

    def flush(self) -> None:
        """Wait for every pending write; raise the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Let the pending writes finish, then end the thread. Their failures are not raised
        (:meth:`flush` does that): close runs when the job has already failed, or after a flush."""
        self._pending.clear()
        self._pool.shutdown(wait=True)
