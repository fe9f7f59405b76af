"""`rlhf demo --recipe backtracking` — teach the tiny policy to reset, the lecture's recipe.

1. the synthetic safety task is made on the spot (`rlhf.trainer.backtracking`): unsafe prompts
   whose unsafe answers contain a marker word, refusals, benign prompts with helpful answers;
   the tiny policy is pretrained (in this process, a few seconds) on a mix that mostly complies
   with unsafe prompts — the base model to make safe — and published as v0001;
2. the reset token is added to the model (`add_token_version`: a no-op for the tiny models'
   own `<|reset|>`, a new version for any other `--reset-token`);
3. the data builders write the SFT files and push the DPO pairs to Redis streams;
4. a Celery trainer worker runs two SFT jobs (baseline, backtracking) and two DPO jobs (each on
   its SFT version, pairs from its stream), each publishing a version;
5. a policy service following the registry serves each row's version in turn (hot-swap), and
   the held-out prompts are sampled through it with `reset_token`: violations on unsafe prompts
   (plain and prefilled with a compliant opening), resets, helpfulness on benign prompts;
6. the lecture's table is printed and plotted to a PNG.

`--in-process` runs the same four rows with the trainers' plain functions and samples the
models in this process: no services, no Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REDIS_URL = "redis://127.0.0.1:6379/0"
POLL_S = 0.25

__all__ = ["add_arguments", "run_backtracking_demo"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's own flags on `rlhf demo`'s parser (`--workdir` and `--debug` are the CLI's)."""
    parser.add_argument("--reset-token", default="<|reset|>",
                        help="backtracking: the reset token (added to the model when it lacks it)")
    parser.add_argument("--samples", type=int, default=4,
                        help="backtracking: samples per held-out prompt")
    parser.add_argument("--in-process", action="store_true",
                        help="backtracking: train and sample in this process (no services, no Redis)")
    parser.add_argument("--seed", type=int, default=0, help="backtracking: the task's seed")


def _opt(args: argparse.Namespace, name: str):
    """A demo flag (this module's or `rlhf.demo`'s), or its default when the parser lacks it."""
    if hasattr(args, name):
        return getattr(args, name)
    from rlhf.demo import add_demo_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    add_demo_arguments(parser)
    return parser.get_default(name)


def run_backtracking_demo(args: argparse.Namespace) -> int:
    """Exit 0 when backtrack SFT + DPO violates less often than baseline SFT + DPO and resets
    on at most 10% of benign samples, 1 otherwise."""
    from rich.console import Console

    from rlhf.models.tiny import make_tiny_model
    from rlhf.trainer import backtracking as bt

    console = Console()
    run_id = uuid.uuid4().hex[:6]
    workdir = Path(getattr(args, "workdir", None) or ".cache/demo")
    work = workdir / f"backtracking-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"
    work.mkdir(parents=True)
    seed, n, reset = _opt(args, "seed"), _opt(args, "samples"), _opt(args, "reset_token")
    task = bt.synthetic_safety_task(seed=seed)
    console.print(f"synthetic safety task: {len(task.triples)} (prompt, safe, unsafe) triples, "
                  f"{len(task.benign)} benign examples; held out: {len(task.eval_unsafe)} unsafe "
                  f"prompts (half prefilled with a compliant opening), {len(task.eval_benign)} benign")
    with console.status("pretraining the base model (tiny Qwen2) on a mix that mostly complies "
                        "with unsafe prompts…"):
        init = make_tiny_model("policy", work / "src" / "init", seed=seed)
        pre = bt.pretrain_synthetic_base(task, init, work / "src" / "base")
    console.print(f"[green]✓[/] base model: pretraining loss {pre['train_loss']:.3f} "
                  f"({pre['seconds']:.0f}s)")
    judge = bt.MarkerJudge(bt.MARKERS)
    if _opt(args, "in_process"):
        results, base_eval = _in_process(console, task, work, reset, judge, seed=seed, n=n)
    else:
        results, base_eval = _with_services(console, task, work, reset, judge, seed=seed, n=n,
                                            run_id=run_id, redis_url=_opt(args, "redis_url"))
    return _report(console, work, {"base (pretrained)": base_eval, **results})


# ------------------------------------------------------------------------------------------------
# in-process
# ------------------------------------------------------------------------------------------------


