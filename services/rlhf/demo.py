"""`rlhf demo` — the main job on the embedded default: the whole RLHF loop, locally.

Every `--algo` starts the same way (`_stack`): make a tiny policy and a reward model (local
tokenizer, no download), publish the policy as the first version of a model in the store and
the registry, start the three services (the policy follows the registry) and a Celery trainer
worker. Then:

`--algo dpo` (the default)
  1. measure the preferred behaviour in the policy's own samples (does it say "banana"?);
  2. push synthetic preference pairs (chosen responses open with "banana") to a Redis stream;
  3. submit a DPO job (reference log-probs from the ReferenceService) that publishes and
     activates a new policy version, while a client keeps generating;
  4. the policy service swaps to the new version without failing a request; measure again,
     print the figures and plot them to a PNG.

`--algo ppo` / `--algo grpo`
  the reward model is first trained (Bradley–Terry, the trainer's own function) on the same
  banana pairs; a rollout worker (`rlhf rollout`) answers prompts from a prompts stream with n
  samples each, scored by the RewardService and with reference log-probs from the
  ReferenceService, pushed to a samples stream; each iteration pushes fresh prompts, submits one
  PPO job (critic initialised from the reward model) or GRPO job (group baseline) that trains on
  those samples and activates its version, and waits for the policy service to hot-swap to it.
  It prints the mean score and KL to the reference per iteration, measures held-out prompts
  before and after, and plots the curves to PNGs.

`--algo loop`
  the same stack runs ONE `iterate` job (`rlhf loop`): rounds of online DPO labelled by the
  reward model, each round's version served and evaluated (rlhf.loop_demo).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    from rlhf.plots import pyplot, save_figure

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(11, 4))
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
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

ALGOS = ("dpo", "ppo", "grpo", "loop")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's own flags on `rlhf demo`'s parser (`--workdir`, `--pairs` and `--debug` are
    the CLI's): which algorithm closes the loop, and the size of the RL loop."""
    parser.add_argument("--algo", choices=ALGOS, default="dpo",
                        help="dpo: preference pairs → one DPO job; ppo / grpo: rollout worker → "
                             "scored samples → one PPO (critic) / GRPO job per iteration; loop: "
                             "online DPO as one managed loop (rlhf loop): rounds of sampling, "
                             "reward-model labels, best-vs-worst pairs, DPO, swap, evaluation")
    parser.add_argument("--iterations", type=int, default=10,
                        help="ppo / grpo: iterations (each: rollout, one job, hot-swap); loop: "
                             "rounds")
    parser.add_argument("--prompts", type=int, default=16, help="ppo / grpo: prompts per iteration")
    parser.add_argument("--group-size", type=int, default=4,
                        help="ppo / grpo: samples per prompt (GRPO's group)")
    parser.add_argument("--redis-url", default=REDIS_URL,
                        help="Redis for the registry, the streams and the trainer's broker (a "
                             "database no other trainer worker consumes)")


def _opt(args: argparse.Namespace, name: str):
    """A flag of `add_demo_arguments`, or its default when the parser did not add it."""
    if hasattr(args, name):
        return getattr(args, name)
    parser = argparse.ArgumentParser(add_help=False)
    add_demo_arguments(parser)
    return parser.get_default(name)


def run_demo(args: argparse.Namespace) -> int:
    algo = _opt(args, "algo")
    if algo == "dpo":
        return _run_dpo(args)
    if algo == "loop":
        from rlhf.loop_demo import run_loop_demo

        return run_loop_demo(args)
    return _run_rl(args, algo)


# ------------------------------------------------------------------------------------------------
# The shared set-up: models, store, registry, services, trainer worker
# ------------------------------------------------------------------------------------------------


@dataclass
class _Stack:
    """Everything the demo started; `_stack` stops it all on the way out."""

    console: Any
    run_id: str
    work: Path
    store_dir: Path
    logs: Path
    model_name: str
    redis_url: str
    env: dict[str, str]
    policy_src: Path
    reward_dir: Path
    services: list = field(default_factory=list)  # ServiceProcess: policy, reward, reference
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # worker, rollout, ...

    @property
    def policy(self):
        return self.services[0]

    @property
    def reward(self):
        return self.services[1]

    @property
    def reference(self):
        return self.services[2]

    def start_process(self, name: str, argv: list[str]) -> subprocess.Popen:
        """A child process of the demo (`python -m rlhf ...`), logging to logs/<name>.log."""
        with (self.logs / f"{name}.log").open("w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, "-m", "rlhf", *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env)
        self.procs[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} exited ({proc.returncode}); "
                                   f"see {self.logs / (name + '.log')}")


