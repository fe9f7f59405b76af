"""The AI judge (RLAIF) on real PolicyServices (transformers backend, 127.0.0.1) serving tiny models.

A random tiny model knows nothing, so the judges here are taught on the spot with the project's
own SFT (`rlhf.trainer.sft.train_sft`, ~100 steps): the *banana judge* answers the shipped
template's question with the letter of the response that mentions a banana (what the test's
criterion makes "obviously better"); the *first-position judge* always answers " A", the
strongest position bias there is. Held-out cases come from another seed than the training ones.
"""

from __future__ import annotations

import math
import random

import pytest
from helpers import ThreadedApp, make_settings

from rlhf_client import PolicyClient

QUESTION_WORDS = ("what", "where", "when", "who", "why", "how")
ANIMALS = ("cat", "dog", "bird", "horse", "fox", "owl", "frog", "bee")
NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank")
VERBS = ("sit", "run", "jump", "eat", "see", "find", "play")
VERBS_PAST = ("ate", "saw", "found", "took", "held", "bought", "liked")
ADJECTIVES = ("good", "big", "small", "old", "sweet", "red", "green", "soft")
THINGS = ("table", "house", "tree", "river", "box", "chair", "garden")
OTHER_FRUITS = ("apple", "orange", "pear", "grape", "lemon", "cherry", "peach", "plum", "mango")


def _sentence(r: random.Random, fruit: str) -> str:
    t = r.randrange(4)
    if t == 0:
        return f"{r.choice(NAMES)} {r.choice(VERBS_PAST)} the {fruit}."
    if t == 1:
        return f"the {fruit} is {r.choice(ADJECTIVES)}."
    if t == 2:
        return f"I like {fruit}s and {r.choice(ANIMALS)}s."
    return f"a {r.choice(ADJECTIVES)} {fruit} {r.choice(VERBS_PAST)} near the {r.choice(THINGS)}."


def banana_cases(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, better: mentions a banana, worse: another fruit in a sentence of the same shape)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = f"{r.choice(QUESTION_WORDS)} did the {r.choice(ANIMALS)} {r.choice(VERBS)}?"
        out.append((prompt, _sentence(r, "banana"), _sentence(r, r.choice(OTHER_FRUITS))))
    return out


def _sft_records(cases, template, answer) -> list[dict]:
    """Judge prompts in both orders, each with the answer `answer(better_shown_first)`."""
    rows = []
    for k, (p, good, bad) in enumerate(cases):
        first = k % 2 == 0
        a, b = (good, bad) if first else (bad, good)
        rows.append({"id": str(k), "prompt": template.render(p, a, b), "completion": answer(first)})
    return rows


def _train_judge(base, out, records, steps: int):
    from rlhf.trainer.jobs import SFTJob
    from rlhf.trainer.sft import train_sft

    spec = SFTJob(model_name="judge", source={"type": "jsonl", "path": "unused"}, max_steps=steps,
                  batch_size=16, learning_rate=3e-3, append_eos=False, eval_fraction=0.0, seed=0)
    train_sft(spec, records, base_dir=base, out_dir=out, threads=1)
    return out


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    """(banana judge, first-position judge) checkpoints, SFT-trained from the tiny policy."""
    from rlhf.models.tiny import make_tiny_model
    from rlhf.trainer.judge import JudgeTemplate

    root = tmp_path_factory.mktemp("judges")
    base = make_tiny_model("policy", root / "base", size="tiny", seed=0)
    template = JudgeTemplate.load()
    banana = _train_judge(base, root / "banana-judge",
                          _sft_records(banana_cases(1600, seed=0), template,
                                       lambda first: " A" if first else " B"), steps=100)
    biased = _train_judge(base, root / "first-judge",
                          _sft_records(banana_cases(480, seed=1), template, lambda first: " A"), steps=30)
    return banana, biased


def _serve(model_dir):
    from rlhf.policy.app import make_policy_app

    return ThreadedApp(make_policy_app(make_settings(model_dir=model_dir)))


