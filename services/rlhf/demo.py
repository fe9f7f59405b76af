"""`rlhf demo` — the main job on the embedded default: the whole RLHF loop, locally.

1. make a tiny policy and reward model (random init, local tokenizer), publish the policy as the
   first version of a model in the store and the registry;
2. start the three services (the policy follows the registry) and a Celery trainer worker;
3. measure the preferred behaviour in the policy's own samples (does it say "banana"?);
4. push synthetic preference pairs (chosen responses open with "banana") to the Redis stream;
5. submit a DPO job (reference log-probs from the ReferenceService) that publishes and activates
   a new policy version, while a client keeps generating;
6. the policy service swaps to the new version without failing a request; measure again, print
   the figures and plot them to a PNG.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REDIS_URL = "redis://127.0.0.1:6379/0"
TARGET = "banana"
OTHERS = "apple cherry lemon grape mango melon peach plum pear lime".split()
FILLER = ("the a my your red blue green big small old new on in with today really very yes please "
          "thanks cat dog book song cake park game house").split()
NAMES = "Alice Bob Carol Dave Eve Frank Grace Henry Ivy Jack".split()
NOUNS = "cat dog book song cake park game story house train".split()
POLL_S = 0.25


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """The same response opening with "banana" (chosen) or with another fruit (rejected)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = [r.choice(FILLER) for _ in range(r.randint(2, 5))]
        out.append({"prompt": f"{r.choice(NAMES)} asked about the {r.choice(NOUNS)}:",
                    "chosen": " " + " ".join([TARGET] + words) + ".",
                    "rejected": " " + " ".join([r.choice(OTHERS)] + words) + "."})
    return out


def preferred_rate(client, prompts: list[str], *, n: int = 4, seed: int = 7) -> tuple[float, str]:
    """Share of the policy's own samples (temperature 1) that say " banana", and the version."""
    from rlhf_client import SamplingParams

    res = client.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed), n=n)
    hits = sum(TARGET in c.text for c in res.completions)
    return hits / len(res.completions), res.model.version


