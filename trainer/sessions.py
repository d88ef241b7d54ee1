"""The one session store: training sessions that outlive a single queue run.

A ComfyUI user queues the same workflow again to continue training, presses Cancel and queues to
resume, or chains two Train nodes. The session (weights, optimizer state, step, history) must
survive between those executions, keyed by the Train node that owns it. This module is its only
owner; nothing else keeps sessions.

A session is reused only while its fingerprint (model, dataset, settings) is unchanged; anything
else starts a new one, and the caller tells the user why.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .loop import Session


@dataclass
class Entry:
    session: Session
    fingerprint: dict[str, str]  # part name -> hash of what the session was built from
    target_step: int  # where the last run was heading; a Cancel leaves step < target_step
    started_at: float = 0.0  # wall-clock start of the session, for the file's metadata


class SessionStore:
    def __init__(self):
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._entries[key] = entry

    def release(self, key: str) -> bool:
        """Forget a session (its node was deleted, or the user restarted): frees its memory."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)


STORE = SessionStore()


def next_target(entry: Entry, steps: int) -> int:
    """An interrupted run is finished first; a finished one is extended by `steps`."""
    if entry.session.step < entry.target_step:
        return entry.target_step
    return entry.session.step + steps
