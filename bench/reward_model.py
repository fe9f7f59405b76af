"""Reward-model training throughput: ours vs. TRL's `RewardTrainer`, the same work, one run.

    python bench/reward_model.py [--size small] [--pairs 96] [--batch-size 8] [--max-length 64]
                                 [--warmup 2] [--rounds 2] [--threads 1] [--no-trl]

Both sides train, fresh from the same `--size` tiny reward model (Qwen2 sequence classifier, one
label, seed 0, fp32), on the same synthetic preference pairs as the same token ids (ours:
prompt and response encoded separately and concatenated, as the reward service scores them;
TRL gets those ids pre-tokenized as `chosen_ids` / `rejected_ids`): Bradley–Terry loss,
`--batch-size` pairs per optimizer step, torch AdamW, constant lr 1e-5, clip norm 1.0, no
gradient accumulation, fp32 without gradient checkpointing (TRL's RewardConfig defaults to bf16
autocast and gradient checkpointing; both are switched off here, as they are off on our side).
A step is timed from before its forward pass to after the optimizer step (TRL: `on_step_begin`
→ `on_step_end`; ours: `on_step` timestamps, which include building the batch tensors);
pairs/s = timed pairs / timed seconds, after `--warmup` untimed steps.
The sides run one after the other in one process for `--rounds` rounds, alternating which goes
first, so both see the same background load; each run reloads the model (not timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def ours(base: Path, pairs, spec_kwargs: dict, warmup: int, out: Path) -> float:
    from rlhf.trainer.jobs import RewardModelJob
    from rlhf.trainer.reward_model import train_reward_model

    spec = RewardModelJob(model_name="bench", base_dir=str(base), source={"type": "jsonl", "path": "-"},
                          epochs=1, **spec_kwargs)
    stamps: list[float] = [time.perf_counter()]
    train_reward_model(base, pairs, [], spec, out_dir=out,
                       on_step=lambda step, total, m: stamps.append(time.perf_counter()))
    # stamps[k] is the end of step k; step k+1 runs from stamps[k] to stamps[k+1].
    timed = len(stamps) - 1 - warmup
    return timed * spec.batch_size / (stamps[-1] - stamps[warmup])


def trl(base: Path, encoded, batch_size: int, warmup: int, out: Path) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhf.models.loading import load_reward_model, load_tokenizer

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._t)

    ds = Dataset.from_list([{"chosen_ids": c, "rejected_ids": r} for c, r in encoded])
    cfg = RewardConfig(output_dir=str(out), per_device_train_batch_size=batch_size, num_train_epochs=1,
                       learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0,
                       use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                       report_to=[], save_strategy="no", logging_strategy="no",
                       dataloader_num_workers=0, disable_tqdm=True, seed=0)
    timer = Timer()
    trainer = RewardTrainer(model=load_reward_model(base), args=cfg, train_dataset=ds,
                            processing_class=load_tokenizer(base, padding_side="right"),
                            callbacks=[timer])
    trainer.train()
    timed = timer.steps[warmup:]
    return len(timed) * batch_size / sum(timed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--no-trl", action="store_true", help="ours only")
    args = ap.parse_args()

    import torch

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import make_tiny_model
    from rlhf.trainer.data import synthetic_pairs
    from rlhf.trainer.reward_model import _encode

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        tmp = Path(tmp)
        base = make_tiny_model("reward", tmp / "base", size=args.size, seed=0)
        pairs = synthetic_pairs(args.pairs, seed=0)
        encoded = _encode(load_tokenizer(base, padding_side="right"), pairs, args.max_length)
        tokens = sum(len(c) + len(r) for c, r in encoded) / len(encoded)
        results: dict[str, list[float]] = {"ours": [], "trl": []}
        kw = dict(batch_size=args.batch_size, learning_rate=1e-5, max_grad_norm=1.0,
                  max_length=args.max_length, seed=0)
        sides = {"ours": lambda rnd: ours(base, pairs, kw, args.warmup, tmp / f"ours{rnd}"),
                 "trl": lambda rnd: trl(base, encoded, args.batch_size, args.warmup, tmp / f"trl{rnd}")}
        order = ["ours"] if args.no_trl else ["ours", "trl"]
        for rnd in range(args.rounds):
            for name in order if rnd % 2 == 0 else reversed(order):  # alternate who goes first
                results[name].append(sides[name](rnd))
    print(f"size {args.size}, {args.pairs} pairs ({tokens:.0f} tokens per pair, chosen + rejected), "
          f"batch {args.batch_size}, {args.warmup} warm-up steps, {args.rounds} rounds, "
          f"torch threads {args.threads}")
    print("| trainer | pairs/s per round | median pairs/s |")
    print("|---|---|---|")
    for name, runs in results.items():
        if runs:
            print(f"| {name} | {', '.join(f'{x:.1f}' for x in runs)} | {statistics.median(runs):.1f} |")
    if results["trl"]:
        ratio = statistics.median(results["ours"]) / statistics.median(results["trl"])
        print(f"\nours / TRL: {ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
