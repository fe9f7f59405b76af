"""Sequence log-probs for DPO/PPO: the packed, prompt-sharing forward equals a plain teacher-forced
forward over prompt + completion, summed over the completion only — values and gradients."""

from __future__ import annotations

import math
import random

import pytest
from helpers import teacher_forced_logprobs

torch = pytest.importorskip("torch")

from rlhf.trainer.dpo import TokenizedPair, encode_pair, encode_pairs, pair_logps  # noqa: E402
from rlhf.trainer.logprobs import (  # noqa: E402
    completion_logprobs,
    fused_token_logprobs,
    pack_sequences,
)

TOL = 2e-5  # fp32 forward passes of different shapes


@pytest.fixture(scope="module")
def model(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    return load_causal_lm(tiny_policy_dir)


@pytest.fixture(scope="module")
def tok(tiny_policy_dir):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(tiny_policy_dir, padding_side="right")


def random_pairs(n: int, seed: int, vocab: int = 1232) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: tuple(rng.randrange(4, vocab) for _ in range(k))  # noqa: E731
    return [TokenizedPair(f"p{i}", ids(rng.randint(1, 20)), ids(rng.randint(1, 25)),
                          ids(rng.randint(1, 25))) for i in range(n)]


def naive_sum(model, prompt, completion) -> float:
    return math.fsum(teacher_forced_logprobs(model, prompt, completion))


def test_pair_logprobs_equal_a_teacher_forced_forward_over_the_completion_only(model):
    pairs = random_pairs(6, seed=1)
    pairs.append(TokenizedPair("one", (7,), (9,), (11,)))  # one-token prompt and completions
    with torch.no_grad():
        chosen, rejected, n_c, n_r = pair_logps(model, pairs, pad_id=0)
    assert chosen.shape == rejected.shape == (len(pairs),) and chosen.dtype == torch.float64
    for i, p in enumerate(pairs):
        for got, completion in ((chosen[i], p.chosen_ids), (rejected[i], p.rejected_ids)):
            want = naive_sum(model, p.prompt_ids, completion)
            assert abs(float(got) - want) < TOL * len(completion)
        assert (int(n_c[i]), int(n_r[i])) == (len(p.chosen_ids), len(p.rejected_ids))


@pytest.mark.parametrize("kw", [
    dict(),  # packed, prompts shared
    dict(pack_width=48),  # narrow rows: several rows, units split with their own prompt copy
    dict(share_prompts=False),
    dict(pack=False),  # right-padded, length-grouped
    dict(pack=False, forward_cost_tokens=None),  # one padded forward
])
def test_every_path_gives_the_per_token_values_of_the_teacher_forced_forward(model, kw):
    rng = random.Random(2)
    prompts = [tuple(rng.randrange(4, 1000) for _ in range(rng.randint(1, 15))) for _ in range(4)]
    seqs = [(rng.choice(prompts), tuple(rng.randrange(4, 1000) for _ in range(rng.randint(1, 20))))
            for _ in range(10)]
    with torch.no_grad():
        out = completion_logprobs(model, seqs, pad_id=0, **kw)
    rows = out.per_row()
    for (prompt, completion), got in zip(seqs, rows):
        want = teacher_forced_logprobs(model, prompt, completion)
        assert len(got) == len(completion)
        assert max(abs(a - b) for a, b in zip(got, want)) < TOL
    assert out.counts.tolist() == [len(c) for _, c in seqs]
    assert torch.allclose(out.sums, torch.tensor([math.fsum(r) for r in rows], dtype=torch.float64),
                          atol=1e-9)


def test_gradients_equal_those_of_the_naive_forward(model):
    pairs = random_pairs(4, seed=3)
    seqs = [(p.prompt_ids, c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    weights = torch.linspace(-1.0, 2.0, len(seqs), dtype=torch.float64)  # any linear functional

    model.zero_grad(set_to_none=True)
    (completion_logprobs(model, seqs, pad_id=0, pack_width=40).sums * weights).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    total = 0.0
    for w, (prompt, completion) in zip(weights, seqs):
        ids = torch.tensor([list(prompt) + list(completion)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        total = total + w * logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :].sum()
    total.backward()
    for name, p in model.named_parameters():
        scale = max(1.0, float(p.grad.abs().max()))
        assert float((packed[name] - p.grad).abs().max()) < 1e-4 * scale, name
    model.zero_grad(set_to_none=True)


def test_pack_layout_shares_the_prompt_and_hides_siblings():
    seqs = [((5, 6, 7), (8, 9)), ((5, 6, 7), (10,)), ((1, 2), (3, 4, 5))]
    packed, counts = pack_sequences(seqs, width=16, pad_id=0)
    assert counts.tolist() == [2, 1, 3]
    assert packed.input_ids.shape == (1, 3 + 2 + 1 + 2 + 3)  # the shared prompt appears once
    row = packed.input_ids[0].tolist()
    assert row[:6] == [5, 6, 7, 8, 9, 10]
    pos = packed.position_ids[0].tolist()
    assert pos[:6] == [0, 1, 2, 3, 4, 3]  # the second completion also starts right after the prompt
    m = packed.mask[0, 0]
    assert m[5, :3].all() and not m[5, 3:5].any() and m[5, 5]  # sees its prompt, not its sibling
    assert not m[6:, :6].any()  # the other unit sees nothing of the first
    # targets in sequence order; token 0 of each completion is predicted from the prompt's end
    assert packed.targets.tolist() == [8, 9, 10, 3, 4, 5]
    assert packed.src.tolist()[:3] == [2, 3, 2]

    # Several rows come out about even: 50+30 / 40+20+20 (width 80), not 50+40 / 30+20+20 (90).
    units = [((i + 1,) * 10, (7,) * (n - 10)) for i, n in enumerate((50, 40, 30, 20, 20))]
    even, _ = pack_sequences(units, width=100, pad_id=0)
    assert even.input_ids.shape == (2, 80)

    padded, _ = pack_sequences([((1,), (2, 3, 4)), ((5, 6), (7,))], width=4, pad_id=0)
    assert padded.input_ids.shape == (2, 4)
    pad_row = padded.input_ids[1].tolist()
    assert pad_row == [5, 6, 7, 0]
    assert padded.mask[1, 0, 3].tolist() == [False, False, False, True]  # a pad sees only itself


def test_fused_head_matches_log_softmax_gather_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True).double()
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g, dtype=torch.float64)

    got = fused_token_logprobs(hidden, head, targets, tile=8)  # 5 tiles, the last partial
    (got.double() * upstream).sum().backward()
    grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    want = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None])[:, 0]
    (want * upstream).sum().backward()
    assert torch.allclose(got.double(), want, atol=1e-5)  # the kernel computes in fp32
    for a, b in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_eager_attention_packs_with_an_additive_mask(tiny_policy_dir):
    from rlhf.models.loading import load_causal_lm

    eager = load_causal_lm(tiny_policy_dir)
    eager.set_attn_implementation("eager")
    seqs = [((5, 6, 7), (8, 9, 10)), ((5, 6, 7), (11,)), ((40,), (41, 42))]
    with torch.no_grad():
        rows = completion_logprobs(eager, seqs, pad_id=0).per_row()
    for (prompt, completion), got in zip(seqs, rows):
        want = teacher_forced_logprobs(eager, prompt, completion)
        assert max(abs(a - b) for a, b in zip(got, want)) < TOL


