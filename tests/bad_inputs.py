"""The bad inputs of every service, shared by their tests and the field-violation tests.

Generate entries: (name, kwargs for `PolicyClient.generate`, substring naming the field in the
error), shared by every policy backend's tests. Score, compare and log-prob entries name the
field exactly: the path in the proto request the error (and its field violation) starts with.
"""

from __future__ import annotations

from rlhf_client import SamplingParams


def bad_generate_inputs(max_context: int, vocab_size: int, max_new_tokens_limit: int):
    ok = ["hello there"]
    return [
        ("no prompts", dict(prompts=[]), "prompts"),
        ("empty text prompt", dict(prompts=[""]), "prompts[0]"),
        ("empty token prompt", dict(prompts=["fine", []]), "prompts[1]"),
        ("n zero", dict(prompts=ok, n=0), "n"),
        ("n negative", dict(prompts=ok, n=-2), "n"),
        ("max_new_tokens zero", dict(prompts=ok, params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        ("max_new_tokens negative", dict(prompts=ok, params=SamplingParams(max_new_tokens=-5)), "max_new_tokens"),
        ("max_new_tokens over limit",
         dict(prompts=ok, params=SamplingParams(max_new_tokens=max_new_tokens_limit + 1)), "max_new_tokens"),
        ("temperature NaN", dict(prompts=ok, params=SamplingParams(temperature=float("nan"))), "temperature"),
        ("temperature negative", dict(prompts=ok, params=SamplingParams(temperature=-0.5)), "temperature"),
        ("temperature above two", dict(prompts=ok, params=SamplingParams(temperature=2.5)), "temperature"),
        ("temperature infinite", dict(prompts=ok, params=SamplingParams(temperature=float("inf"))), "temperature"),
        ("top_p zero", dict(prompts=ok, params=SamplingParams(top_p=0.0)), "top_p"),
        ("top_p above one", dict(prompts=ok, params=SamplingParams(top_p=1.5)), "top_p"),
        ("top_p NaN", dict(prompts=ok, params=SamplingParams(top_p=float("nan"))), "top_p"),
        ("top_k negative", dict(prompts=ok, params=SamplingParams(top_k=-1)), "top_k"),
        ("prompt over context", dict(prompts=[[5] * (max_context + 1)]), "prompts[0]"),
        ("token id over vocab", dict(prompts=[[1, 2, vocab_size]]), "prompts[0].token_ids"),
        ("token id negative", dict(prompts=[[1, -3, 2]]), "prompts[0].token_ids"),
        ("stop id over vocab", dict(prompts=ok, params=SamplingParams(stop_token_ids=(vocab_size + 7,))),
         "stop_token_ids"),
        ("min over max", dict(prompts=ok, params=SamplingParams(max_new_tokens=4, min_new_tokens=8)),
         "min_new_tokens"),
    ]


def bad_score_inputs(max_context: int, vocab: int):
    """(name, items for `RewardClient.score`, field)."""
    long_text = "cat " * (max_context + 10)
    return [
        ("no items", [], "items"),
        ("empty text response", [("hi", "fine"), ("hi", "")], "items[1].text.response"),
        ("empty token response", [([5, 6], [])], "items[0].tokens.response_ids"),
        ("text over context", [("hi", long_text)], "items[0].text"),
        ("tokens over context", [([5] * max_context, [6])], "items[0].tokens"),
        ("response id over vocab", [([5], [6, vocab])], "items[0].tokens.response_ids[1]"),
        ("prompt id negative", [([5, -1], [6])], "items[0].tokens.prompt_ids[1]"),
    ]


def bad_compare_inputs(max_context: int, vocab: int):
    """(args for `RewardClient.compare`, field)."""
    return [
        (("hi", "", "b"), "response_a"),
        (("hi", "a", ""), "response_b"),
        (([5], [6], []), "response_b_ids.ids"),
        (([5], [6, vocab + 3], [7]), "response_a_ids.ids[1]"),
        (([5] * max_context, [6], [7]), "response_a_ids.ids"),
    ]


def bad_logprobs_inputs(max_context: int, vocab: int):
    """(items for `ReferenceClient.logprobs`, field)."""
    return [
        ([], "items"),
        ([([5], [6]), ([], [6])], "items[1].prompt_ids"),
        ([([5], [])], "items[0].completion_ids"),
        ([([5] * max_context, [6])], "items[0]"),
        ([([5], [6] * max_context)], "items[0]"),
        ([([5], [6, 7, vocab])], "items[0].completion_ids[2]"),
        ([([5, -4], [6])], "items[0].prompt_ids[1]"),
    ]
