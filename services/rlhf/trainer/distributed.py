"""Data-parallel training on torch.distributed: the Celery task controls a `torchrun` group.

A job spec with `distributed: {nproc_per_node: N, ...}` (DPO, SFT, reward model, the PPO
family; full weights or a LoRA adapter) trains on N ranks instead of inside the worker's
process. The job around the training does not change: the task reads and claims its inputs
(stream entries stay pending until the version is committed), then instead of `train_<type>` it
calls `train_<type>_distributed` here: each converts its type's inputs and result around
`launch`, the part they share, which

1. write what the ranks train on to a directory of the attempt (`job.json`: the job type, the
   spec, the pairs, examples or samples, DPO's reference log-probs computed once here — a LoRA
   job's from its base, the policy with its adapter off; JSON only, no pickle);
2. start `python -m torch.distributed.run --nproc-per-node N --rdzv-backend c10d
   --rdzv-endpoint 127.0.0.1:<free port> --max-restarts 0 -m rlhf.trainer.ranks <dir>`
   (rank processes: `rlhf.trainer.ranks`, which run the type's ordinary trainer with a `Group`
   active, see below);
3. watch it: the task's lease heartbeat goes on in this process; the training steps rank 0
   reports (`progress.jsonl`) become the job's progress and history rows; `ctx.check()` runs
   between polls, so a cancel request or a lost lease stops the group;
4. stop it on any way out but success — a cancel, a lost lease, a worker shutting down (the
   exception that ends the task), this process dying (torchrun gets SIGTERM from the kernel:
   `PR_SET_PDEATHSIG`, and so does every rank when torchrun dies): torchrun's process group and
   every rank (by the pid each wrote) are sent SIGTERM, then SIGKILL;
5. a rank that fails (an exception, a kill) makes torchrun exit non-zero: `RankFailed` (a
   `TransientError`: the job is retried as a new attempt while attempts remain) carries the
   rank's error (`error-<rank>.txt`, else the tail of the group's log); nothing was published;
6. on success read rank 0's `result.json`; rank 0 alone wrote the checkpoint into the job's
   output directory, which the task publishes exactly as a one-process job's (store, checksums,
   probes, registry, activation).

Inside the ranks (`Group`, `current()`): every rank builds the same model from the same
checkpoint and seed, walks the same seeded order of items and so forms the same global
micro-batches; each takes its own disjoint shard of each (`shard`: items `rank::world`), weighs
its loss by its share of the GLOBAL count, as the one-process code defines the mean (pairs for
DPO and the reward model; the step's completion tokens for SFT; tokens or sequences for PPO;
counts all-reduced where a rank does not hold them), and after the step's micro-batches the
gradients of the trainable parameters are summed over the ranks in one flattened all-reduce
(`sync_grads`) before clipping and the optimizer step. The sum of the ranks' gradients is then
the one-process gradient of the global batch, gradient accumulation included, and every rank
applies the same update (replicated weights: DDP's result; the trainers call `model.base_model`
and the head weight directly for their fused log-prob head, bypassing the `forward()` DDP's
reducer and FSDP's hooks rely on, so the sync is explicit). Metrics are all-reduced the same
way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rlhf.trainer.jobs import TransientError

if TYPE_CHECKING:
    from rlhf.trainer.jobs import JobContext

log = logging.getLogger(__name__)

__all__ = ["Group", "RankError", "RankFailed", "current", "launch", "run_group",
           "train_dpo_distributed", "train_ppo_distributed", "train_sft_distributed",
           "train_reward_model_distributed", "FAULT_KILL_ENV"]

#: Fault injection for tests, inert unless set: `<rank>:<step>[:<once-file>]` — that rank
#: SIGKILLs itself after that optimizer step (with a once-file: only while the file does not
#: exist, and it creates it first, so the retry runs clean).
FAULT_KILL_ENV = "RLHF_FAULT_KILL_RANK"

#: How often the controller looks at the group (progress, cancel, exit).
_POLL_S = 0.2
#: SIGTERM → SIGKILL grace when stopping a group.
_STOP_GRACE_S = 10.0


class RankFailed(TransientError):
    """A rank of the group failed or was killed (torchrun exited non-zero): retried as a new
    attempt while attempts remain."""


class RankError(RuntimeError):
    """A rank raised an error that would recur (a ValueError: unusable data, a diverged loss):
    the job fails at once, as the same error fails a one-process job."""


# ------------------------------------------------------------------------------------------------
# Inside a rank
# ------------------------------------------------------------------------------------------------


class Group:
    """This rank's view of the group, active (`current()`) while a rank trains."""

    def __init__(self, rank: int, world: int, device: str = "cpu"):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's disjoint share of a global micro-batch (items `rank::world`)."""
        return list(items[self.rank :: self.world])

    def _sum(self, values: Sequence[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def global_count(self, n: float) -> float:
        """The sum of `n` over the ranks (a micro-batch's pairs, tokens)."""
        return self._sum([n])[0]

    def sum_metrics(self, sums: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """`sums` (keyed by `keys`; a missing key counts 0) summed over the ranks."""
        return dict(zip(keys, self._sum([sums.get(k, 0.0) for k in keys])))

    def explained_variance(self, values: Sequence[Any], returns: Sequence[Any]) -> float:
        """`ppo_losses.explained_variance` over every rank's tokens (`values`, `returns`: this
        rank's tensors), from all-reduced sums; NaN when undefined."""
        import math

        sums = [0.0] * 5
        for v, r in zip(values, returns):
            r, d = r.detach().double(), r.detach().double() - v.detach().double()
            for i, x in enumerate((float(r.numel()), float(r.sum()), float((r * r).sum()),
                                   float(d.sum()), float((d * d).sum()))):
                sums[i] += x
        n, sr, srr, sd, sdd = self._sum(sums)
        if n == 0:
            return math.nan
        var_r = srr / n - (sr / n) ** 2
        if var_r <= 0.0:
            return math.nan
        return 1.0 - (sdd / n - (sd / n) ** 2) / var_r

    def sync_grads(self, model) -> None:
        """Sum the gradients of `model`'s trainable parameters (`requires_grad`: a LoRA job's
        adapter, and a reward model's head; never the frozen base) over the ranks: one flattened
        all-reduce. A rank without a gradient for a parameter (an empty shard) contributes
        zeros; a parameter no rank has a gradient for keeps none, as in one process (AdamW then
        skips it: no weight decay on it either)."""
        import torch
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        # after the gradients, one flag per parameter: whether this rank has its gradient
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params]
                         + [torch.tensor([float(p.grad is not None) for p in params],
                                         dtype=dtype, device=params[0].device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        had = flat[-len(params):].tolist()
        offset = 0
        for p, any_grad in zip(params, had):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype, copy=True) if any_grad \
                else None
            offset += n


_CURRENT: Group | None = None


def current() -> Group | None:
    """The active rank's group, None in one process (the trainers' default path)."""
    return _CURRENT


@contextlib.contextmanager
def active(group: Group):
    global _CURRENT
    previous, _CURRENT = _CURRENT, group
    try:
        yield group
    finally:
        _CURRENT = previous


def fault_after_step(rank: int, step: int) -> None:
    """The test hook (`FAULT_KILL_ENV`): SIGKILL this rank after `step` when asked."""
    want = os.environ.get(FAULT_KILL_ENV)
    if not want:
        return
    parts = want.split(":", 2)
    if int(parts[0]) != rank or int(parts[1]) != step:
        return
    if len(parts) == 3:
        once = Path(parts[2])
        if once.exists():
            return
        once.write_text(f"rank {rank} killed after step {step}\n")
    log.warning("fault injection (%s): rank %d SIGKILLs itself after step %d", want, rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


try:  # loaded here, not in a forked child (`preexec_fn`)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: the controller's stop still applies
    _PRCTL = None


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (a rank whose torchrun died, a torchrun
    whose worker died): no orphaned group holds a GPU."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ------------------------------------------------------------------------------------------------
# The controller (the Celery task's process)
# ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _stop(proc: subprocess.Popen, workdir: Path) -> None:
    """SIGTERM torchrun's process group and every rank, SIGKILL what is left after the grace."""
    pids = [proc.pid]
    for f in workdir.glob("pid-*"):
        with contextlib.suppress(ValueError, OSError):
            pids.append(int(f.read_text()))

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    send(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=_STOP_GRACE_S)


def _rank_error(workdir: Path, log_path: Path, rc: int) -> str:
    """What failed: torchrun's first observed failure (rank, exit code, signal), then each rank's
    own error (`error-<rank>.txt`: the others see their peer's loss as a gloo/nccl error)."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    parts = [f"torchrun exited {rc}"]
    if "Root Cause" in text:
        root = text[text.index("Root Cause"):].splitlines()
        fields = {}
        for line in root[1:12]:
            key, _, value = line.strip().partition(":")
            if key.strip() in ("rank", "exitcode", "traceback") and key.strip() not in fields \
                    and not value.strip().startswith("To enable traceback"):
                fields[key.strip()] = value.strip()
        parts.append("first failure: rank " + ", ".join(
            [fields.get("rank", "?")] + [f"{k} {fields[k]}" for k in ("exitcode", "traceback")
                                         if k in fields]))
    for e in sorted(workdir.glob("error-*.txt")):
        first = (e.read_text(errors="replace").strip().splitlines() or [""])[0]
        parts.append(f"rank {e.stem.split('-', 1)[1]}: {first[:500]}")
    if len(parts) == 1:
        lines = [ln for ln in text[-3000:].splitlines() if ln.strip()]
        parts.append(" | ".join(lines[-4:]))
    return "; ".join(parts)


def run_group(payload: dict[str, Any], *, nproc: int, device: str, backend: str | None = None,
              ctx: "JobContext | None" = None,
              progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              workdir: str | Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `payload` (see `rlhf.trainer.ranks`) on `nproc` ranks; rank 0's `result.json`.

    `ctx`: the job's context (`check()` between polls: a cancel or a lost lease stops the group
    and raises). `progress(step, total, metrics)` for every step rank 0 reported. Raises
    `RankFailed` when the group fails. The group is stopped on every way out but success."""
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="rlhf-ranks-")) if own else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    try:
        payload = {**payload, "backend": backend or default_backend(device), "device": device}
        (wd / "job.json").write_text(json.dumps(payload))
        log_path = wd / "torchrun.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0",
               "-m", "rlhf.trainer.ranks", str(wd)]
        child_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(payload.get("threads") or 1)}
        seen = 0
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                    start_new_session=True, preexec_fn=die_with_parent)
            log.info("training on %d ranks (%s): torchrun pid %d, dir %s", nproc,
                     payload["backend"], proc.pid, wd)
            try:
                while True:
                    done = proc.poll() is not None
                    seen = _report(wd / "progress.jsonl", seen, progress)
                    if done:
                        break
                    if ctx is not None:
                        ctx.check()  # CancelRequested / LeaseLost: the group is stopped below
                    time.sleep(_POLL_S)
            except BaseException:
                log.warning("stopping the training group (torchrun pid %d)", proc.pid)
                _stop(proc, wd)
                raise
            if proc.returncode != 0:
                _stop(proc, wd)  # a rank that outlived torchrun
                error = RankError if any(
                    e.read_text(errors="replace").splitlines()[1:2] == ["deterministic"]
                    for e in wd.glob("error-*.txt")) else RankFailed
                raise error(f"data-parallel training failed: "
                            f"{_rank_error(wd, log_path, proc.returncode)}")
        return json.loads((wd / "result.json").read_text())
    finally:
        if own:
            import shutil

            shutil.rmtree(wd, ignore_errors=True)