@pytest.fixture(scope="module")
def banana_target(judge_dirs):
    with _serve(judge_dirs[0]) as served:
        yield served.target


@pytest.fixture(scope="module")
def biased_target(judge_dirs):
    with _serve(judge_dirs[1]) as served:
        yield served.target


@pytest.fixture(scope="module")
def banana(banana_target):
    from rlhf.trainer.judge import JudgeLabeller

    labeller = JudgeLabeller(banana_target, timeout=60)
    yield labeller
    labeller.close()


# ------------------------------------------------------------------------------------------------
# on the served judges
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_response_the_template_makes_better_wins_in_either_position(banana):
    cases = banana_cases(12, seed=99)  # not the training seed
    triples = [t for p, good, bad in cases for t in ((p, good, bad), (p, bad, good))]
    probs = banana.judge.preferences(triples)
    for k, (p, good, bad) in enumerate(cases):
        p_good, p_bad = probs[2 * k], probs[2 * k + 1]
        assert p_good > 0.9, (p, good, bad, p_good)
        assert abs(p_good + p_bad - 1.0) < 1e-12  # swapping is handled by construction
    # each order alone already prefers the banana: the judge reads the responses, not positions
    for (a_first, b_first), (p, good, bad) in zip(banana.judge.order_probabilities(triples[::2]), cases):
        assert a_first > 0.8 and b_first < 0.2
    # one comparison at a time (other batches) gives the same numbers
    p, good, bad = cases[0]
    assert abs(banana.compare(p, good, bad) - probs[0]) < 1e-5
    assert abs(banana.compare(p, bad, good) - (1.0 - probs[0])) < 1e-5


@pytest.mark.slow
def test_equal_responses_and_a_first_position_judge_give_a_half(biased_target):
    from rlhf.trainer.judge import AIJudge

    with PolicyClient(biased_target, timeout=60) as client:
        judge = AIJudge(client)
        cases = banana_cases(6, seed=7)
        triples = [(p, good, bad) for p, good, bad in cases]
        for a_first, b_first in judge.order_probabilities(triples):
            assert a_first > 0.95 and b_first > 0.95  # the bias is real: "A" whatever is shown
        for prob in judge.preferences(triples):
            assert abs(prob - 0.5) < 0.05
        same = judge.preferences([(p, good, good) for p, good, _ in cases])
        assert same == [0.5] * len(cases)  # the same render in both orders: exactly a half
        info = client.get_model()
        assert judge.model == info.model


@pytest.mark.slow
def test_group_scores_are_bradley_terry_consistent(banana):
    from rlhf.trainer.judge import P_CLIP

    (p, good, bad), (_, _, bad2) = banana_cases(2, seed=123)
    scores = banana.score_groups([p, p, p, p], [[bad, good, bad2], [good], [], [bad, good]])
    three, one, empty, two = scores
    assert three[1] == max(three) and three[1] > 0 > min(three)
    assert abs(sum(three)) < 1e-9 and one == [0.0] and empty == []
    prob = banana.compare(p, bad, good)
    logit = math.log(max(prob, P_CLIP)) - math.log1p(-min(prob, 1 - P_CLIP))
    assert abs(two[0] - logit) < 1e-4 and abs(two[1] + logit) < 1e-4  # s_i − s_j = logit P(i ≻ j)
    assert all(math.isfinite(s) for g in scores for s in g)
    with pytest.raises(ValueError, match="2 groups for 1 prompts"):
        banana.score_groups([p], [[good], [bad]])


@pytest.mark.slow
def test_name_is_the_served_version(banana, banana_target):
    from rlhf.trainer.labellers import Labeller, is_absolute

    with PolicyClient(banana_target) as client:
        info = client.get_model().model
    assert banana.name == f"judge:{info.name}@{info.version}"
    assert isinstance(banana, Labeller) and not is_absolute(banana)


