"""The AI judge (RLAIF): a served language model compares two responses to a prompt.

Any model a PolicyService serves can judge. A template (a text file the user can change) is
filled with the prompt and the two responses; each of the template's two answers (" A": the
first response is better, " B": the second) is appended in turn, and the judge reads the model's
preference from the log-probs of the two continuations:

    P(first ≻ second) = σ(log π(filled + answer_A) − log π(filled + answer_B))

Only the tokens after the two prompts' common token prefix count (the shared prefix's log-probs
cancel; summing only what differs keeps the float32 values the service returns from losing
the difference in a long sum). The prompts' log-probs come from the PolicyService's
`return_prompt_logprobs` (one teacher-forced pass per prompt, on the served version).

Language models prefer a position (often the first). The judge asks both orders and averages:

    P(a ≻ b) = ½·(P_ab(first) + P_ba(second))

so P(a ≻ b) = 1 − P(b ≻ a) by construction, equal responses get exactly ½, and a model that
always answers "A" gets ½ whatever the responses. `JudgeLabeller` turns these into a score per
response (the loop's labeller protocol, `rlhf.trainer.labellers.Labeller`):

    s_i = mean_{j≠i} logit(clip(P(i ≻ j), 1e-6, 1 − 1e-6))

which is Bradley–Terry consistent (s_i − s_j ≈ logit P(i ≻ j) when the judge is) and relative
to the group (each group's scores sum to 0).

Templates: a front-matter block between two "---" lines (comments "#", settings `key: JSON`:
`answers`, `max_response_chars`), then the body with `{prompt}`, `{response_a}`,
`{response_b}` (other braces are literal; the values are inserted in one pass, so a response
containing "{response_b}" stays text). The body's final newline is dropped. The shipped default
is `DEFAULT_TEMPLATE`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from rlhf_client import ModelRef, PolicyClient

__all__ = [
    "AIJudge",
    "DEFAULT_TEMPLATE",
    "JudgeError",
    "JudgeLabeller",
    "JudgeTemplate",
    "add_judge_parser",
    "cmd_judge",
    "combine_orders",
    "group_scores",
]

#: The shipped pairwise template.
DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "judge_pairwise.txt"
PLACEHOLDERS = ("prompt", "response_a", "response_b")
CUT_MARK = "…"
#: Probabilities are clipped to [P_CLIP, 1 − P_CLIP] before a logit: a certain judge gives a
#: large finite score, never an infinite one.
P_CLIP = 1e-6
#: A prompt over the judge model's context is sent again with its responses cut to half as many
#: characters, down to this many; then the judge gives up with a `JudgeError`.
MIN_RESPONSE_CHARS = 16
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response_a|response_b)\}")
_SETTINGS = ("answers", "max_response_chars")
# The PolicyService's refusal of a prompt longer than its model's context (rlhf.policy.generator).
_PROMPT_TEXT_FIELD = re.compile(r"prompts\[(\d+)\]\.text")  # a field violation over the context


class JudgeError(ValueError):
    """A template the judge cannot use, or a comparison it cannot make (the message says why)."""


def _clean(text: str) -> str:
    """`text` with lone surrogates replaced: they cannot be encoded as UTF-8, so the request
    could not be sent at all (every other code point, NUL included, goes as it is)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - len(CUT_MARK))] + CUT_MARK