class _Generator(threading.Thread):
    """Keeps generating while the loop runs; records which version answered, and any failure."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target = target
        self.stop = threading.Event()
        self.log: list[tuple[float, str]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        from rlhf_client import PolicyClient, RpcError, SamplingParams

        t0 = time.monotonic()
        with PolicyClient(self.target, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    res = c.generate(["Alice asked about the cake:"], SamplingParams(max_new_tokens=8))
                    self.log.append((time.monotonic() - t0, res.model.version))
                except RpcError as exc:
                    self.failures.append(str(exc))


def _plot(path: Path, before: float, after: float, versions: list[tuple[float, str]], job_at: tuple[float, float],
          failed: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(["before DPO", "after DPO"], [before * 100, after * 100], color=["#999999", "#2a7ab9"])
    a.set_ylabel('samples saying "banana" (%)')
    a.set_title("preferred behaviour in the policy's own samples")
    for x, v in enumerate((before, after)):
        a.text(x, v * 100 + 1, f"{v:.0%}", ha="center")
    names = sorted({v for _, v in versions})
    b.scatter([t for t, _ in versions], [names.index(v) for _, v in versions], s=6)
    b.set_yticks(range(len(names)), names)
    b.axvspan(*job_at, color="#f2c14e", alpha=0.3, label="DPO job running")
    b.set_xlabel("seconds")
    b.set_title(f"version that answered each request ({failed} failed)")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import ServiceProcess, free_port, start_service
    from rlhf_client import PolicyClient, QueueProducer, RewardClient, TrainingClient
    from rlhf_client.registry import Registry

    console = Console()
    run_id = uuid.uuid4().hex[:6]
    work: Path = args.workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    store_dir, logs = work / "store", work / "logs"
    model_name, stream = f"demo-policy-{run_id}", f"rlhf:demo:{run_id}:preferences"
    registry = Registry.from_url(REDIS_URL)
    started: list[ServiceProcess] = []
    worker: subprocess.Popen | None = None

    with console.status("making tiny models (Qwen2 policy + reward, local tokenizer)…"):
        policy_src = make_tiny_model("policy", work / "src" / "policy", seed=0)
        reward_dir = make_tiny_model("reward", work / "src" / "reward", seed=0)
        first = ModelStore(store_dir).publish(model_name, policy_src, kind="policy",
                                              probes=compute_probes("policy", policy_src))
        registry.register(model_name, first.version, first.created)
        registry.activate(model_name, first.version)
    console.print(f"[green]✓[/] {model_name} {first.version} published and active (store {store_dir})")

    try:
        env = {**os.environ, "RLHF_SWAP_POLL_S": "1", "RLHF_TORCH_THREADS": "1"}
        with console.status("starting PolicyService, RewardService, ReferenceService…"):
            common = ["--metrics-port", "0", "--redis-url", REDIS_URL]
            policy = start_service("policy", ["--model-name", model_name, "--store", str(store_dir), *common],
                                   logs / "policy.log", env=env)
            started.append(policy)
            reward = start_service("reward", ["--model", str(reward_dir), *common], logs / "reward.log", env=env)
            started.append(reward)
            reference = start_service("reference", ["--model", str(policy_src), *common],
                                      logs / "reference.log", env=env)
            started.append(reference)
        console.print(f"[green]✓[/] services SERVING: policy {policy.target}, reward {reward.target}, "
                      f"reference {reference.target}")
        worker_log = (logs / "worker.log").open("w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "worker", "--store", str(store_dir), "--redis-url", REDIS_URL,
             "--metrics-port", str(free_port()), "--hostname", f"demo-{run_id}@%h"],
            stdout=worker_log, stderr=subprocess.STDOUT, env=env)
        console.print("[green]✓[/] Celery trainer worker started")

        eval_prompts = [p["prompt"] for p in synthetic_pairs(24, seed=101)]
        with PolicyClient(policy.target) as pc, RewardClient(reward.target) as rc:
            before, v_before = preferred_rate(pc, eval_prompts)
            sample = pc.generate(eval_prompts[:4]).completions
            rewards = rc.score([(eval_prompts[c.prompt_index], c.text or " ") for c in sample]).rewards
        console.print(f"before: {before:.0%} of {v_before}'s samples say {TARGET!r}; "
                      f"reward model scores {['%.3f' % r for r in rewards]}")

        pairs = synthetic_pairs(args.pairs, seed=1)
        producer = QueueProducer.from_url(REDIS_URL)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=console, transient=True) as bar:
            task = bar.add_task("pushing preference pairs", total=len(pairs))
            for p in pairs:
                producer.push_pair(stream=stream, source="synthetic", **p)
                bar.advance(task)
        console.print(f"[green]✓[/] {len(pairs)} preference pairs pushed to {stream}")

        load = _Generator(policy.target)
        load.start()
        t_submit = time.monotonic()
        training = TrainingClient(REDIS_URL)
        job_id = training.submit_dpo(
            model_name=model_name, source={"type": "stream", "stream": stream, "group": f"dpo-{run_id}"},
            reference={"source": "service", "target": reference.target}, loss_type="sigmoid", beta=0.05,
            learning_rate=2e-3, batch_size=16, max_length=64, epochs=4, eval_fraction=0.2, activate=True,
            min_eval_accuracy=0.8)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(f"DPO job {job_id[:8]}", total=1.0, stage="queued")
            while True:
                rec = training.status(job_id)
                bar.update(task, completed=rec.progress or 0.0, stage=rec.status)
                if rec.status in ("succeeded", "failed"):
                    break
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited ({worker.returncode}); see {logs / 'worker.log'}")
                time.sleep(POLL_S)
        t_done = time.monotonic()
        if rec.status != "succeeded":
            console.print(f"[red]DPO job failed:[/] {rec.error}")
            return 1
        m = rec.metrics
        console.print(f"[green]✓[/] DPO job published {rec.version}: held-out implicit-reward accuracy "
                      f"{m.get('eval_accuracy_initial', 0):.2f} → {m.get('eval_accuracy', 0):.2f}")
        with PolicyClient(policy.target) as pc, console.status("waiting for the policy service to swap…"):
            while pc.get_model().model.version != rec.version:
                time.sleep(POLL_S)
            swapped_at = time.monotonic()
            while not any(v == rec.version for _, v in load.log[-3:]):  # the client sees it too
                time.sleep(POLL_S)
            load.stop.set()
            load.join()
            after, v_after = preferred_rate(pc, eval_prompts)

        table = Table(title="the RLHF loop, end to end")
        table.add_column("")
        table.add_column(v_before, justify="right")
        table.add_column(v_after, justify="right")
        table.add_row(f"samples saying {TARGET!r}", f"{before:.0%}", f"{after:.0%}")
        table.add_row("held-out implicit-reward accuracy", f"{m.get('eval_accuracy_initial', 0):.2f}",
                      f"{m.get('eval_accuracy', 0):.2f}")
        console.print(table)
        served = {v for _, v in load.log}
        console.print(f"while training and swapping: {len(load.log)} requests, {len(load.failures)} failed, "
                      f"versions served {sorted(served)}; swap visible {swapped_at - t_done:.1f}s after the job")
        png = work / "demo.png"
        _plot(png, before, after, load.log, (0.0, t_done - t_submit), len(load.failures))
        console.print(f"[green]✓[/] plot: {png}")
        ok = after > before and not load.failures and served == {v_before, v_after}
        return 0 if ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        for svc in reversed(started):
            svc.stop()
