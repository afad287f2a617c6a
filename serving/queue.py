"""Admission to the engine: as many requests as it has KV slots, plus a bounded waiting line (429 beyond it)."""

from __future__ import annotations

import threading
from collections import deque

from core.errors import ScalpelError


class QueueFull(ScalpelError):
    status = 429
    type = "rate_limit_error"


class ShuttingDown(ScalpelError):
    status = 503
    type = "server_error"


class Ticket:
    __slots__ = ()


class FairQueue:
    def __init__(self, max_waiting: int = 16, running: int = 1):
        self.max_waiting = max_waiting
        self.running = running  # requests the engine runs at once (its KV slots)
        self._lock = threading.Lock()
        self._line: deque[Ticket] = deque()
        self._closed = False

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._line)

    def reserve(self) -> Ticket:
        """Take a place in line now, so a full line is refused before any response has started."""
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down", code="shutting_down")
            if len(self._line) >= self.running + self.max_waiting:
                raise QueueFull(
                    f"{len(self._line) - self.running} requests are already waiting (limit {self.max_waiting}); "
                    "retry later",
                    code="queue_full",
                )
            ticket = Ticket()
            self._line.append(ticket)
            return ticket

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket in self._line:
                self._line.remove(ticket)

    def close(self) -> None:
        with self._lock:
            self._closed = True
