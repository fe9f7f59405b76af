"""Data-parallel DPO or SFT: 2 ranks vs 1 rank (torchrun, gloo on CPU), side by side in one run.

    python bench/distributed.py [--job dpo|sft] [--size tiny] [--batch-size 8] [--grad-accum 1]
                                [--steps 12] [--pairs 96] [--max-length 64] [--threads 2]
                                [--repeats 2]

Every row trains the same policy (a `--size` tiny model, seed 0) on the same synthetic pairs
(`--job sft`: their prompts and chosen responses as examples) with the same global batch
(`--batch-size` × `--grad-accum` items per optimizer step) for `--steps` steps; DPO's reference
= the base (log-probs computed once by the controller):
  1 process   `train_<job>` in this process, `--threads` intra-op threads
  1 process, 1 thread   the same with one thread (what each of 2 ranks gets of 2 threads)
  1 rank      `train_<job>_distributed`, nproc 1 (torchrun, one rank with `--threads` threads)
  2 ranks     `train_<job>_distributed`, nproc 2 (each rank `--threads` / 2 threads)
so every row but the second has the same CPU threads in all. items/s = optimizer-step pairs
(examples) / the time of the optimizer steps (rank 0's `train_seconds`: start-up, model loading
and the reference pass excluded); wall = the whole call (torchrun and the ranks' start-up
included). Rows run in turn,
`--repeats` times, alternating the order; the table shows the median and every repeat (on a
shared machine the spread is the first thing to read). The final weights of the
1-rank and 2-rank runs must agree with the 1-process run (max |Δw| printed).
On a 2-core machine shared with other work, 2 ranks are not expected to be faster: the table
says what they cost (all-reduce, duplicated work outside the steps), not what a GPU node gains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=("dpo", "sft"), default="dpo")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args()

    from dpo import make_pairs  # bench/dpo.py: synthetic pairs that fit max_length

    from rlhf.models.tiny import make_tiny_model
    from rlhf.trainer.distributed import train_dpo_distributed, train_sft_distributed
    from rlhf.trainer.dpo import train_dpo
    from rlhf.trainer.jobs import parse_spec
    from rlhf.trainer.sft import train_sft

    work = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    base = make_tiny_model("policy", work / "policy", size=a.size, seed=0)
    pairs = make_pairs(a.pairs, 0, a.max_length)
    fields = {"type": a.job, "model_name": "bench", "source": {"type": "jsonl", "path": "-"},
              "batch_size": a.batch_size, "grad_accum_steps": a.grad_accum, "max_steps": a.steps,
              "max_length": a.max_length, "learning_rate": 1e-4}
    if a.job == "dpo":
        fields["beta"] = 0.1
        items, train, train_distributed, rate = pairs, train_dpo, train_dpo_distributed, \
            "pairs_per_s"
    else:
        items = [{"id": x["id"], "prompt": x["prompt"], "completion": x["chosen"]} for x in pairs]
        train, train_distributed, rate = train_sft, train_sft_distributed, "examples_per_s"

    def one_process(threads: int):
        def run(out: Path) -> dict:
            return train(parse_spec(fields), items, base_dir=base, out_dir=out,
                         threads=threads).metrics
        return run

    def ranks(n: int):
        def run(out: Path) -> dict:
            spec = parse_spec({**fields, "distributed": {"nproc_per_node": n}})
            return train_distributed(spec, items, base_dir=base, out_dir=out,
                                     threads=a.threads).metrics
        return run

    rows = {"1 process": one_process(a.threads), "1 process, 1 thread": one_process(1),
            "1 rank": ranks(1), "2 ranks": ranks(2)}
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    outs: dict[str, Path] = {}
    order = list(rows)
    for rep in range(a.repeats):
        for name in (order if rep % 2 == 0 else order[::-1]):
            out = work / f"{name.replace(' ', '-')}-{rep}"
            t0 = time.perf_counter()
            m = rows[name](out)
            got[name].append((m[rate], time.perf_counter() - t0))
            outs[name] = out
    noun = "pairs" if a.job == "dpo" else "examples"
    print(f"# {a.job.upper()}, {a.size} policy, global batch {a.batch_size * a.grad_accum} {noun} "
          f"({a.batch_size} × {a.grad_accum} accum), {a.steps} steps, {a.threads} threads in all, "
          f"gloo; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; median of {a.repeats}")
    print(f"| run | {noun}/s (steps), median | vs 1 process | each repeat | wall s (incl. "
          "start-up) | max abs dw vs 1 process |")
    print("|---|---|---|---|---|---|")
    ref = statistics.median(x[0] for x in got["1 process"])
    table = []
    for name in rows:
        pps = statistics.median(x[0] for x in got[name])
        wall = statistics.median(x[1] for x in got[name])
        dw = 0.0 if name == "1 process" else max_diff(outs["1 process"], outs[name])
        each = [x[0] for x in got[name]]
        table.append({"run": name, rate: pps, "ratio": pps / ref, "each": each,
                      "wall_s": wall, "max_dw": dw})
        print(f"| {name} | {pps:.1f} | {pps / ref:.2f}x | {', '.join(f'{x:.1f}' for x in each)} "
              f"| {wall:.1f} | {dw:.1e} |")
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