# --- tokenization -------------------------------------------------------------------------------


def test_plain_text_pairs_tokenize_as_prompt_then_response_then_eos(tok):
    pair = {"id": "a", "prompt": "is the cat good?", "chosen": " yes, the cat is good.",
            "rejected": " no."}
    tp = encode_pair(tok, pair, max_length=64)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert tp.prompt_ids == tuple(enc(pair["prompt"]))
    eos = [tok.eos_token_id]
    assert tp.prompt_ids + tp.chosen_ids == tuple(enc(pair["prompt"] + pair["chosen"]) + eos)
    assert tp.prompt_ids + tp.rejected_ids == tuple(enc(pair["prompt"] + pair["rejected"]) + eos)
    # rows are cut to max_length keeping their start; a prompt that fills it drops the pair
    cut = encode_pair(tok, pair, max_length=len(tp.prompt_ids) + 2)
    assert cut.chosen_ids == tp.chosen_ids[:2] and cut.rejected_ids == tp.rejected_ids[:2]
    assert encode_pair(tok, pair, max_length=len(tp.prompt_ids)) is None
    assert encode_pair(tok, pair, max_length=64, append_eos=False).chosen_ids == tp.chosen_ids[:-1]
    got, skipped = encode_pairs(tok, [pair, {**pair, "prompt": "cat " * 80}], max_length=64)
    assert [p.id for p in got] == ["a"] and skipped == 1


def test_a_chat_template_renders_the_prompt_as_a_user_turn(tiny_policy_dir):
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_policy_dir, padding_side="right")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pair = {"prompt": "hello", "chosen": "hi there", "rejected": "bye"}
    tp = encode_pair(tok, pair, max_length=64)
    text = tok.decode(list(tp.prompt_ids))
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(list(tp.chosen_ids)) == "hi there<|im_end|>\n"  # the template ends the turn
    assert tok.decode(list(tp.rejected_ids)) == "bye<|im_end|>\n"


# --- sliding windows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def window_models(tmp_path_factory):
    from window_models import ARCHS, make_window_model

    root = tmp_path_factory.mktemp("window-models")
    return {arch: make_window_model(arch, root / arch, window=4) for arch in ARCHS}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2-sliding", "qwen2-mixed"])
