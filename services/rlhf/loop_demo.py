"""`rlhf demo --algo loop` — online DPO as one managed loop (job type `iterate`) on the demo's stack.

The same stack as `--algo ppo` (`rlhf.demo._stack`: the tiny policy published and followed by the
PolicyService, a reward model trained here on the banana pairs behind the RewardService, the
ReferenceService on the original policy, a Celery trainer worker). Then ONE `iterate` job is
submitted — what `rlhf loop start FILE` submits — and followed live: each round samples 16
responses per prompt from the active version, the reward model labels them, the best and the
worst make a pair, a DPO job (run by the worker inside the loop) trains from the round's starting
version, the loop activates the result, waits until the policy service serves it and evaluates it
on held-out prompts (mean reward, KL to the original, win rate against the previous version).
The rounds are printed as a table and plotted (`rlhf loop plot`).
"""

from __future__ import annotations

import argparse
import time

#: The banana task's prompts ("<name> asked about the <noun>:", 100 of them): every fifth one is
#: held out (evaluation only), the rest are sampled from each round.
def banana_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of the banana task."""
    from rlhf.demo import NAMES, NOUNS

    prompts = [f"{a} asked about the {b}:" for a in NAMES for b in NOUNS]
    held = prompts[3::5]
    return [p for p in prompts if p not in held], held


#: Each round: every training prompt × 16 samples of 8 tokens, one best-vs-worst pair per prompt,
#: DPO with RPO's NLL term on the chosen responses. The tiny policy's random samples give the reward
#: model little to tell apart: plain sigmoid DPO mostly pushes the rejected ones down and the
#: held-out reward wanders; with the NLL term and best-of-16 it rises every round (tests/integration/
#: test_loop.py measures it on four sampling seeds).
SAMPLES_PER_PROMPT = 16
MAX_NEW_TOKENS = 8
TRAIN = {"learning_rate": 2e-3, "beta": 0.1, "rpo_alpha": 1.0, "batch_size": 16,
         "max_length": 48, "epochs": 4, "eval_fraction": 0.0}


def banana_loop_spec(model_name: str, *, policy: str, reward: str, reference: str, rounds: int,
                     seed: int = 3, **over) -> dict:
    """An `iterate` spec: online DPO on the banana task, labelled by the reward model at `reward`."""
    train, held_out = banana_prompts()
    spec = {
        "type": "iterate", "model_name": model_name, "policy": policy, "reference": reference,
        "rounds": rounds, "labeller": {"type": "reward", "target": reward},
        "prompts": {"texts": train}, "held_out": {"prompts": {"texts": held_out}, "n": 8},
        "sampling": {"n": SAMPLES_PER_PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "seed": seed},
        "pairs": {"builder": "best_vs_worst"}, "train": dict(TRAIN), "swap_timeout_s": 120,
    }
    spec.update(over)
    return spec


def run_loop_demo(args: argparse.Namespace, *, console=None, timeout_s: float = 1800.0) -> int:
    """Exit 0 when the loop succeeded and the last round's held-out mean reward beats round 0's."""
    from rich.console import Console
    from rlhf_client import TrainingClient
    from rlhf_client.redis_conn import connect

    from rlhf.demo import _banana_reward_model, _opt, _stack
    from rlhf.trainer.loop import plot_loop, read_loop
    from rlhf.trainer.loop_cli import follow, rounds_table

    console = console or Console()
    rounds = _opt(args, "iterations")
    with _stack(console, args.workdir, label="loop", redis_url=_opt(args, "redis_url"),
                make_reward=lambda src: _banana_reward_model(src, console)) as st:
        spec = banana_loop_spec(st.model_name, policy=st.policy.target, reward=st.reward.target,
                                reference=st.reference.target, rounds=rounds)
        with TrainingClient(st.redis_url) as training:
            loop_id = training.submit_loop(**spec)
        console.print(f"[green]✓[/] loop {loop_id} submitted: {rounds} rounds of "
                      f"{SAMPLES_PER_PROMPT} samples per prompt → reward model → best vs worst → "
                      "DPO → activate → swap → evaluate")
        r = connect(st.redis_url, decode_responses=True)
        try:
            t0 = time.monotonic()
            rc = follow(r, loop_id, interval=1.0, timeout=timeout_s, prog="rlhf demo")
            seconds = time.monotonic() - t0
            st.check_alive()
            status = read_loop(r, loop_id)
        finally:
            r.close()
        done = [x for x in status.rounds if x.get("done")]
        if rc != 0 or len(done) < 2:
            console.print(rounds_table(status))
            return 1
        png = plot_loop(status.rounds, st.work / "demo-loop.png",
                        title=f"online DPO: {len(done) - 1} rounds in {seconds:.0f} s")
        first, last = done[0], done[-1]
        console.print(f"held-out mean reward {first['held_out_score']:.3f} ({first['new_version']})"
                      f" → {last['held_out_score']:.3f} ({last['new_version']}) in {seconds:.0f} s;"
                      f" KL to the original {last.get('kl', float('nan')):.2f} nats per sample")
        console.print(f"[green]✓[/] plot: {png}  (again: rlhf loop plot {loop_id} OUT.png "
                      f"--redis-url {st.redis_url})")
        return 0 if last["held_out_score"] > first["held_out_score"] else 1