def _report(path: Path, seen: int, progress) -> int:
    """Hand the progress lines after the first `seen` to `progress`; the new count."""
    if not path.exists():
        return seen
    lines = path.read_text().splitlines()
    complete = lines if path.read_text().endswith("\n") else lines[:-1]
    for line in complete[seen:]:
        row = json.loads(line)
        if progress is not None:
            progress(row["step"], row["total"], row["metrics"])
    return max(seen, len(complete))


def _threads(threads: int | None, nproc: int) -> int:
    total = threads or os.cpu_count() or 1
    return max(1, total // nproc)


def launch(job_type: str, spec, *, base_dir: str | Path, out_dir: str | Path,
           inputs: dict[str, Any], progress=None, ctx: "JobContext | None" = None,
           device: str = "cpu", threads: int | None = None,
           env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """What every job type's data-parallel training shares: the ranks' `job.json` (`job_type`
    picks the rank trainer in `rlhf.trainer.ranks`; the spec, the directories, the threads per
    rank and the type's own JSON `inputs`), the group on `spec.distributed.nproc_per_node`
    ranks (`run_group`). Returns (rank 0's result, the metrics every distributed job adds:
    `world_size`, `distributed_backend`)."""
    d = spec.distributed
    payload = {"job_type": job_type, "spec": spec.model_dump(mode="json"),
               "base_dir": str(base_dir), "out_dir": str(out_dir),
               "threads": _threads(threads, d.nproc_per_node), **inputs}
    res = run_group(payload, nproc=d.nproc_per_node, device=device, backend=d.backend, ctx=ctx,
                    progress=progress, env=env)
    return res, {"world_size": d.nproc_per_node * d.nnodes,
                 "distributed_backend": d.backend or default_backend(device)}


def _base_as_adapter_off(source, base_dir: str | Path, spec, device: str):
    """A LoRA job's reference is its base: the policy with its adapter off. The controller holds
    no policy, so it loads the base once and computes as the adapter-off policy does (the
    packed forward: no prompt KV reuse)."""
    from rlhf.trainer.dpo import LocalReference

    ref = LocalReference(base_dir, device=device, batch_items=spec.reference.batch_items,
                         dtype=source.wanted)
    ref.prefix_reuse = False
    return ref


def train_dpo_distributed(spec, pairs: Sequence[Any], *, base_dir: str | Path, out_dir: str | Path,
                          eval_pairs: Sequence[Any] = (), reference=None, progress=None,
                          ctx: "JobContext | None" = None, device: str = "cpu",
                          threads: int | None = None, env: dict[str, str] | None = None):
    """`dpo.train_dpo` on `spec.distributed.nproc_per_node` ranks: the same result (rank 0's
    checkpoint — a LoRA job's adapter — in `out_dir`). The reference log-probs are computed here
    once (by `reference`, else the spec's own source) and handed to the ranks."""
    from rlhf.models.loading import load_tokenizer
    from rlhf.trainer.dpo import (AdapterOffReference, DPOTrainResult, PreferenceText,
                                  attach_reference_logps, encode_pairs, make_reference)

    train = [asdict(PreferenceText.of(p)) for p in pairs]
    held = [asdict(PreferenceText.of(p)) for p in eval_pairs]
    ref_payload = None
    if spec.needs_reference:
        tokenizer = load_tokenizer(base_dir, padding_side="right")
        tok, _ = encode_pairs(tokenizer, [*train, *held], max_length=spec.max_length,
                              append_eos=spec.append_eos)
        own = reference is None
        source = make_reference(spec, base_dir=base_dir, device=device) if own else reference
        adapter_off = isinstance(source, AdapterOffReference)  # a LoRA job's reference
        if adapter_off:
            if not own:
                source.close()
            own, source = True, _base_as_adapter_off(source, base_dir, spec, device)
        t0 = time.perf_counter()
        try:
            attach_reference_logps(tok, source)
        finally:
            if own:
                source.close()
        logps = {}
        for p in tok:
            logps[(p.prompt_ids, p.chosen_ids)] = p.ref_chosen
            logps[(p.prompt_ids, p.rejected_ids)] = p.ref_rejected
        describe = {**source.describe(), **({"adapter": "off"} if adapter_off else {})}
        ref_payload = {"describe": describe, "seconds": round(time.perf_counter() - t0, 3),
                       "logps": [[list(k[0]), list(k[1]), v] for k, v in logps.items()]}
    res, extra = launch("dpo", spec, base_dir=base_dir, out_dir=out_dir, progress=progress,
                        ctx=ctx, device=device, threads=threads, env=env,
                        inputs={"train": train, "eval": held, "reference": ref_payload})
    reference_info = res["reference"]
    if ref_payload is not None:
        reference_info["seconds"] = ref_payload["seconds"]
    return DPOTrainResult({**res["metrics"], **extra}, res["applied_ids"], res["eval_ids"],
                          res["unapplied_ids"], reference_info)


def train_ppo_distributed(spec, samples: Sequence[Any], *, base_dir: str | Path, out_dir: str | Path,
                          progress=None, ctx: "JobContext | None" = None, device: str = "cpu",
                          threads: int | None = None, critic_dir: str | Path | None = None,
                          store_dir: str | Path | None = None, env: dict[str, str] | None = None):
    """`ppo.train_ppo` on `spec.distributed.nproc_per_node` ranks: the same result (rank 0's
    checkpoint, critic and state files in `out_dir`)."""
    from rlhf_client.datafiles import SampleRecord

    from rlhf.trainer.ppo import PPOTrainResult

    res, extra = launch("ppo", spec, base_dir=base_dir, out_dir=out_dir, progress=progress,
                        ctx=ctx, device=device, threads=threads, env=env, inputs={
                            "samples": [SampleRecord.of(s).to_json() for s in samples],
                            "critic_dir": None if critic_dir is None else str(critic_dir),
                            "store_dir": None if store_dir is None else str(store_dir)})
    return PPOTrainResult({**res["metrics"], **extra}, res["applied_ids"], res["skipped_ids"],
                          res["curves"], res["critic"], res["state"])


def train_sft_distributed(spec, records: Sequence[Any], *, base_dir: str | Path,
                          out_dir: str | Path, eval_records: Sequence[Any] = (), progress=None,
                          ctx: "JobContext | None" = None, device: str = "cpu",
                          threads: int | None = None, env: dict[str, str] | None = None):
    """`sft.train_sft` on `spec.distributed.nproc_per_node` ranks: the same result (rank 0's
    checkpoint — a LoRA job's adapter — in `out_dir`)."""
    from rlhf_client.datafiles import SFTExample

    from rlhf.trainer.sft import SFTTrainResult

    res, extra = launch("sft", spec, base_dir=base_dir, out_dir=out_dir, progress=progress,
                        ctx=ctx, device=device, threads=threads, env=env, inputs={
                            "train": [asdict(SFTExample.of(r)) for r in records],
                            "eval": [asdict(SFTExample.of(r)) for r in eval_records]})
    return SFTTrainResult({**res["metrics"], **extra}, res["applied_ids"], res["eval_ids"],
                          res["unapplied_ids"])


def train_reward_model_distributed(base_dir: str | Path, train_pairs: Sequence[Any],
                                   eval_pairs: Sequence[Any], spec, *, out_dir: str | Path,
                                   device: str = "cpu", on_step=None,
                                   ctx: "JobContext | None" = None, threads: int | None = None,
                                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """`reward_model.train_reward_model` on `spec.distributed.nproc_per_node` ranks: the same
    metrics, rank 0's reward model (a LoRA job's adapter and score head) in `out_dir`.
    `train_pairs` / `eval_pairs`: `data.Pair`s, as `train_reward_model` takes them."""
    res, extra = launch("reward_model", spec, base_dir=base_dir, out_dir=out_dir,
                        progress=on_step, ctx=ctx, device=device, threads=threads, env=env,
                        inputs={"train": [asdict(p) for p in train_pairs],
                                "eval": [asdict(p) for p in eval_pairs]})
    return {**res["metrics"], **extra}