@dataclass(frozen=True)
class JudgeTemplate:
    """A pairwise judge prompt: `text` with {prompt}, {response_a}, {response_b}; `answers` are
    appended to the filled text (first: "A is better", second: "B is better"); responses longer
    than `max_response_chars` are cut (ending with "…")."""

    text: str
    answers: tuple[str, str] = (" A", " B")
    max_response_chars: int = 2000

    def __post_init__(self) -> None:
        missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in self.text]
        if missing:
            raise JudgeError("the body has no " + ", ".join("{" + p + "}" for p in missing))
        answers = tuple(self.answers)
        if len(answers) != 2 or not all(isinstance(a, str) and a for a in answers):
            raise JudgeError(f"answers: two non-empty strings, got {self.answers!r}")
        if answers[0].startswith(answers[1]) or answers[1].startswith(answers[0]):
            raise JudgeError(f"answers: neither may begin with the other (the judge "
                             f"compares what follows their common part), got {self.answers!r}")
        object.__setattr__(self, "answers", answers)
        limit = self.max_response_chars
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < len(CUT_MARK) + 1:
            raise JudgeError(f"max_response_chars: an integer ≥ 2, got {limit!r}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "JudgeTemplate":
        """The template in the file at `path` (None: the shipped `DEFAULT_TEMPLATE`)."""
        path = Path(DEFAULT_TEMPLATE if path is None else path)
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise JudgeError(f"template {path}: cannot read it: {exc}") from exc
        try:
            return cls.parse(source)
        except JudgeError as exc:
            raise JudgeError(f"template {path}: {exc}") from None

    @classmethod
    def parse(cls, source: str) -> "JudgeTemplate":
        """A template from its file's text (front matter optional; see the module docstring)."""
        settings: dict = {}
        body = source
        lines = source.split("\n")
        if lines and lines[0].rstrip() == "---":
            try:
                end = next(i for i in range(1, len(lines)) if lines[i].rstrip() == "---")
            except StopIteration:
                raise JudgeError("the front matter opened by '---' on line 1 is never closed") from None
            for n, line in enumerate(lines[1:end], start=2):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                key = key.strip()
                if not sep or key not in _SETTINGS:
                    raise JudgeError(f"line {n}: expected one of {', '.join(_SETTINGS)} as "
                                     f"'key: JSON value', got {line.strip()!r}")
                try:
                    settings[key] = json.loads(value)
                except ValueError as exc:
                    raise JudgeError(f"line {n}: {key}: not a JSON value ({exc})") from None
            body = "\n".join(lines[end + 1 :])
        body = body[:-1] if body.endswith("\n") else body
        if "answers" in settings:
            answers = settings["answers"]
            if not isinstance(answers, list):
                raise JudgeError(f"answers: a JSON list of two strings, got {answers!r}")
            settings["answers"] = tuple(answers)
        return cls(body, **settings)

    def render(self, prompt: str, response_a: str, response_b: str, *,
               max_response_chars: int | None = None) -> str:
        """The body with the values in (one pass); responses cut to `max_response_chars`
        (default: the template's)."""
        limit = self.max_response_chars if max_response_chars is None else max_response_chars
        values = {"prompt": _clean(prompt), "response_a": _cut(_clean(response_a), limit),
                  "response_b": _cut(_clean(response_b), limit)}
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.text)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def combine_orders(a_first: float, b_first: float) -> float:
    """P(a ≻ b) from the two orders' P(first shown wins): ½·(a_first + (1 − b_first))."""
    return 0.5 + 0.5 * (a_first - b_first)