@contextlib.contextmanager
def _stack(console, workdir: Path, *, label: str, redis_url: str,
           make_reward: Callable[[Path], Path]) -> Iterator[_Stack]:
    """Tiny policy published as v0001 and active; `make_reward(src_dir)` gives the reward model's
    directory; the policy (following the registry), reward and reference services; a Celery
    trainer worker. Everything started is stopped on the way out."""
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import free_port, start_service, stop_process
    from rlhf_client.registry import Registry

    run_id = uuid.uuid4().hex[:6]
    work = workdir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    store_dir, logs = work / "store", work / "logs"
    logs.mkdir(parents=True)
    model_name = f"demo-{label}-{run_id}"
    registry = Registry.from_url(redis_url)
    with console.status("making tiny models (Qwen2 policy + reward, local tokenizer)…"):
        policy_src = make_tiny_model("policy", work / "src" / "policy", seed=0)
        reward_dir = make_reward(work / "src")
        first = ModelStore(store_dir).publish(model_name, policy_src, kind="policy",
                                              probes=compute_probes("policy", policy_src))
        registry.register(model_name, first.version, first.created)
        registry.activate(model_name, first.version)
    console.print(f"[green]✓[/] {model_name} {first.version} published and active "
                  f"(store {store_dir})")

    env = {**os.environ, "RLHF_SWAP_POLL_S": "1", "RLHF_TORCH_THREADS": "1"}
    st = _Stack(console, run_id, work, store_dir, logs, model_name, redis_url, env, policy_src,
                reward_dir)
    try:
        with console.status("starting PolicyService, RewardService, ReferenceService…"):
            common = ["--metrics-port", "0", "--redis-url", redis_url]
            for service, args in (
                ("policy", ["--model-name", model_name, "--store", str(store_dir)]),
                ("reward", ["--model", str(reward_dir)]),
                ("reference", ["--model", str(policy_src)]),
            ):
                st.services.append(start_service(service, [*args, *common],
                                                 logs / f"{service}.log", env=env))
        console.print(f"[green]✓[/] services SERVING: policy {st.policy.target}, "
                      f"reward {st.reward.target}, reference {st.reference.target}")
        st.start_process("worker", ["worker", "--store", str(store_dir), "--redis-url", redis_url,
                                    "--metrics-port", str(free_port()),
                                    "--hostname", f"demo-{run_id}@%h"])
        console.print("[green]✓[/] Celery trainer worker started")
        yield st
    finally:
        for proc in reversed(list(st.procs.values())):
            stop_process(proc)
        for svc in reversed(st.services):
            svc.stop()