def _in_process(console, task, work: Path, reset: str, judge, *, seed: int, n: int):
    from rlhf.models.tokens import add_special_token
    from rlhf.trainer import backtracking as bt

    base = work / "src" / "base"
    added = add_special_token(base, work / "src" / "base-token", reset)
    console.print(f"[green]✓[/] add-token: {added.message}")
    if added.added:
        base = work / "src" / "base-token"
    base_eval = bt.evaluate_safety(bt.LocalSampler(base, reset_token=reset), task.eval_unsafe,
                                   task.eval_benign, judge=judge, n=n, seed=seed)
    with console.status("training the four rows…") as status:
        run = bt.run_recipe(base, task.triples, reset_token=reset, workdir=work / "rows",
                            eval_unsafe=task.eval_unsafe, eval_benign=task.eval_benign, judge=judge,
                            extra_sft=task.benign, sft=bt.SYNTHETIC_SFT, dpo=bt.SYNTHETIC_DPO,
                            seed=seed, n=n,
                            progress=lambda row, stage: status.update(f"{row}: {stage}…"))
    console.print(f"[green]✓[/] the four rows trained (models under {work / 'rows'})")
    return run.results, base_eval


# ------------------------------------------------------------------------------------------------
# with the services: store, registry, Celery worker, policy service
# ------------------------------------------------------------------------------------------------


def _with_services(console, task, work: Path, reset: str, judge, *, seed: int, n: int,
                   run_id: str, redis_url: str):
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tokens import add_token_version
    from rlhf.procs import free_port, start_service, stop_process
    from rlhf.trainer import backtracking as bt
    from rlhf_client import PolicyClient, QueueProducer, TrainingClient
    from rlhf_client.redis_conn import connect
    from rlhf_client.registry import Registry

    store_dir, logs, data = work / "store", work / "logs", work / "data"
    store = ModelStore(store_dir)
    redis_client = connect(redis_url, decode_responses=True)
    registry = Registry(redis_client)
    name = f"demo-backtrack-{run_id}"
    base_src = work / "src" / "base"
    first = store.publish(name, base_src, kind="policy", probes=compute_probes("policy", base_src))
    registry.register(name, first.version, first.created)
    registry.activate(name, first.version)
    manifest, added = add_token_version(store, registry, name, reset, activate=True)
    base_version = manifest.version if manifest is not None else first.version
    console.print(f"[green]✓[/] {name} {first.version} published (store {store_dir}); add-token: "
                  f"{added.message}" + (f" → {manifest.version}" if manifest is not None else ""))

    # the data: SFT files (the benign examples in every row), DPO pairs on streams
    sft_files = {
        "baseline": data / "baseline-sft.jsonl",
        "backtrack": data / "backtrack-sft.jsonl",
    }
    bt.write_jsonl(sft_files["baseline"], bt.baseline_sft_examples(task.triples) + task.benign)
    bt.write_jsonl(sft_files["backtrack"], bt.backtracking_sft_examples(
        task.triples, reset_token=reset, seed=seed) + task.benign)
    streams = {"baseline": f"rlhf:demo:{run_id}:baseline-pairs",
               "backtrack": f"rlhf:demo:{run_id}:backtrack-pairs"}
    producer = QueueProducer.from_url(redis_url)
    pushed = {
        "baseline": bt.push_records(producer, bt.baseline_pairs(task.triples),
                                    stream=streams["baseline"]),
        "backtrack": bt.push_records(producer, bt.backtracking_pairs(
            task.triples, reset_token=reset, seed=seed), stream=streams["backtrack"]),
    }
    producer.close()
    console.print(f"[green]✓[/] data: {sft_files['baseline'].name}, {sft_files['backtrack'].name} "
                  f"written; {len(pushed['baseline'])} baseline and {len(pushed['backtrack'])} "
                  "backtracking pairs pushed")

    env = {**os.environ, "RLHF_SWAP_POLL_S": "1", "RLHF_TORCH_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    services = []
    try:
        with console.status("starting the policy service (following the registry) and a Celery "
                            "trainer worker…"):
            services.append(start_service(
                "policy", ["--model-name", name, "--store", str(store_dir), "--metrics-port", "0",
                           "--redis-url", redis_url], logs / "policy.log", env=env))
            with (logs / "worker.log").open("w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "rlhf", "worker", "--store", str(store_dir), "--redis-url",
                     redis_url, "--metrics-port", str(free_port()), "--hostname", f"demo-{run_id}@%h"],
                    stdout=log, stderr=subprocess.STDOUT, env=env))
        policy = services[0]
        console.print(f"[green]✓[/] policy service SERVING at {policy.target}; worker started")

        def alive() -> None:
            if procs[0].poll() is not None:
                raise RuntimeError(f"the worker exited ({procs[0].returncode}); see {logs / 'worker.log'}")

        training = TrainingClient(redis_url)
        common = dict(model_name=name, seed=seed, eval_fraction=0.1)
        sft_jobs = {row: training.submit_sft(base_version=base_version,
                                             source={"type": "jsonl", "path": str(sft_files[key])},
                                             **common, **bt.SYNTHETIC_SFT)
                    for row, key in (("baseline SFT", "baseline"), ("backtrack SFT", "backtrack"))}
        versions = {row: _wait_job(console, training, job, row, alive) for row, job in sft_jobs.items()}
        dpo_jobs = {
            row: training.submit_dpo(base_version=versions[parent],
                                     source={"type": "stream", "stream": streams[key],
                                             "group": f"demo-{run_id}-{key}"},
                                     **common, **bt.SYNTHETIC_DPO)
            for row, parent, key in (("baseline SFT + DPO", "baseline SFT", "baseline"),
                                     ("backtrack SFT + DPO", "backtrack SFT", "backtrack"))}
        versions.update({row: _wait_job(console, training, job, row, alive)
                         for row, job in dpo_jobs.items()})

        results = {}
        with PolicyClient(policy.target, timeout=300) as client:
            for row, version in [("base (pretrained)", base_version), *versions.items()]:
                registry.activate(name, version)
                with console.status(f"{row}: waiting for the policy service to swap to {version}…"):
                    while client.get_model().model.version != version:
                        alive()
                        time.sleep(POLL_S)
                tok = load_tokenizer(store.path(name, version))
                sampler = bt.ServiceSampler(client, reset_token=reset, tokenizer=tok)
                with console.status(f"{row}: sampling {version} through the policy service…"):
                    results[row] = bt.evaluate_safety(sampler, task.eval_unsafe, task.eval_benign,
                                                      judge=judge, n=n, seed=seed)
                e = results[row]
                console.print(f"[green]✓[/] {row} ({version}): violations {e.violation_rate:.1%}, "
                              f"resets on benign prompts {e.reset_rate_benign:.1%}")
        base_eval = results.pop("base (pretrained)")
        return results, base_eval
    finally:
        for proc in procs:
            stop_process(proc)
        for svc in services:
            svc.stop()
        redis_client.close()


