"""The model registry in Redis: each model's versions, its active version, and change events.

It lives in the client package (it needs only `redis`), so applications and ops tools manage
versions without torch; the services and the trainer import it from here.

Keys (prefix `rlhf:`):
  models                      set of model names
  model:<name>:versions       sorted set version → publish time
  model:<name>:active         the active version
  model:<name>:history        list of versions that were active before (newest first): rollback
Channel `rlhf:model-events` gets a JSON event on every activation:
  {"name", "version", "previous", "event": "activated"|"rolled_back", "time"}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from rlhf_client.redis_conn import connect

EVENTS_CHANNEL = "rlhf:model-events"
_PREFIX = "rlhf:"


class RegistryError(ValueError):
    """Unknown model or version, or nothing to roll back to."""


@dataclass(frozen=True)
class Activation:
    name: str
    version: str
    previous: str | None
    event: str


class Registry:
    def __init__(self, client: redis.Redis):
        self.r = client

    @classmethod
    def from_url(cls, url: str) -> "Registry":
        return cls(connect(url, decode_responses=True))

    def _k(self, name: str, what: str) -> str:
        return f"{_PREFIX}model:{name}:{what}"

    def register(self, name: str, version: str, created: float | None = None) -> None:
        pipe = self.r.pipeline()
        pipe.sadd(f"{_PREFIX}models", name)
        pipe.zadd(self._k(name, "versions"), {version: created or time.time()})
        pipe.execute()

    def models(self) -> list[str]:
        return sorted(self.r.smembers(f"{_PREFIX}models"))

    def versions(self, name: str) -> list[str]:
        return list(self.r.zrange(self._k(name, "versions"), 0, -1))

    def active(self, name: str) -> str | None:
        return self.r.get(self._k(name, "active"))

    def history(self, name: str) -> list[str]:
        return list(self.r.lrange(self._k(name, "history"), 0, -1))

    def activate(self, name: str, version: str) -> Activation:
        """Make `version` the active one (the previous goes on the rollback history)."""
        if self.r.zscore(self._k(name, "versions"), version) is None:
            raise RegistryError(f"model {name!r} has no registered version {version!r}")
        return self._switch(name, version, "activated", push_previous=True)

    def rollback(self, name: str) -> Activation:
        """Re-activate the version that was active before the current one."""
        current = self.active(name)
        while True:
            previous = self.r.lpop(self._k(name, "history"))
            if previous is None:
                raise RegistryError(f"model {name!r} has no earlier active version to roll back to")
            if previous != current:
                return self._switch(name, previous, "rolled_back", push_previous=False)

    def _switch(self, name: str, version: str, event: str, *, push_previous: bool) -> Activation:
        key = self._k(name, "active")
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    previous = pipe.get(key)
                    pipe.multi()
                    pipe.set(key, version)
                    if push_previous and previous and previous != version:
                        pipe.lpush(self._k(name, "history"), previous)
                    pipe.publish(EVENTS_CHANNEL, json.dumps(
                        {"name": name, "version": version, "previous": previous, "event": event,
                         "time": time.time()}))
                    pipe.execute()
                    return Activation(name, version, previous, event)
                except redis.WatchError:
                    continue