def _random_text(r: random.Random, n: int) -> str:
    """n code points: ASCII, Latin, Hebrew / Arabic (RTL), combining marks, CJK, emoji (with
    ZWJ and variation selectors), NUL and other controls, private use; never a surrogate."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xC0, 0x24F), (0x590, 0x5FF), (0x600, 0x6FF),
              (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x200D, 0x200F),
              (0xFE00, 0xFE0F), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = r.choice(ranges)
        c = r.randint(lo, hi)
        out.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0xFFFD))
    return "".join(out)


def n_renders(triples) -> int:
    """Distinct filled templates the judge asks for: each comparison's two orders, shared."""
    return len({(p, x, y) for p, a, b in triples for x, y in ((a, b), (b, a))})


@pytest.mark.slow
def test_scores_are_finite_for_any_unicode(banana):
    """Seeded random strings over every plane: finite probabilities that swap exactly, finite
    scores; responses too long for the model's 512-token context are cut until they fit."""
    r = random.Random(20260101)
    triples = []
    for k in range(8):
        long = k % 3 == 0  # thousands of code points: several times the context in tokens
        a = _random_text(r, r.randint(1500, 3000) if long else r.randint(0, 40))
        b = _random_text(r, r.randint(0, 60))
        triples.append((_random_text(r, r.randint(1, 30)), a, b))
    triples.append(("\x00", "", "\u202e\u0301\U0001F600\u200d\U0001F469"))  # NUL prompt, empty response
    swapped = [(p, b, a) for p, a, b in triples]
    calls = []
    generate = banana.client.generate

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return generate(*args, **kwargs)

    banana.client.generate = counted  # the real client, its calls counted
    try:
        probs = banana.judge.preferences(triples + swapped)
    finally:
        del banana.client.generate
    assert len(calls) > 1 and set(calls) == {2 * n_renders(triples)}  # refused, cut, sent again
    n = len(triples)
    for k in range(n):
        assert math.isfinite(probs[k]) and 0.0 <= probs[k] <= 1.0
        assert abs(probs[k] + probs[n + k] - 1.0) < 1e-12
    scores = banana.score_groups([p for p, _, _ in triples], [[a, b, a] for _, a, b in triples])
    assert all(math.isfinite(s) for g in scores for s in g)


@pytest.mark.slow
def test_a_prompt_that_cannot_fit_is_a_clear_error(banana):
    from rlhf.trainer.judge import JudgeError

    with pytest.raises(JudgeError, match="does not fit its model's context"):
        banana.compare("why " * 600, "a", "b")


@pytest.mark.slow
def test_a_custom_template_file_is_used_with_its_answers(banana, banana_target, tmp_path):
    """The shipped body with the answers swapped in the file's settings: " B" now means the
    first response is better, so the judge's verdicts flip; a small max_response_chars in the
    file cuts the responses (the banana at their end is no longer seen: about a half)."""
    from rlhf.trainer.judge import DEFAULT_TEMPLATE, JudgeLabeller

    body = DEFAULT_TEMPLATE.read_text(encoding="utf-8").split("---\n", 2)[2]
    swapped = tmp_path / "swapped.txt"
    swapped.write_text('---\n# answers swapped\nanswers: [" B", " A"]\n---\n' + body, encoding="utf-8")
    cases = banana_cases(4, seed=5)
    want = banana.judge.preferences(cases)
    flipped = JudgeLabeller(banana_target, swapped)
    try:
        assert flipped.judge.template.answers == (" B", " A")
        got = flipped.judge.preferences(cases)
    finally:
        flipped.close()
    for w, g in zip(want, got):
        assert w > 0.9 and abs(g - (1.0 - w)) < 1e-5
    short = tmp_path / "short.txt"
    short.write_text("---\nmax_response_chars: 4\n---\n" + body, encoding="utf-8")
    cut = JudgeLabeller(banana_target, short)
    try:
        rendered = cut.judge.template.render("q", "the banana is sweet.", "the apple is sweet.")
        assert "Response A: the…" in rendered and "banana" not in rendered
        assert all(abs(p - 0.5) < 1e-9 for p in cut.judge.preferences(
            [(p, f"the {g}", f"the {b}") for p, g, b in [("q", "banana", "apple")]]))
    finally:
        cut.close()