def _wait_job(st: _Stack, training, job_id: str, label: str):
    """Follow a job with a progress bar until it succeeds or fails; its final record."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
                  TimeElapsedColumn(), console=st.console, transient=True) as bar:
        task = bar.add_task(f"{label} job {job_id[:8]}", total=1.0, stage="queued")
        while True:
            rec = training.status(job_id)
            bar.update(task, completed=rec.progress or 0.0, stage=rec.status)
            if rec.done:
                return rec
            st.check_alive()
            time.sleep(POLL_S)


def _wait_version(client, version: str, st: _Stack) -> None:
    """Until the policy service answers with `version` (verified and swapped in)."""
    while client.get_model().model.version != version:
        st.check_alive()
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------------------------
# --algo dpo
# ------------------------------------------------------------------------------------------------


def _run_dpo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    from rlhf.models.tiny import make_tiny_model
    from rlhf_client import PolicyClient, QueueProducer, RewardClient, TrainingClient

    console = Console()
    with _stack(console, args.workdir, label="policy", redis_url=_opt(args, "redis_url"),
                make_reward=lambda src: make_tiny_model("reward", src / "reward", seed=0)) as st:
        stream = f"rlhf:demo:{st.run_id}:preferences"
        eval_prompts = [p["prompt"] for p in synthetic_pairs(24, seed=101)]
        with PolicyClient(st.policy.target) as pc, RewardClient(st.reward.target) as rc:
            before, v_before = preferred_rate(pc, eval_prompts)
            sample = pc.generate(eval_prompts[:4]).completions
            rewards = rc.score([(eval_prompts[c.prompt_index], c.text or " ") for c in sample]).rewards
        console.print(f"before: {before:.0%} of {v_before}'s samples say {TARGET!r}; "
                      f"reward model scores {['%.3f' % r for r in rewards]}")

        pairs = synthetic_pairs(args.pairs, seed=1)
        producer = QueueProducer.from_url(st.redis_url)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=console, transient=True) as bar:
            task = bar.add_task("pushing preference pairs", total=len(pairs))
            for p in pairs:
                producer.push_pair(stream=stream, source="synthetic", **p)
                bar.advance(task)
        console.print(f"[green]✓[/] {len(pairs)} preference pairs pushed to {stream}")

        load = _Generator(st.policy.target)
        load.start()
        t_submit = time.monotonic()
        training = TrainingClient(st.redis_url)
        job_id = training.submit_dpo(
            model_name=st.model_name, source={"type": "stream", "stream": stream, "group": f"dpo-{st.run_id}"},
            reference={"source": "service", "target": st.reference.target}, loss_type="sigmoid", beta=0.05,
            learning_rate=2e-3, batch_size=16, max_length=64, epochs=4, eval_fraction=0.2, activate=True,
            min_eval_accuracy=0.8)
        rec = _wait_job(st, training, job_id, "DPO")
        t_done = time.monotonic()
        if rec.status != "succeeded":
            console.print(f"[red]DPO job failed:[/] {rec.error}")
            return 1
        m = rec.metrics
        console.print(f"[green]✓[/] DPO job published {rec.version}: held-out implicit-reward accuracy "
                      f"{m.get('eval_accuracy_initial', 0):.2f} → {m.get('eval_accuracy', 0):.2f}")
        with PolicyClient(st.policy.target) as pc, console.status("waiting for the policy service to swap…"):
            _wait_version(pc, rec.version, st)
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
        png = st.work / "demo.png"
        _plot(png, before, after, load.log, (0.0, t_done - t_submit), len(load.failures))
        console.print(f"[green]✓[/] plot: {png}")
        ok = after > before and not load.failures and served == {v_before, v_after}
        return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# --algo ppo / grpo
# ------------------------------------------------------------------------------------------------

#: The RL loop's settings (tiny models on 2 CPU cores: an iteration takes a few seconds).
RL_MAX_NEW_TOKENS = 8
RL_LEARNING_RATE = 3e-3
RL_KL_COEF = 0.05
RL_EPOCHS = 4
RL_MINIBATCH = 16
RM_PAIRS, RM_EPOCHS, RM_LEARNING_RATE = 300, 2, 1e-4


def _banana_reward_model(src: Path, console) -> Path:
    """A tiny reward model trained here on the banana preference pairs (Bradley–Terry, the
    trainer's own `train_reward_model`); a low learning rate keeps its scores graded rather
    than saturated, so small moves of the policy show in the reward."""
    from rlhf.models.tiny import make_tiny_model
    from rlhf.trainer.data import Pair
    from rlhf.trainer.jobs import RewardModelJob
    from rlhf.trainer.reward_model import train_reward_model

    base = make_tiny_model("reward", src / "reward-init", seed=0)
    pairs = [Pair(f"rm-{i}", **p) for i, p in enumerate(synthetic_pairs(RM_PAIRS, seed=1))]
    held = [Pair(f"rm-eval-{i}", **p) for i, p in enumerate(synthetic_pairs(60, seed=2))]
    spec = RewardModelJob(model_name="demo-reward", source={"type": "jsonl", "path": "-"},
                          epochs=RM_EPOCHS, batch_size=16, learning_rate=RM_LEARNING_RATE,
                          max_length=64)
    m = train_reward_model(base, pairs, held, spec, out_dir=src / "reward", threads=1)
    console.print(f"[green]✓[/] reward model trained on {len(pairs)} banana pairs: held-out "
                  f"accuracy {m['eval_accuracy_initial']:.2f} → {m['eval_accuracy']:.2f}")
    return src / "reward"


def _sample_stats(r, stream: str, after: str) -> tuple[str, float]:
    """(last entry id, share saying banana) of the samples pushed after entry `after`."""
    from rlhf_client.queues import decode_entry

    last, n, hits = after, 0, 0
    for entry_id, fields in r.xrange(stream, min="-" if after == "-" else f"({after}"):
        last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        n += 1
        hits += TARGET in decode_entry(fields).completion
    return last, (hits / n if n else 0.0)


def _measure(pc, rc, prompts: list[str], n: int) -> tuple[float, float, str]:
    """(mean reward-model score, share saying banana, version) of the policy's own samples."""
    from rlhf_client import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=RL_MAX_NEW_TOKENS, seed=7)
    res = pc.generate(prompts, params, n=n)
    items = [(prompts[c.prompt_index], c.text) if c.text
             else (list(c.prompt_token_ids), list(c.token_ids)) for c in res.completions]
    scores = rc.score(items).rewards
    hits = sum(TARGET in c.text for c in res.completions)
    return sum(scores) / len(scores), hits / len(res.completions), res.model.version