def _logit(p: float) -> float:
    p = min(max(p, P_CLIP), 1.0 - P_CLIP)
    return math.log(p) - math.log1p(-p)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class AIJudge:
    """Pairwise preferences from a language model a PolicyService serves.

    `policy`: an `rlhf_client.PolicyClient` (the caller owns and closes it). Each batch of up to
    `batch` comparisons is one Generate call of at most 4·`batch` prompts (two orders × two
    answers; renders shared by several comparisons are asked once), so 4·batch must stay within
    the service's `max_prompts_per_request` (64 by default). `timeout`: seconds per call.
    """

    def __init__(self, policy: "PolicyClient", template: JudgeTemplate | None = None, *,
                 batch: int = 16, timeout: float = 60.0):
        if batch < 1:
            raise ValueError(f"batch: must be ≥ 1, got {batch}")
        self.policy = policy
        self.template = template if template is not None else JudgeTemplate.load(None)
        self.batch = batch
        self.timeout = timeout
        self._model: "ModelRef | None" = None

    @property
    def model(self) -> "ModelRef":
        """The judge's model version: the one that answered last (GetModel before any answer)."""
        if self._model is None:
            self._model = self.policy.get_model(timeout=self.timeout).model
        return self._model

    def preference(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b) for `prompt`: both orders asked, averaged."""
        return self.preferences([(prompt, a, b)])[0]

    def preferences(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        """P(a ≻ b) for each (prompt, a, b), in order: ½·(P_ab(first) + P_ba(second)). Always
        finite, in [0, 1].

        Written ½ + ½·(P_ab(first) − P_ba(first)): swapping a and b only negates the second
        term, so P(a ≻ b) + P(b ≻ a) = 1 to the last bit or so, and equal responses (the same
        render in both orders) give exactly ½."""
        return [combine_orders(_sigmoid(d_ab), _sigmoid(d_ba)) for d_ab, d_ba in self._margins(triples)]

    def order_probabilities(self, triples: Sequence[tuple[str, str, str]]) -> list[tuple[float, float]]:
        """For each (prompt, a, b): (P that the first-shown response wins with a shown first,
        the same with b shown first). A judge without position bias gives p and 1 − p; one that
        always prefers the first position gives two numbers near 1. `preferences` averages
        the first with one minus the second."""
        return [(_sigmoid(d_ab), _sigmoid(d_ba)) for d_ab, d_ba in self._margins(triples)]

    # ------------------------------------------------------------------ the calls
    def _margins(self, triples: Sequence[tuple[str, str, str]]) -> list[tuple[float, float]]:
        """(d_ab, d_ba) per triple: d = log π(… + answer_A) − log π(… + answer_B) of the order
        (a, b) and of the order (b, a)."""
        orders: dict[tuple[str, str, str], float | None] = {}
        for k, t in enumerate(triples):
            if len(t) != 3 or not all(isinstance(x, str) for x in t):
                raise TypeError(f"triples[{k}]: expected (prompt, a, b) strings, got {t!r}")
            p, a, b = t
            orders.setdefault((p, a, b), None)
            orders.setdefault((p, b, a), None)
        keys = list(orders)
        per_call = 2 * self.batch  # renders per call: 2 prompts each
        for s in range(0, len(keys), per_call):
            chunk = keys[s : s + per_call]
            for key, d in zip(chunk, self._ask(chunk)):
                orders[key] = d
        return [(orders[(p, a, b)], orders[(p, b, a)]) for p, a, b in triples]

    def _ask(self, orders: list[tuple[str, str, str]]) -> list[float]:
        """One Generate call: the margin of each (prompt, first, second).

        A prompt over the model's context (the service names it: `prompts[i].text`) is sent again
        with that comparison's responses cut to half as many characters, down to
        MIN_RESPONSE_CHARS; the other comparisons of the call keep theirs."""
        import grpc
        from rlhf_client import RpcError, SamplingParams

        params = SamplingParams(temperature=0.0, max_new_tokens=1, return_prompt_logprobs=True)
        limits = [self.template.max_response_chars] * len(orders)
        ans_a, ans_b = self.template.answers
        while True:
            renders = [self.template.render(p, x, y, max_response_chars=n)
                       for (p, x, y), n in zip(orders, limits)]
            prompts = [text for r in renders for text in (r + ans_a, r + ans_b)]
            try:
                res = self.policy.generate(prompts, params, timeout=self.timeout)
                break
            except RpcError as err:
                over = next((int(m.group(1)) for field, problem in err.field_violations
                             if (m := _PROMPT_TEXT_FIELD.fullmatch(field)) and "the model's context" in problem),
                            None)
                if err.code != grpc.StatusCode.INVALID_ARGUMENT or over is None:
                    raise
                k = over // 2  # two prompts per comparison
                if limits[k] <= MIN_RESPONSE_CHARS:
                    raise JudgeError(
                        f"the judge's prompt does not fit its model's context even with the "
                        f"responses cut to {limits[k]} characters ({err.details}); use a shorter "
                        "template or prompt, or a judge model with a longer context") from None
                limits[k] = max(MIN_RESPONSE_CHARS, limits[k] // 2)
        self._model = res.model
        comps = res.completions  # one sample per prompt, in prompt order
        return [self._margin(comps[2 * i], comps[2 * i + 1]) for i in range(len(renders))]

    @staticmethod
    def _margin(with_a, with_b) -> float:
        """Σ log-probs of what follows the common token prefix, answer A's minus answer B's."""
        ids_a, ids_b = with_a.prompt_token_ids, with_b.prompt_token_ids
        k = _common_prefix(ids_a, ids_b)
        if k == 0:
            raise JudgeError("the two answers change the filled template's first token: the "
                             "template body must not be empty")
        if k == len(ids_a) or k == len(ids_b):
            raise JudgeError("one answer's tokens are a prefix of the other's after the template: "
                             "pick answers that differ in their first token or so")
        # prompt_logprobs[i] is the log-prob of token i + 1: tokens k.. are entries k - 1..
        la = math.fsum(with_a.prompt_logprobs[k - 1 :])
        lb = math.fsum(with_b.prompt_logprobs[k - 1 :])
        if la == lb == -math.inf:
            return 0.0  # the model rules out both answers: no preference
        d = la - lb
        if math.isnan(d):
            raise JudgeError("the judge model returned a NaN log-prob")
        return d


def group_scores(n: int, prob: dict[tuple[int, int], float]) -> list[float]:
    """Scores of a group of n from P(i ≻ j) for i < j (`prob`): s_i = mean_{j≠i} logit(P(i ≻ j)),
    P clipped to [P_CLIP, 1 − P_CLIP]; P(j ≻ i) is 1 − P(i ≻ j). A group of one scores [0.0]."""
    if n == 1:
        return [0.0]
    totals = [0.0] * n
    for (i, j), p in prob.items():
        x = _logit(p)
        totals[i] += x
        totals[j] -= x
    return [t / (n - 1) for t in totals]


class JudgeLabeller:
    """The AI judge as the loop's labeller (`rlhf.trainer.labellers.Labeller`).

    `target`: the PolicyService serving the judge model; `template`: a template file (None: the
    shipped default). Scores are relative to their group (`absolute = False`): each group's sum
    to 0, so the loop compares rounds with `compare`, not with mean scores.
    """

    absolute = False

    def __init__(self, target: str, template: str | Path | None = None, *,
                 token: str | None = None, timeout: float = 60.0, batch: int = 16):
        from rlhf_client import PolicyClient

        loaded = JudgeTemplate.load(template)  # a bad template fails before any connection
        self.client = PolicyClient(target, token=token, timeout=timeout)
        self.judge = AIJudge(self.client, loaded, batch=batch, timeout=timeout)
        try:
            self.judge.model  # the service answers, or the labeller is not built
        except Exception:
            self.client.close()
            raise

    @property
    def name(self) -> str:
        """Provenance: "judge:<model>@<version>" of the version that answered last."""
        m = self.judge.model
        return f"judge:{m.name}@{m.version}"

    def score_groups(self, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per response of each group: every pair in the group compared once (both
        orders), s_i = mean over the others of logit P(i ≻ j)."""
        if len(prompts) != len(groups):
            raise ValueError(f"{len(groups)} groups for {len(prompts)} prompts")
        triples, where = [], []
        for g, (prompt, group) in enumerate(zip(prompts, groups)):
            for i in range(len(group)):
                for j in range(i + 1, len(group)):
                    triples.append((prompt, group[i], group[j]))
                    where.append((g, i, j))
        probs = self.judge.preferences(triples) if triples else []
        per_group: list[dict[tuple[int, int], float]] = [{} for _ in groups]
        for (g, i, j), p in zip(where, probs):
            per_group[g][(i, j)] = p
        return [group_scores(len(group), per_group[g]) if group else []
                for g, group in enumerate(groups)]

    def compare(self, prompt: str, a: str, b: str) -> float:
        """P(a ≻ b) for `prompt`."""
        return self.judge.preference(prompt, a, b)

    def compare_many(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        """P(a ≻ b) for every (prompt, a, b), in batched Generate calls (the loop's evaluation
        compares every held-out sample with the previous version's)."""
        return self.judge.preferences(triples) if triples else []

    def close(self) -> None:
        self.client.close()


# ------------------------------------------------------------------------------------------------
# `rlhf judge compare`
# ------------------------------------------------------------------------------------------------


def add_judge_parser(sub) -> None:
    """`rlhf judge compare --target T --prompt P A B` (`sub`: the CLI's subparsers)."""
    p = sub.add_parser("judge", help="ask a served model (the AI judge) which response is better")
    jsub = p.add_subparsers(dest="judge_command", required=True)
    c = jsub.add_parser("compare", help="P(A ≻ B) for a prompt, both orders asked")
    c.add_argument("--target", required=True, help="the PolicyService serving the judge model")
    c.add_argument("--prompt", required=True)
    c.add_argument("a", metavar="A", help="response A")
    c.add_argument("b", metavar="B", help="response B")
    c.add_argument("--template", type=Path, default=None,
                   help=f"template file (default: the shipped {DEFAULT_TEMPLATE.name})")
    c.add_argument("--token", default=None, help="the service's auth token (default: the settings')")
    c.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    c.add_argument("--json", action="store_true", help="one JSON object instead of text")


def cmd_judge(args, settings=None) -> int:
    """Run `rlhf judge compare`: 0 with the verdict on stdout, 1 on a failure (one line on
    stderr: a bad template, an unreachable service, a refused request)."""
    import sys

    from rlhf_client import PolicyClient, RpcError

    token = args.token
    if token is None:
        if settings is None:
            from rlhf.config import Settings

            settings = Settings()
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
    try:
        template = JudgeTemplate.load(args.template)
        with PolicyClient(args.target, token=token, timeout=args.timeout) as client:
            judge = AIJudge(client, template, timeout=args.timeout)
            ((a_first, b_first),) = judge.order_probabilities([(args.prompt, args.a, args.b)])
            model = judge.model
    except (JudgeError, RpcError) as exc:
        print(f"rlhf judge compare: {exc}", file=sys.stderr)
        return 1
    p = combine_orders(a_first, b_first)
    labeller = f"judge:{model.name}@{model.version}"
    if args.json:
        print(json.dumps({"p_a_over_b": p, "a_first": a_first, "b_first": b_first, "judge": labeller}))
    else:
        print(f"P(A ≻ B) = {p:.4f}   ({labeller}; first-shown wins: {a_first:.4f} with A first, "
              f"{b_first:.4f} with B first)")
    return 0
