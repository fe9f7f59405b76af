"""A rank of a data-parallel training group: `torchrun ... -m rlhf.trainer.ranks <dir>`.

Started by `rlhf.trainer.distributed.run_group` (the Celery task's controller), never by hand.
Reads `<dir>/job.json` (the spec, the items, DPO's reference log-probs), joins the process group
(env:// from torchrun), runs the job type's ordinary trainer (`TRAINERS`: `train_dpo`,
`train_ppo`, `train_sft`, `train_reward_model`) with a `distributed.Group` active (sharded
micro-batches, globally normalised losses, gradients summed over the ranks) and — rank 0
alone — saves the checkpoint to the job's `out_dir`, appends every step to
`<dir>/progress.jsonl` and writes `<dir>/result.json`. A rank that fails writes its error to
`<dir>/error-<rank>.txt` and exits 1 (torchrun then stops the others and exits non-zero).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("rlhf.trainer.ranks")


class CachedReference:
    """Reference log-probs the controller computed once, looked up by (prompt, completion)."""

    def __init__(self, payload: dict[str, Any]):
        self.info = dict(payload["describe"])
        self.logps = {(tuple(p), tuple(c)): float(v) for p, c, v in payload["logps"]}

    def sequence_logps(self, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
        return [self.logps[(tuple(p), tuple(c))] for p, c in items]

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def close(self) -> None:
        pass


def _dpo(spec, job: dict[str, Any], out_dir, progress) -> dict[str, Any]:
    from rlhf.trainer.dpo import train_dpo

    reference = CachedReference(job["reference"]) if job.get("reference") else None
    res = train_dpo(spec, job["train"], base_dir=job["base_dir"], out_dir=out_dir,
                    eval_pairs=job["eval"], reference=reference, progress=progress,
                    device=job["device"], threads=job["threads"])
    return {"metrics": res.metrics, "applied_ids": res.applied_ids, "eval_ids": res.eval_ids,
            "unapplied_ids": res.unapplied_ids, "reference": res.reference}


def _ppo(spec, job: dict[str, Any], out_dir, progress) -> dict[str, Any]:
    from rlhf.trainer.ppo import train_ppo

    store = None
    if job.get("store_dir"):
        from rlhf.models.store import ModelStore

        store = ModelStore(job["store_dir"])
    res = train_ppo(spec, job["samples"], base_dir=job["base_dir"], out_dir=out_dir,
                    progress=progress, device=job["device"], threads=job["threads"],
                    critic_dir=job.get("critic_dir"), store=store)
    return {"metrics": res.metrics, "applied_ids": res.applied_ids,
            "skipped_ids": res.skipped_ids, "curves": res.curves, "critic": res.critic,
            "state": res.state}


def _sft(spec, job: dict[str, Any], out_dir, progress) -> dict[str, Any]:
    from rlhf.trainer.sft import train_sft

    res = train_sft(spec, job["train"], base_dir=job["base_dir"], out_dir=out_dir,
                    eval_records=job["eval"], progress=progress, device=job["device"],
                    threads=job["threads"])
    return {"metrics": res.metrics, "applied_ids": res.applied_ids, "eval_ids": res.eval_ids,
            "unapplied_ids": res.unapplied_ids}


def _reward_model(spec, job: dict[str, Any], out_dir, progress) -> dict[str, Any]:
    from rlhf.trainer.data import Pair
    from rlhf.trainer.reward_model import train_reward_model

    metrics = train_reward_model(job["base_dir"], [Pair(**p) for p in job["train"]],
                                 [Pair(**p) for p in job["eval"]], spec, out_dir=out_dir,
                                 device=job["device"], on_step=progress, threads=job["threads"])
    return {"metrics": metrics}


#: job type → the rank's trainer: `(spec, job.json, out_dir (rank 0 only, else None),
#: progress) → rank 0's result.json`. Each runs the type's ordinary one-process trainer.
TRAINERS = {"dpo": _dpo, "ppo": _ppo, "sft": _sft, "reward_model": _reward_model}


def _train(job: dict[str, Any], group, workdir: Path) -> dict[str, Any]:
    from rlhf.trainer.distributed import fault_after_step
    from rlhf.trainer.jobs import parse_spec

    trainer = TRAINERS.get(job["job_type"])
    if trainer is None:
        raise ValueError(f"job type {job['job_type']!r} has no data-parallel trainer")
    spec = parse_spec(job["spec"])
    progress_file = workdir / "progress.jsonl"

    def progress(step: int, total: int, metrics: dict[str, Any]) -> None:
        if group.is_main:
            with progress_file.open("a") as f:
                f.write(json.dumps({"step": step, "total": total, "metrics": metrics}) + "\n")
        fault_after_step(group.rank, step)

    return trainer(spec, job, job["out_dir"] if group.is_main else None, progress)


def main(argv: list[str] | None = None) -> int:
    from rlhf.trainer.distributed import Group, active, die_with_parent

    die_with_parent()  # torchrun gone (killed with the worker): this rank goes too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(levelname)s "
                        "%(name)s: %(message)s")
    workdir = Path((argv or sys.argv[1:])[0])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    (workdir / f"pid-{rank}").write_text(str(os.getpid()))
    job = json.loads((workdir / "job.json").read_text())
    try:
        import torch
        import torch.distributed as dist

        device = job["device"]
        if device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = job["device"] = f"cuda:{local}"
        dist.init_process_group(backend=job["backend"])
        try:
            with active(Group(rank, world, device)) as group:
                result = _train(job, group, workdir)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank == 0:
            tmp = workdir / "result.json.tmp"
            tmp.write_text(json.dumps(result))
            tmp.replace(workdir / "result.json")
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the controller, then exit 1
        # a ValueError (DPOError, PPOError, DataError, TrainingDiverged) fails the same way
        # again: the controller fails the job at once instead of retrying it
        (workdir / f"error-{rank}.txt").write_text(
            f"{type(exc).__name__}: {exc}\n" + ("deterministic\n" if isinstance(exc, ValueError)
                                                else "") + traceback.format_exc()[-4000:])
        raise


if __name__ == "__main__":
    sys.exit(main())