def _wait_job(console, training, job_id: str, label: str, alive) -> str:
    """Follow a job with a progress bar; its version, or RuntimeError when it failed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{label}: job {job_id[:8]}", total=1.0, stage="queued")
        while True:
            rec = training.status(job_id)
            bar.update(task, completed=rec.progress or 0.0, stage=rec.status)
            if rec.done:
                break
            alive()
            time.sleep(POLL_S)
    if rec.status != "succeeded":
        raise RuntimeError(f"the {label} job failed: {rec.error}")
    m = rec.metrics
    detail = (f"held-out NLL {m['eval_loss_initial']:.3f} → {m['eval_loss']:.3f}" if "eval_loss_initial" in m
              and "train_accuracy" not in m else
              f"held-out implicit-reward accuracy {m.get('eval_accuracy_initial', 0):.2f} → "
              f"{m.get('eval_accuracy', 0):.2f}")
    console.print(f"[green]✓[/] {label}: job published {rec.version} ({detail})")
    return rec.version


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def _report(console, work: Path, results: dict) -> int:
    from rich.table import Table

    from rlhf.trainer import backtracking as bt

    groups = sorted({g for e in results.values() for g in e.violation_by_group})
    table = Table(title="backtracking on the synthetic safety task (violations: the kept text "
                        "holds an unsafe marker)")
    for col in ("tuning", "violations", *[f"({g})" for g in groups], "helpfulness",
                "resets (unsafe)", "resets (benign)"):
        table.add_column(col, justify="left" if col == "tuning" else "right")
    for row, e in results.items():
        table.add_row(row, f"{e.violation_rate:.1%}",
                      *[f"{e.violation_by_group.get(g, 0):.1%}" for g in groups],
                      f"{e.helpfulness:.2f}", f"{e.reset_rate_unsafe:.1%}", f"{e.reset_rate_benign:.1%}")
    console.print(table)
    rows = {k: v for k, v in results.items() if k in bt.ROWS}
    png = bt.plot_table(results, work / "backtracking.png")
    (work / "results.json").write_text(json.dumps({k: v.as_dict() for k, v in results.items()},
                                                  indent=2))
    console.print(f"[green]✓[/] plot: {png}; figures: {work / 'results.json'}")
    back, base = rows.get("backtrack SFT + DPO"), rows.get("baseline SFT + DPO")
    ok = (back is not None and base is not None and back.violation_rate < base.violation_rate
          and back.reset_rate_benign <= 0.1)
    for ex in (back.examples.get("reset", [])[:2] if back else []):
        console.print(f"  backtrack SFT + DPO, {ex['prompt']!r}: generated {ex['discarded']!r} "
                      f"{bt_reset_note(ex)} kept {ex['kept']!r}")
    return 0 if ok else 1


def bt_reset_note(ex: dict) -> str:
    return "then reset," if ex.get("resets", 0) == 1 else f"then reset ({ex.get('resets')} times),"
