"""The controller's table of workers and its dispatch policies, free of HTTP so it is easy to test.

A worker is live while its heartbeats keep arriving within `expiry_s`; expired workers are dropped
whenever the table is read, so `/list_models` never shows a worker that stopped beating.
Shortest-queue dispatch counts each address it hands out as one more queued request until the
worker's next heartbeat says otherwise, so a burst of clients spreads over the workers instead of
all landing on the one that looked idle at the last beat. A request naming a conversation goes to
the worker that answered the conversation's earlier turns while that worker lives, because the
conversation's history (and its cache) lives in that worker's engine.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from omni_serve.serve.protocol import WorkerStatus
from omni_serve.serve.settings import DispatchMethod


@dataclass
class WorkerInfo:
    name: str  # the worker's base URL
    model_names: list[str]
    speed: int = 1
    queue_length: int = 0
    check_heart_beat: bool = True
    last_beat: float = 0.0
    registered_at: float = 0.0


@dataclass
class WorkerRegistry:
    expiry_s: float
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    workers: dict[str, WorkerInfo] = field(default_factory=dict)
    on_expire: Callable[[WorkerInfo], None] = lambda info: None
    max_conversations: int = 10_000
    conversations: OrderedDict[str, str] = field(default_factory=OrderedDict)  # conversation id -> worker

    def register(self, name: str, status: WorkerStatus, check_heart_beat: bool = True) -> WorkerInfo:
        now = self.clock()
        info = WorkerInfo(name=name, model_names=list(status.model_names), speed=max(1, status.speed),
                          queue_length=status.queue_length, check_heart_beat=check_heart_beat,
                          last_beat=now, registered_at=now)
        self.workers[name] = info
        return info

    def heartbeat(self, name: str, queue_length: int) -> bool:
        """Record a beat; False when the worker is unknown (it must register again)."""
        self._expire()
        info = self.workers.get(name)
        if info is None:
            return False
        info.queue_length = queue_length
        info.last_beat = self.clock()
        return True

    def remove(self, name: str) -> WorkerInfo | None:
        return self.workers.pop(name, None)

    def live(self) -> list[WorkerInfo]:
        self._expire()
        return list(self.workers.values())

    def models(self) -> list[str]:
        return sorted({model for info in self.live() for model in info.model_names})

    def choose(self, model: str, method: DispatchMethod, conversation_id: str | None = None) -> WorkerInfo | None:
        """The worker that should take the next request for `model`, or None when none serves it."""
        candidates = [info for info in self.live() if model in info.model_names]
        if not candidates:
            return None
        if conversation_id is not None:
            sticky = self.workers.get(self.conversations.get(conversation_id, ""))
            chosen = sticky if sticky in candidates else self._pick(candidates, method)
            self.conversations[conversation_id] = chosen.name
            self.conversations.move_to_end(conversation_id)
            while len(self.conversations) > self.max_conversations:
                self.conversations.popitem(last=False)
            return chosen
        return self._pick(candidates, method)

    def _pick(self, candidates: list[WorkerInfo], method: DispatchMethod) -> WorkerInfo:
        if method == "lottery":
            chosen = self.rng.choices(candidates, weights=[info.speed for info in candidates])[0]
        else:
            best = min(info.queue_length / info.speed for info in candidates)
            chosen = self.rng.choice([info for info in candidates if info.queue_length / info.speed == best])
        chosen.queue_length += 1  # until the next heartbeat reports the real number
        return chosen

    def _expire(self) -> None:
        deadline = self.clock() - self.expiry_s
        for name, info in list(self.workers.items()):
            if info.check_heart_beat and info.last_beat < deadline:
                del self.workers[name]
                self.on_expire(info)
