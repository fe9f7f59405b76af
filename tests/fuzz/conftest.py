"""Fixtures of the fuzz tests: the three model services as real child processes on loopback.

Each service runs `rlhf serve <service>` in its own process (so its memory can be read from
/proc/<pid>/status), on the tiny models of tests/conftest.py, with an admin token set. The three
start side by side; the fixture waits until each one's health says SERVING.

`FUZZ_REPORT` collects what each fuzz test tried (cases per target, statuses seen, memory), printed
at the end of the session (`-s` shows it; it is also written to $RLHF_FUZZ_REPORT when set).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from helpers import ADMIN_TOKEN

FUZZ_REPORT: dict[str, dict] = {}


@dataclass
class Services:
    policy: object  # rlhf.procs.ServiceProcess
    reward: object
    reference: object

    def by_name(self, service: str):
        return {"PolicyService": self.policy, "RewardService": self.reward,
                "ReferenceService": self.reference}[service]


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(scope="session")
def fuzz_services(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    from rlhf.procs import start_service

    logs = tmp_path_factory.mktemp("fuzz-logs")
    store = tmp_path_factory.mktemp("fuzz-store")
    env = {**os.environ, "RLHF_ADMIN_TOKEN": ADMIN_TOKEN, "RLHF_TORCH_THREADS": "1",
           "RLHF_STORE_DIR": str(store), "RLHF_DRAIN_GRACE_S": "1"}
    specs = [("policy", tiny_policy_dir), ("reward", tiny_reward_dir), ("reference", tiny_policy_dir)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(start_service, name, ["--model", str(model), "--metrics-port", "0"],
                               logs / f"{name}.log", env=env) for name, model in specs]
    try:
        yield Services(*[f.result() for f in futures])
    finally:
        with ThreadPoolExecutor(3) as pool:  # SIGTERM all three at once, each drains alone
            for f in futures:
                if f.exception() is None:
                    pool.submit(f.result().stop)


def pytest_sessionfinish(session, exitstatus):
    if not FUZZ_REPORT:
        return
    text = json.dumps(FUZZ_REPORT, indent=1, sort_keys=True, default=str)
    print("\nfuzz report:\n" + text)
    path = os.environ.get("RLHF_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
