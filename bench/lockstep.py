"""The worker side of a lockstep benchmark (bench/dpo.py, bench/ppo.py): each side runs in its own
subprocess and does one timed unit of work only when the driver says "go", so the sides never
compete for the cores and see the same background load."""

from __future__ import annotations

import os
import time


class Gate:
    """Worker side of the lockstep: wait for "go" before a step, report its seconds after it.

    The driver lets one side run one step at a time, alternating, so both sides see the same
    background load and never compete with each other for the cores.
    """

    def __init__(self, cmd_fd: int, reply_fd: int):
        self.cmd = os.fdopen(cmd_fd, "r")
        self.reply = os.fdopen(reply_fd, "w", buffering=1)
        self.t0 = 0.0
        self.times: list[float] = []

    def begin(self) -> None:
        self.reply.write("ready\n")
        if self.cmd.readline().strip() != "go":
            raise SystemExit("driver went away")
        self.t0 = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self.t0
        self.times.append(dt)
        self.reply.write(f"done {dt}\n")