def _plot_rl(path: Path, algo: str, rows: list[dict], before: tuple, after: tuple) -> None:
    from rlhf.plots import pyplot, save_figure
    from matplotlib.ticker import MaxNLocator

    its = [r["iteration"] for r in rows]  # iteration k trains on the samples of version k
    held = [1, its[-1] + 1]  # held-out prompts: the first and the last version
    fig, (a, b, c) = pyplot().subplots(1, 3, figsize=(13, 3.8))
    a.plot(its, [r["score"] for r in rows], marker="o", color="#2a7ab9",
           label="its rollout samples")
    a.scatter(held, [before[0], after[0]], color="#d1495b", zorder=3,
              label="held-out prompts (first / last version)")
    a.set_title("mean reward-model score")
    a.legend(fontsize=8)
    b.plot(its, [r["kl"] for r in rows], marker="o", color="#edae49")
    b.set_title("KL to the reference (nats per sample, k1)")
    c.plot(its, [100 * r["banana"] for r in rows], marker="o", color="#66a182")
    c.scatter(held, [100 * before[1], 100 * after[1]], color="#d1495b", zorder=3)
    c.set_title(f'samples saying "{TARGET}" (%)')
    for ax in (a, b, c):
        ax.set_xlabel("policy version (v000k)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    save_figure(fig, path, title=f"{algo.upper()}: rollout worker → scored samples → one job per "
                                  "iteration → hot-swap")


def _rollout_prompt(prompt_id: str, text: str):
    from rlhfpb.v1 import samples_pb2

    return samples_pb2.RolloutPrompt(id=prompt_id, prompt=text, source="demo")


@dataclass(frozen=True)
class RLDemoResult:
    """What `run_rl_demo` measured: per iteration (`rows`: the version sampled, its rollout
    samples' mean score, KL to the reference and banana share, the version trained), and the
    held-out prompts' (mean score, banana share, version) before and after."""

    algo: str
    rows: list[dict]
    before: tuple[float, float, str]
    after: tuple[float, float, str]
    plot: Path
    seconds: float

    @property
    def learned(self) -> bool:
        return self.after[0] > self.before[0] and self.rows[-1]["score"] > self.rows[0]["score"]


def _run_rl(args: argparse.Namespace, algo: str) -> int:
    from rich.console import Console

    console = Console()
    try:
        return 0 if run_rl_demo(args, algo, console=console).learned else 1
    except _JobFailed as exc:
        console.print(f"[red]{algo.upper()} job failed:[/] {exc}")
        return 1


class _JobFailed(RuntimeError):
    pass


