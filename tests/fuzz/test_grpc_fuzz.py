"""Generated protobuf requests for every RPC of every service, against live servers.

The RPCs are enumerated from the service descriptors (a new RPC is fuzzed without a change
here); each request is drawn from its message descriptor: random field values, huge and negative
numbers, NaN and ±inf, odd unicode and very long strings, empty and oversized lists, set and
unset oneofs. Admin RPCs are called with and without the admin token. Fixed seeds
(`derandomize=True`) and example counts: the same requests on every run.

Promises held (every RPC, every request):
- never UNKNOWN, never INTERNAL; the status is one the design names for the RPC;
- INVALID_ARGUMENT carries field violations, each a path that exists in the request message;
- a targeted defect (one bad value in an otherwise good request) gets INVALID_ARGUMENT naming
  that field, or RESOURCE_EXHAUSTED for too many items / a message over the size limit;
- after each batch every server still answers a normal request, and across rounds of random
  traffic after a warm-up each server's resident memory stays bounded (a ratio, not a time).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import grpc
import pytest
from conftest import FUZZ_REPORT, rss_mb
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from helpers import ADMIN_TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlhfpb.v1 import common_pb2, policy_pb2, reference_pb2, reward_pb2

MODULES = (policy_pb2, reward_pb2, reference_pb2)
ADMIN_METHODS = {"LoadVersion"}  # the servers' admin RPCs (ServiceBinding's admin tuple)
VOCAB, CONTEXT, LIMIT_ITEMS, LIMIT_NEW = 1232, 512, 64, 512  # the tiny models and Settings defaults
MAX_MESSAGE = 4 * 1024 * 1024
TIMEOUT_S = 60
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
DATA_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.OUT_OF_RANGE}
ADMIN_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def all_methods():
    """(service descriptor, method descriptor) of every RPC of every service, from the protos."""
    return [(svc, m) for mod in MODULES for svc in mod.DESCRIPTOR.services_by_name.values()
            for m in svc.methods]


METHODS = all_methods()


# ------------------------------------------------------------------------------------------------
# strategies drawn from the descriptors
# ------------------------------------------------------------------------------------------------

FD = common_pb2.ModelRef.DESCRIPTOR.fields[0].__class__
ODD_TEXT = ["", " ", "\x00", "a\x00b", "\u202eevil", "\ufeff", "é" * 3, "🙂" * 300, "\u0301" * 50,
            "<|endoftext|>", "../escape", "x" * 5000, "\U0010ffff", "日本語のテキスト", "\t\n\r"]
LONG_TEXT = "the quick brown fox " * 10_000  # 200k characters: tokenised, then over the context
OVERSIZE_TEXT = "z" * (MAX_MESSAGE + 1024)  # over the server's receive limit
BIG_INTS = [0, -1, 1, VOCAB - 1, VOCAB, VOCAB + 1, 2**31 - 1, -(2**31), CONTEXT, CONTEXT + 1, 65]
# fields whose valid range is costly to serve: drawn small when valid, any edge value otherwise
SMALL = {
    "max_new_tokens": st.one_of(st.integers(1, 3), st.sampled_from([0, -1, LIMIT_NEW + 1, 2**31 - 1, -(2**31)])),
    "min_new_tokens": st.one_of(st.integers(0, 2), st.sampled_from([-1, 2**31 - 1, -(2**31)])),
    "n": st.one_of(st.integers(1, 2), st.sampled_from([0, -1, -(2**31), 2**31 - 1, 300])),
}


def int_values(signed: bool = True, bits: int = 32):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([v for v in BIG_INTS if lo <= v <= hi]),
                     st.integers(lo, hi))


FLOATS = st.one_of(st.floats(0, 2, width=32), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0,
                                                                3.4e38, -1.0, 1e-45]),
                   st.floats(width=32))
STRINGS = st.one_of(st.text(max_size=40), st.sampled_from(ODD_TEXT), st.just(LONG_TEXT))


TAME = {  # valid-looking values: a tame request gets past validation into the model's code
    "int": st.integers(1, 8), "float": st.floats(0.0625, 1.0, width=32), "str": st.text(min_size=1, max_size=12),
}


def scalar(field, tame: bool = False):
    t = field.type
    if tame and field.name in SMALL:
        return st.integers(0, 1) if field.name == "min_new_tokens" else st.integers(1, 2)
    if field.name in SMALL:
        return SMALL[field.name]
    if tame and t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return TAME["float"]
    if tame and t == FD.TYPE_STRING:
        return TAME["str"]
    if tame and t not in (FD.TYPE_BOOL, FD.TYPE_ENUM, FD.TYPE_BYTES):
        return TAME["int"]
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return int_values()
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return int_values(bits=64)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return int_values(False)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return int_values(False, 64)
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return FLOATS
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return STRINGS
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def list_size(data, field, tame: bool = False) -> int:
    """Mostly short lists; now and then an empty, a limit-sized or an oversized one."""
    if tame:
        return data.draw(st.integers(1, 3), label=f"len({field.name})")
    big = LIMIT_ITEMS + 1 if field.message_type is not None else CONTEXT + 7
    return data.draw(st.one_of(st.integers(0, 4), st.sampled_from([0, LIMIT_ITEMS, big, 3000])),
                     label=f"len({field.name})")


def fill(data, msg, depth: int = 0, tame: bool = False) -> None:
    """Draw every field of `msg` (its descriptor says which), at most 4 messages deep; `tame`:
    valid-looking values and short lists (to reach the code behind the validation)."""
    desc = msg.DESCRIPTOR
    chosen = {o.name: data.draw(st.sampled_from([*([] if tame else [None]), *[f.name for f in o.fields]]),
                                label=o.name)
              for o in desc.oneofs if not o.name.startswith("_")}  # real oneofs, not `optional`
    for field in desc.fields:
        real_oneof = field.containing_oneof is not None and not field.containing_oneof.name.startswith("_")
        if real_oneof and chosen[field.containing_oneof.name] != field.name:
            continue
        if not real_oneof and not (tame and field.is_repeated) and not data.draw(st.booleans(),
                                                                                   label=f"set {field.name}"):
            continue
        repeated = field.is_repeated
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth >= 4:
                continue
            if repeated:
                n = list_size(data, field, tame)
                if n > 8:  # many copies of one drawn item: cheap to draw, as costly to serve
                    item = getattr(msg, field.name).add()
                    fill(data, item, depth + 1, tame)
                    for _ in range(n - 1):
                        getattr(msg, field.name).add().CopyFrom(item)
                else:
                    for _ in range(n):
                        fill(data, getattr(msg, field.name).add(), depth + 1, tame)
            else:
                sub = getattr(msg, field.name)
                sub.SetInParent()
                fill(data, sub, depth + 1, tame)
        elif repeated:
            n = list_size(data, field, tame)
            values = data.draw(st.lists(scalar(field, tame), min_size=min(n, 6), max_size=min(n, 6)), label=field.name)
            if n > 6:  # an oversized list: its drawn head, then valid filler
                values = values + [7] * (n - len(values)) if field.type != FD.TYPE_STRING else values + ["s"] * (n - len(values))
            getattr(msg, field.name).extend(values)
        else:
            setattr(msg, field.name, data.draw(scalar(field, tame), label=field.name))
    if not tame and data.draw(st.integers(0, 60), label="oversize") == 0:  # now and then: over the size limit
        strings = [f for f in desc.fields if f.type == FD.TYPE_STRING and not f.is_repeated
                   and (f.containing_oneof is None or f.containing_oneof.name.startswith("_"))]
        if strings:
            setattr(msg, strings[0].name, OVERSIZE_TEXT)


# ------------------------------------------------------------------------------------------------
# calling
# ------------------------------------------------------------------------------------------------


def message_class(desc):
    for mod in (*MODULES, common_pb2):
        cls = getattr(mod, desc.name, None)
        if cls is not None and cls.DESCRIPTOR.full_name == desc.full_name:
            return cls
    raise AssertionError(desc.full_name)


def call(channel, svc, method, request, *, admin: bool):
    """Call `method` with `request`; (code, violations, details). A stream is drained."""
    path = f"/{svc.full_name}/{method.name}"
    out_cls = message_class(method.output_type)
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),) if admin else ()
    try:
        if method.server_streaming:
            stub = channel.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=out_cls.FromString)
            for _ in stub(request, timeout=TIMEOUT_S, metadata=md):
                pass
        else:
            stub = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=out_cls.FromString)
            stub(request, timeout=TIMEOUT_S, metadata=md)
    except grpc.RpcError as err:
        violations = []
        status = rpc_status.from_call(err)
        if status is not None:
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    violations += [(v.field, v.description) for v in bad.field_violations]
        return err.code(), violations, err.details()
    return grpc.StatusCode.OK, [], ""


def resolves(message_desc, path: str) -> bool:
    """Whether `path` (`a.b[2].c`) names a field of the message: index only on repeated fields."""
    desc = message_desc
    for part in path.split("."):
        m = re.fullmatch(r"([a-z_][a-z0-9_]*)((?:\[\d+\])?)", part)
        if desc is None or m is None or m[1] not in desc.fields_by_name:
            return False
        field = desc.fields_by_name[m[1]]
        if m[2] and not field.is_repeated:
            return False
        desc = field.message_type
    return True


def check_status(method, request, code, violations, details, *, admin: bool) -> None:
    what = f"{method.full_name}: {code} {details[:300]!r}"
    assert code not in NEVER, what
    if request.ByteSize() > MAX_MESSAGE:  # refused by the transport, before any handler
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and violations == [], what
        return
    if method.name in ADMIN_METHODS:
        assert code in (ADMIN_CODES if admin else {grpc.StatusCode.UNAUTHENTICATED}), what
    elif method.name == "GetModel":
        assert code == grpc.StatusCode.OK, what
    else:
        assert code in DATA_CODES, what
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert violations, what
        for f, d in violations:
            assert resolves(method.input_type, f) and d, (f, what)
    else:
        assert violations == [], what


def healthy(services) -> None:
    """A normal request of each service succeeds."""
    with grpc.insecure_channel(services.policy.target) as ch:
        from rlhfpb.v1 import policy_pb2_grpc, reference_pb2_grpc, reward_pb2_grpc

        policy_pb2_grpc.PolicyServiceStub(ch).Generate(policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text="hello")], params=policy_pb2.SamplingParams(max_new_tokens=2)),
            timeout=TIMEOUT_S)
    with grpc.insecure_channel(services.reward.target) as ch:
        reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(items=[
            reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="hi", response="there"))]), timeout=TIMEOUT_S)
    with grpc.insecure_channel(services.reference.target) as ch:
        reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(reference_pb2.LogProbsRequest(items=[
            reference_pb2.LogProbsItem(prompt_ids=[5, 6], completion_ids=[7])]), timeout=TIMEOUT_S)


def record(target: str, code) -> None:
    entry = FUZZ_REPORT.setdefault(target, {"cases": 0, "statuses": Counter()})
    entry["cases"] += 1
    entry["statuses"][code.name] += 1


@pytest.fixture(scope="module")
def channels(fuzz_services):
    opened = {}
    for svc, _ in METHODS:
        if svc.name not in opened:
            opened[svc.name] = grpc.insecure_channel(fuzz_services.by_name(svc.name).target)
    yield opened
    for ch in opened.values():
        ch.close()


# ------------------------------------------------------------------------------------------------
# 1. every RPC, generated requests
# ------------------------------------------------------------------------------------------------


def test_every_rpc_is_fuzzed():
    names = {f"{s.name}/{m.name}" for s, m in METHODS}
    assert {"PolicyService/Generate", "PolicyService/GenerateStream", "RewardService/Score",
            "RewardService/Compare", "ReferenceService/LogProbs", "ReferenceService/LoadVersion"} <= names


@pytest.mark.parametrize("svc,method", METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_generated_requests(svc, method, channels, fuzz_services):
    channel = channels[svc.name]
    req_cls = message_class(method.input_type)

    @FUZZ
    @given(data=st.data())
    def run(data):
        request = req_cls()
        fill(data, request, tame=data.draw(st.booleans(), label="tame"))
        admin = method.name in ADMIN_METHODS and data.draw(st.booleans(), label="admin token")
        code, violations, details = call(channel, svc, method, request, admin=admin)
        record(f"{svc.name}.{method.name}" + (" (admin)" if admin else ""), code)
        check_status(method, request, code, violations, details, admin=admin)

    run()
    healthy(fuzz_services)


# ------------------------------------------------------------------------------------------------
# 2. one targeted defect: the right status, the field named
# ------------------------------------------------------------------------------------------------

BAD_FLOAT = st.sampled_from([math.nan, math.inf, -math.inf, -1e-3, -3.4e38, 2.0001, 3.4e38])
BAD_ID = st.one_of(st.integers(VOCAB, 2**31 - 1), st.integers(-(2**31), -1))
GOOD_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)


@st.composite
def bad_generate(draw):
    """(request, expected code, expected field prefix) with one defect."""
    k = draw(st.integers(1, 3))
    prompts = [policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=draw(GOOD_IDS))) for _ in range(k)]
    params = policy_pb2.SamplingParams(max_new_tokens=2)
    kind = draw(st.sampled_from(["temperature", "top_p", "top_k", "max_new", "token", "stop_id", "too_many",
                                 "n", "long_prompt", "min_new"]))
    field, code = "", grpc.StatusCode.INVALID_ARGUMENT
    if kind == "temperature":
        params.temperature, field = draw(BAD_FLOAT), "params.temperature"
    elif kind == "top_p":
        params.top_p = draw(st.one_of(BAD_FLOAT, st.sampled_from([0.0, -0.0, 1.0001])))
        field = "params.top_p"
    elif kind == "top_k":
        params.top_k, field = draw(st.integers(-(2**31), -1)), "params.top_k"
    elif kind == "max_new":
        params.max_new_tokens = draw(st.one_of(st.integers(-(2**31), 0), st.integers(LIMIT_NEW + 1, 2**31 - 1)))
        field = "params.max_new_tokens"
    elif kind == "min_new":
        params.min_new_tokens = draw(st.one_of(st.integers(-(2**31), -1), st.integers(3, 2**31 - 1)))
        field = "params.min_new_tokens"
    elif kind == "token":
        i = draw(st.integers(0, k - 1))
        j = draw(st.integers(0, len(prompts[i].token_ids.ids)))
        prompts[i].token_ids.ids.insert(j, draw(BAD_ID))
        field = f"prompts[{i}].token_ids.ids[{j}]"
    elif kind == "stop_id":
        params.stop_token_ids.extend([5, draw(BAD_ID)])
        field = "params.stop_token_ids[1]"
    elif kind == "too_many":
        prompts = prompts * (LIMIT_ITEMS // k + 1)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif kind == "n":
        n = draw(st.integers(-(2**31), 0))
        return policy_pb2.GenerateRequest(prompts=prompts, params=params, n=n), code, "n"
    else:
        i = draw(st.integers(0, k - 1))
        prompts[i] = policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[5] * draw(st.integers(CONTEXT, 4 * CONTEXT))))
        field = f"prompts[{i}].token_ids"
    return policy_pb2.GenerateRequest(prompts=prompts, params=params), code, field


@st.composite
def bad_logprobs(draw):
    k = draw(st.integers(1, 4))
    items = [reference_pb2.LogProbsItem(prompt_ids=draw(GOOD_IDS), completion_ids=draw(GOOD_IDS)) for _ in range(k)]
    kind = draw(st.sampled_from(["id", "empty", "long", "too_many"]))
    i = draw(st.integers(0, k - 1))
    name = draw(st.sampled_from(["prompt_ids", "completion_ids"]))
    ids = getattr(items[i], name)
    if kind == "id":
        j = draw(st.integers(0, len(ids)))
        ids.insert(j, draw(BAD_ID))
        return reference_pb2.LogProbsRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}].{name}[{j}]"
    if kind == "empty":
        del ids[:]
        return reference_pb2.LogProbsRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}].{name}"
    if kind == "long":
        ids.extend([9] * draw(st.integers(CONTEXT, 3 * CONTEXT)))
        return reference_pb2.LogProbsRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}]"
    return (reference_pb2.LogProbsRequest(items=items * (LIMIT_ITEMS // k + 1)),
            grpc.StatusCode.RESOURCE_EXHAUSTED, "")


@st.composite
def bad_score(draw):
    k = draw(st.integers(1, 3))
    items = [reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_ids=draw(GOOD_IDS), response_ids=draw(GOOD_IDS)))
             for _ in range(k)]
    kind = draw(st.sampled_from(["id", "empty_text", "none", "too_many"]))
    i = draw(st.integers(0, k - 1))
    if kind == "id":
        name = draw(st.sampled_from(["prompt_ids", "response_ids"]))
        ids = getattr(items[i].tokens, name)
        j = draw(st.integers(0, len(ids)))
        ids.insert(j, draw(BAD_ID))
        return reward_pb2.ScoreRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}].tokens.{name}[{j}]"
    if kind == "empty_text":
        items[i] = reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=draw(st.text(max_size=20)), response=""))
        return reward_pb2.ScoreRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}].text.response"
    if kind == "none":
        items[i] = reward_pb2.ScoreItem()
        return reward_pb2.ScoreRequest(items=items), grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}]"
    return reward_pb2.ScoreRequest(items=items * (LIMIT_ITEMS // k + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""


TARGETED = [("PolicyService", "Generate", bad_generate()), ("PolicyService", "GenerateStream", bad_generate()),
            ("ReferenceService", "LogProbs", bad_logprobs()), ("RewardService", "Score", bad_score())]


@pytest.mark.parametrize("service,rpc,strategy", TARGETED, ids=[f"{s}.{r}" for s, r, _ in TARGETED])
def test_one_defect_gets_its_status_and_field(service, rpc, strategy, channels):
    svc = next(s for s, _ in METHODS if s.name == service)
    method = svc.methods_by_name[rpc]
    req_cls = message_class(method.input_type)

    @FUZZ
    @given(case=strategy)
    def run(case):
        request, want_code, want_field = case
        request = req_cls.FromString(request.SerializeToString())  # GenerateStreamRequest alike
        code, violations, details = call(channels[service], svc, method, request, admin=False)
        record(f"{service}.{rpc} (one defect)", code)
        assert code == want_code, (want_field, code, details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert any(f == want_field for f, _ in violations), (want_field, violations)
        check_status(method, request, code, violations, details, admin=False)

    run()


# ------------------------------------------------------------------------------------------------
# 3. memory across rounds of random traffic
# ------------------------------------------------------------------------------------------------

ROUNDS = 4


def random_logprobs(rnd, n_requests: int):
    """Requests of random shapes (1-16 items of up to the whole context), a third of them bad."""
    for _ in range(n_requests):
        items = []
        for _ in range(rnd.randint(1, 16)):
            p = rnd.randint(1, CONTEXT // 2)
            c = rnd.randint(1, CONTEXT - p)
            items.append(reference_pb2.LogProbsItem(prompt_ids=[rnd.randrange(VOCAB) for _ in range(p)],
                                                    completion_ids=[rnd.randrange(VOCAB) for _ in range(c)]))
        if rnd.random() < 0.3:
            items[-1].completion_ids.append(VOCAB + rnd.randrange(10**6))
        yield reference_pb2.LogProbsRequest(items=items)


def test_memory_bounded_across_rounds(fuzz_services, channels):
    """Rounds of random-shape traffic to every service; RSS after each round, from /proc.

    The first round is the warm-up (allocator pools, first shapes); every later round must leave
    each server within 1.25× of its post-warm-up size (the issue saw +15% per round)."""
    import random

    rnd = random.Random(18)
    svc = {s.name: s for s, _ in METHODS}
    pids = {name: fuzz_services.by_name(name).proc.pid for name in svc}
    series = {name: [rss_mb(pid)] for name, pid in pids.items()}  # before any round
    for r in range(ROUNDS):
        for request in random_logprobs(rnd, 12):
            code, *_ = call(channels["ReferenceService"], svc["ReferenceService"],
                            svc["ReferenceService"].methods_by_name["LogProbs"], request, admin=False)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
        for _ in range(6):
            items = [reward_pb2.ScoreItem(text=reward_pb2.TextPair(
                prompt="q" * rnd.randint(1, 200), response="a " * rnd.randint(1, 200))) for _ in range(rnd.randint(1, 16))]
            code, *_ = call(channels["RewardService"], svc["RewardService"],
                            svc["RewardService"].methods_by_name["Score"], reward_pb2.ScoreRequest(items=items), admin=False)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
            ids = [rnd.randrange(VOCAB) for _ in range(rnd.randint(1, 300))]
            code, *_ = call(channels["PolicyService"], svc["PolicyService"], svc["PolicyService"].methods_by_name["Generate"],
                            policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))] * rnd.randint(1, 4),
                                                       params=policy_pb2.SamplingParams(max_new_tokens=rnd.randint(1, 4))), admin=False)
            assert code == grpc.StatusCode.OK, code
        for name, pid in pids.items():
            series[name].append(rss_mb(pid))
    healthy(fuzz_services)
    FUZZ_REPORT["memory (RSS MiB: start, after each round)"] = {k: [round(v) for v in s] for k, s in series.items()}
    for name, s in series.items():
        warm = s[1]
        assert max(s[2:]) <= 1.25 * warm, (name, s)


def test_load_version_names_an_unusable_directory_name(channels):
    """Found by this fuzzer: a version of more than NAME_MAX bytes (ENAMETOOLONG) or with a NUL
    byte (ValueError) reached os.stat and came back INTERNAL; now INVALID_ARGUMENT `version`."""
    for svc in {s.full_name: s for s, _ in METHODS}.values():
        method = svc.methods_by_name["LoadVersion"]
        for version in ("v" * 256, "é" * 128, "a\x00b", "quick brown fox " * 12_500):
            code, violations, details = call(channels[svc.name], svc, method,
                                             common_pb2.LoadVersionRequest(version=version), admin=True)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in violations] == ["version"], details
            assert len(details) < 200  # the message quotes a bounded part of the version