def test_sliding_window_models_give_the_values_of_each_sequence_alone(window_models, arch, attn,
                                                                       monkeypatch):
    """Window 4, sequences of up to 30 tokens (shared prompts, several packed rows): every path
    equals a plain teacher-forced forward of each sequence alone. Models whose every layer slides
    stay packed (the window is in the packed mask); mixed full / sliding layers run padded."""
    import rlhf.trainer.logprobs as lp
    from rlhf.models.loading import load_causal_lm

    model = load_causal_lm(window_models[arch])
    model.set_attn_implementation(attn)
    packed = []
    real = lp._forward_packed
    monkeypatch.setattr(lp, "_forward_packed", lambda *a: packed.append(1) or real(*a))
    rng = random.Random(4)
    prompts = [tuple(rng.randrange(4, 1000) for _ in range(rng.randint(1, 12))) for _ in range(3)]
    seqs = [(rng.choice(prompts), tuple(rng.randrange(4, 1000) for _ in range(rng.randint(2, 18))))
            for _ in range(8)]
    assert max(len(p) + len(c) for p, c in seqs) > 4 * 4
    want = [teacher_forced_logprobs(model, p, c) for p, c in seqs]
    for kw in (dict(), dict(pack_width=30), dict(share_prompts=False), dict(pack=False)):
        with torch.no_grad():
            out = completion_logprobs(model, seqs, pad_id=0, **kw)
        worst = max(abs(a - b) for got, w in zip(out.per_row(), want) for a, b in zip(got, w))
        assert worst < TOL, (kw, worst)
        assert [len(r) for r in out.per_row()] == [len(c) for _, c in seqs]
    assert bool(packed) == (arch != "qwen2-mixed")
    # short sequences never reach past the window: packed as plain causal rows, same values
    short = [((5, 6), (7, 8)), ((5, 6), (9,)), ((40,), (41, 42, 43))]
    with torch.no_grad():
        rows = completion_logprobs(model, short, pad_id=0).per_row()
    for (p, c), got in zip(short, rows):
        assert max(abs(a - b) for a, b in zip(got, teacher_forced_logprobs(model, p, c))) < TOL


def test_a_windowed_pack_hides_keys_a_window_or_more_positions_back():
    seqs = [((1, 2, 3), (4, 5, 6)), ((1, 2, 3), (7, 8))]
    packed, _ = pack_sequences(seqs, width=16, pad_id=0, sliding_window=2)
    m = packed.mask[0, 0]
    # row: 1 2 3 | 4 5 6 | 7 8 ; positions 0 1 2 | 3 4 5 | 3 4
    assert m[3].tolist()[:4] == [False, False, True, True]  # token 4 (pos 3) sees pos 2 and 3
    assert m[7].tolist()[:8] == [False, False, False, False, False, False, True, True]
    assert m[6].tolist()[:7] == [False, False, True, False, False, False, True]  # sibling hidden


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("chat", [False, True])
def test_pairs_tokenize_as_trls_dpo_trainer_tokenizes_them(tiny_policy_dir, tmp_path, chat):
    """What `rlhf.trainer.dpo` claims: TRL's DPOTrainer (1.16) makes the same rows and completion
    masks from the same pair — as plain text without a chat template, as a user / assistant
    conversation with one — on a tokenizer that adds no special tokens of its own (the tiny
    models'): tokens merging across the prompt / response boundary, a response that already
    ends with eos, rows cut to max_length, a prompt that fills it (dropped by both)."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_policy_dir, padding_side="right")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    max_length = 24
    pairs = [
        {"id": "plain", "prompt": "is the cat good?", "chosen": " yes, the cat is good.",
         "rejected": " no."},
        {"id": "merge", "prompt": "the cat sat on the", "chosen": "mat.", "rejected": "ma"},
        {"id": "eos", "prompt": "hello", "chosen": " hi<|endoftext|>", "rejected": " bye"},
        {"id": "cut", "prompt": "tell me a story:", "chosen": " the dog ran " * 6,
         "rejected": " no"},
        {"id": "full", "prompt": "cat " * 30, "chosen": " dog", "rejected": " bird"},
    ]
    ours, _ = encode_pairs(tok, pairs, max_length=max_length)

    if chat:
        rows = [{"id": p["id"], "prompt": [{"role": "user", "content": p["prompt"]}],
                 "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    else:
        rows = pairs
    args = DPOConfig(output_dir=str(tmp_path), max_length=max_length, use_cpu=True, bf16=False,
                     report_to=[])
    trainer = SimpleNamespace(_tokenizer=tok, _is_vision_dataset=False)
    prepared = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tok, args,
                                           "train")
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    theirs = {}
    for example in prepared:
        batch = collate([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        ids, attn = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        mask = batch["completion_mask"].tolist()
        theirs[example["id"]] = [(i[: sum(a)], [j for j, m in enumerate(ms) if m])
                                 for i, a, ms in zip(ids, attn, mask)]  # rows without the pads

    assert [p.id for p in ours] == list(theirs) == ["plain", "merge", "eos", "cut"]
    for p in ours:
        mine = [(list(p.prompt_ids + c), list(range(len(p.prompt_ids), len(p.prompt_ids) + len(c))))
                for c in (p.chosen_ids, p.rejected_ids)]
        assert mine == theirs[p.id], p.id