@pytest.mark.slow
def test_cli_compare(banana, banana_target, tmp_path, capsys):
    import json

    from rlhf.cli import main

    p, good, bad = banana_cases(1, seed=77)[0]
    assert main(["judge", "compare", "--target", banana_target, "--prompt", p, good, bad, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["p_a_over_b"] - banana.compare(p, good, bad)) < 1e-5 and out["p_a_over_b"] > 0.9
    assert out["a_first"] > 0.5 > out["b_first"] and out["judge"] == banana.name
    assert main(["judge", "compare", "--target", banana_target, "--prompt", p, bad, good]) == 0
    assert capsys.readouterr().out.startswith("P(A ≻ B) = 0.0")
    bad_template = tmp_path / "bad.txt"
    bad_template.write_text("{prompt} only", encoding="utf-8")
    assert main(["judge", "compare", "--target", banana_target, "--prompt", p, "--template",
                 str(bad_template), good, bad]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlhf judge compare: template ") and "{response_a}" in err


# ------------------------------------------------------------------------------------------------
# templates (no server)
# ------------------------------------------------------------------------------------------------


def test_the_shipped_template_loads():
    from rlhf.trainer.judge import DEFAULT_TEMPLATE, JudgeTemplate

    t = JudgeTemplate.load()
    assert t == JudgeTemplate.load(DEFAULT_TEMPLATE)
    assert t.answers == (" A", " B") and t.max_response_chars == 2000
    out = t.render("2 + 2?", "4", "5")
    assert out.endswith("Answer:") and "Question: 2 + 2?" in out
    assert "Response A: 4" in out and "Response B: 5" in out and "---" not in out


def test_values_go_in_once_and_other_braces_stay(tmp_path):
    from rlhf.trainer.judge import JudgeTemplate

    t = JudgeTemplate('{"q": "{prompt}"} 1) {response_a} 2) {response_b} {other}', max_response_chars=8)
    out = t.render("{response_b}", "{prompt}", "x" * 10 + "\ud800")
    assert out == '{"q": "{response_b}"} 1) {prompt} 2) xxxxxxx… {other}'
    assert t.render("p", "", "y\ud800") == '{"q": "p"} 1)  2) y? {other}'  # a lone surrogate cannot be sent


@pytest.mark.parametrize(
    "text, message",
    [
        ("no placeholders", r"no \{prompt\}, \{response_a\}, \{response_b\}"),
        ("---\nanswers: [\" A\"]\n---\n{prompt}{response_a}{response_b}", "two non-empty strings"),
        ("---\nanswers: [\" A\", \" A\"]\n---\n{prompt}{response_a}{response_b}", "neither may begin"),
        ("---\nanswers: [\" Yes\", \" Y\"]\n---\n{prompt}{response_a}{response_b}", "neither may begin"),
        ("---\ntemperature: 0\n---\n{prompt}{response_a}{response_b}", "line 2: expected one of"),
        ("---\nmax_response_chars: lots\n---\n{prompt}{response_a}{response_b}", "line 2: max_response_chars: not a JSON"),
        ("---\nmax_response_chars: 1\n---\n{prompt}{response_a}{response_b}", "an integer ≥ 2"),
        ("---\nanswers: [\" A\", \" B\"]\n{prompt}{response_a}{response_b}", "never closed"),
    ],
    ids=["placeholders", "one-answer", "same-answers", "prefix-answers", "unknown-key", "not-json",
         "too-short", "unclosed"],
)
def test_bad_template_files_are_refused_naming_the_problem(tmp_path, text, message):
    from rlhf.trainer.judge import JudgeError, JudgeTemplate

    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(JudgeError, match=message) as err:
        JudgeTemplate.load(path)
    assert str(path) in str(err.value)
    with pytest.raises(JudgeError, match="cannot read it"):
        JudgeTemplate.load(tmp_path / "missing.txt")
