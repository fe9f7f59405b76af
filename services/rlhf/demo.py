"""`rlhf demo` — the main job on the embedded default.

Makes a tiny policy locally, serves it (`rlhf serve policy` in its own process), generates from
the Python client and prints the completions. Later issues grow it into the full loop.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import start_service
    from rlhf_client import PolicyClient, SamplingParams

    console = Console()
    work: Path = args.workdir
    policy_dir = work / "models" / "policy"
    with console.status("making a tiny policy (Qwen2, local tokenizer)…"):
        if not (policy_dir / "config.json").exists():
            make_tiny_model("policy", policy_dir, size="tiny", seed=0)
    console.print(f"[green]✓[/] tiny policy at {policy_dir}")
    with console.status("starting the policy service and warming it up…"):
        svc = start_service("policy", ["--model", str(policy_dir), "--metrics-port", "0"], work / "logs" / "policy.log")
    console.print(f"[green]✓[/] PolicyService SERVING on {svc.target}")
    try:
        prompts = ["the cat sat on the", "a good dog likes", "please pass the red", "one two three"][: args.prompts]
        with PolicyClient(svc.target) as client:
            info = client.get_model()
            result = client.generate(
                prompts, SamplingParams(temperature=0.8, top_k=20, max_new_tokens=24, seed=7, return_logprobs=True), n=2
            )
        table = Table(title=f"completions from {info.model.name}@{info.model.version} ({info.backend})")
        for col in ("prompt", "#", "completion", "tokens", "mean log-prob", "finish"):
            table.add_column(col)
        for c in result.completions:
            mean_lp = sum(c.logprobs) / max(1, len(c.logprobs))
            table.add_row(prompts[c.prompt_index], str(c.sample_index), repr(c.text), str(len(c.token_ids)),
                          f"{mean_lp:.3f}", c.finish_reason.name)
        console.print(table)
    finally:
        code = svc.stop()
        console.print(f"policy service stopped (exit {code})")
    return 0 if code == 0 else 1
