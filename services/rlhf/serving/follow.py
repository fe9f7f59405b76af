"""Following the registry: a service started with `--model-name NAME` serves NAME's active
version and swaps whenever it changes — on the registry's event, with a periodic poll as the
fallback for a missed event (a dropped pub/sub connection loses messages).

A version whose swap failed is not retried until the registry names another one, so a bad
version costs one refusal, not a refusal every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis
from rlhf_client.redis_conn import connect_async

from rlhf.errors import ServiceError
from rlhf.serving.swap import Swapper
from rlhf_client.registry import EVENTS_CHANNEL, Registry

log = logging.getLogger(__name__)


class RegistryFollower:
    def __init__(self, swapper: Swapper, redis_url: str, name: str, poll_s: float):
        self.swapper = swapper
        self.redis_url = redis_url
        self.name = name
        self.poll_s = poll_s
        self.refused: str | None = None  # last version whose swap failed
        self._registry = Registry.from_url(redis_url)
        self._tasks: list[asyncio.Task] = []
        self._sync_lock = asyncio.Lock()

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._poll())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []

    async def sync(self, event: dict | None = None) -> None:
        """Swap to the registry's active version when it differs from the one serving.

        `event`: the registry event that woke us (its `time` goes into the swap's breakdown when
        it names the version the registry holds active)."""
        async with self._sync_lock:
            try:
                active = await asyncio.to_thread(self._registry.active, self.name)
            except redis.RedisError as exc:
                log.warning("registry unreachable: %s", exc)
                return
            current = self.swapper.target.info.ref.version
            if active is None or active == current or active == self.refused:
                return
            try:
                event_time = None
                if event and event.get("version") == active and isinstance(event.get("time"), (int, float)):
                    event_time = float(event["time"])
                result = await self.swapper.load_version(active, event_time=event_time)
                self.refused = None
                log.info("following %s: now serving %s (%.2fs)", self.name, result.current.version, result.seconds)
            except ServiceError as exc:
                self.refused = active
                log.error("following %s: version %s refused, %s keeps serving: %s",
                          self.name, active, current, exc.message)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.sync()

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            client = connect_async(self.redis_url, decode_responses=True, blocking=True)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS_CHANNEL)
                    backoff = 0.5
                    await self.sync()  # whatever changed while we were not subscribed
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        try:
                            event = json.loads(message["data"])
                        except (TypeError, ValueError):
                            continue
                        if isinstance(event, dict) and event.get("name") == self.name:
                            await self.sync(event)
            except (redis.RedisError, OSError) as exc:
                log.warning("registry events lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                await client.aclose()