def run_rl_demo(args: argparse.Namespace, algo: str, *, console=None) -> RLDemoResult:
    """The PPO / GRPO loop on the demo's stack; raises when a job fails."""
    from rich.console import Console
    from rich.table import Table

    from rlhf_client import PolicyClient, QueueProducer, RewardClient, TrainingClient
    from rlhf_client.redis_conn import connect

    console = console or Console()
    iterations = _opt(args, "iterations")
    n_prompts, group = _opt(args, "prompts"), _opt(args, "group_size")
    per_iteration = n_prompts * group
    estimator = "gae" if algo == "ppo" else "grpo"
    with _stack(console, args.workdir, label=algo, redis_url=_opt(args, "redis_url"),
                make_reward=lambda src: _banana_reward_model(src, console)) as st:
        prompts_stream = f"rlhf:demo:{st.run_id}:prompts"
        samples_stream = f"rlhf:demo:{st.run_id}:samples"
        # The worker follows the registry: a sample of a superseded version is never pushed.
        st.start_process("rollout", [
            "rollout", "--policy", st.policy.target, "--reward", st.reward.target,
            "--reference", st.reference.target, "--model-name", st.model_name,
            "--prompts-stream", prompts_stream,
            "--samples-stream", samples_stream, "--n", str(group),
            "--batch-prompts", str(n_prompts), "--max-new-tokens", str(RL_MAX_NEW_TOKENS),
            "--redis-url", st.redis_url, "--metrics-port", "0"])
        console.print(f"[green]✓[/] rollout worker started: {prompts_stream} → {group} scored "
                      f"samples per prompt → {samples_stream}")
        r = connect(st.redis_url)
        producer = QueueProducer(r)
        training = TrainingClient(st.redis_url)
        held_out = [p["prompt"] for p in synthetic_pairs(16, seed=101)]
        with PolicyClient(st.policy.target) as pc, RewardClient(st.reward.target) as rc:
            before = _measure(pc, rc, held_out, group)
        console.print(f"before: {before[2]}'s samples score {before[0]:.3f} on average; "
                      f"{before[1]:.0%} say {TARGET!r}")

        # PPO: the critic starts from the reward model (then goes on inside each version)
        critic = {"critic": {"init_dir": str(st.reward_dir)}} if estimator == "gae" else {}
        rows, last_entry, t0 = [], "-", time.monotonic()
        with PolicyClient(st.policy.target) as pc:
            for it in range(1, iterations + 1):
                version = pc.get_model().model.version
                batch = [p["prompt"] for p in synthetic_pairs(n_prompts, seed=1000 + it)]
                producer.push_many([_rollout_prompt(f"{st.run_id}-{it}-{i}", p)
                                    for i, p in enumerate(batch)], stream=prompts_stream)
                with console.status(f"iteration {it}: {per_iteration} samples from {version}…"):
                    while r.xlen(samples_stream) < it * per_iteration:
                        st.check_alive()
                        time.sleep(POLL_S)
                last_entry, banana = _sample_stats(r, samples_stream, last_entry)
                job_id = training.submit_ppo(
                    model_name=st.model_name, activate=True, min_samples=per_iteration,
                    source={"type": "stream", "stream": samples_stream,
                            "group": f"ppo-{st.run_id}", "max_entries": per_iteration},
                    advantage_estimator=estimator, group_size=group, kl_coef=RL_KL_COEF,
                    ppo_epochs=RL_EPOCHS, minibatch_size=RL_MINIBATCH,
                    learning_rate=RL_LEARNING_RATE, value_learning_rate=RL_LEARNING_RATE,
                    **critic)
                rec = _wait_job(st, training, job_id, f"iteration {it}: {algo.upper()}")
                if rec.status != "succeeded":
                    raise _JobFailed(rec.error)
                with console.status(f"iteration {it}: the policy service swaps to {rec.version}…"):
                    _wait_version(pc, rec.version, st)
                m = rec.metrics
                rows.append({"iteration": it, "version": version, "score": m["score_mean"],
                             "kl": m["kl_ref"], "banana": banana, "new": rec.version})
                console.print(f"iteration {it:2d}  {version}: score {m['score_mean']:6.3f}  "
                              f"KL {m['kl_ref']:6.3f}  {TARGET} {banana:4.0%}  → {rec.version}")
        seconds = time.monotonic() - t0
        with PolicyClient(st.policy.target) as pc, RewardClient(st.reward.target) as rc:
            after = _measure(pc, rc, held_out, group)

        table = Table(title=f"{algo.upper()}: {iterations} iterations in {seconds:.0f} s")
        table.add_column("held-out prompts")
        table.add_column(before[2], justify="right")
        table.add_column(after[2], justify="right")
        table.add_row("mean reward-model score", f"{before[0]:.3f}", f"{after[0]:.3f}")
        table.add_row(f"samples saying {TARGET!r}", f"{before[1]:.0%}", f"{after[1]:.0%}")
        console.print(table)
        png = st.work / f"demo-{algo}.png"
        _plot_rl(png, algo, rows, before, after)
        console.print(f"[green]✓[/] plot: {png}")
        try:
            from rlhf.trainer.ppo import load_curves, plot_ppo_curves

            steps = [s for row in rows
                     for s in load_curves(st.store_dir / st.model_name / row["new"])]
            curves = plot_ppo_curves(steps, st.work / f"demo-{algo}-steps.png",
                                     title=f"{algo.upper()}: every optimizer step of the "
                                           f"{iterations} jobs")
            console.print(f"[green]✓[/] per-step curves: {curves}")
        except (OSError, ValueError) as exc:  # extra figures: the demo's own are above
            console.print(f"[yellow]per-step curves not drawn:[/] {exc}")
        return RLDemoResult(algo, rows, before, after, png, seconds)
