"""INVALID_ARGUMENT carries `google.rpc.BadRequest` field violations, on every service, live.

Real servers on 127.0.0.1 (each on its own thread, so the blocking clients can call them) with the
tiny models. Every bad input of the shared catalogue (tests/bad_inputs.py) is sent through the sync
and the async client; each error must keep its message and carry at least one violation whose
field names the offending field, as a path that exists in the proto request (`prompts[0].token_ids`,
`params.top_p`, `items[1].text.response`). Raw stubs read the same status with
`rpc_status.from_call`, sync and aio. Other codes carry no violations.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest
from bad_inputs import bad_compare_inputs, bad_generate_inputs, bad_logprobs_inputs, bad_score_inputs
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from helpers import ADMIN_TOKEN, ThreadedApp, make_settings
from rlhfpb.v1 import common_pb2, policy_pb2, policy_pb2_grpc, reference_pb2, reward_pb2, reward_pb2_grpc

from rlhf_client import (
    AsyncPolicyClient,
    AsyncReferenceClient,
    AsyncRewardClient,
    PolicyClient,
    ReferenceClient,
    RewardClient,
    RpcError,
)

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services" / "rlhf"
NOT_A_VERSION = "../escape"  # refused by the swapper before any lookup: INVALID_ARGUMENT `version`


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_target(tiny_reward_dir):
    from rlhf.reward.app import make_reward_app

    with ThreadedApp(make_reward_app(make_settings(model_dir=tiny_reward_dir))) as served:
        yield served.target


@pytest.fixture(scope="module")
def reference_target(tiny_policy_dir):
    from rlhf.reference.app import make_reference_app

    with ThreadedApp(make_reference_app(make_settings(model_dir=tiny_policy_dir))) as served:
        yield served.target


@pytest.fixture(scope="module")
def policy_info(policy_target):
    from rlhf.config import Settings

    with PolicyClient(policy_target) as c:
        info = c.get_model()
    return info, Settings().max_new_tokens_limit


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def resolves(message: type, path: str) -> bool:
    """Whether `path` (`a.b[2].c`, an index only on repeated fields, none past a scalar) names a
    field of the proto message class `message`."""
    desc = message.DESCRIPTOR
    for k, part in enumerate(path.split(".")):
        m = re.fullmatch(r"([a-z_][a-z0-9_]*)((?:\[\d+\])?)", part)
        if desc is None or m is None or m[1] not in desc.fields_by_name:
            return False
        field = desc.fields_by_name[m[1]]
        repeated = field.is_repeated
        if m[2] and not repeated:
            return False
        if repeated and not m[2] and k < len(path.split(".")) - 1:
            return False  # `items.prompt_ids`: a path into a list needs its index
        desc = field.message_type
    return True


def check_violations(err: RpcError, request: type, field: str, *, exact: bool) -> None:
    """`err` is INVALID_ARGUMENT whose message is its violations, each a real path of `request`,
    one of them naming `field` (the whole path when `exact`, else a part of it)."""
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.field_violations, err
    assert err.details == "; ".join(f"{f}: {d}" for f, d in err.field_violations)  # message kept
    for f, d in err.field_violations:
        assert resolves(request, f), (f, request.__name__)
        assert d and not d.startswith(f), (f, d)  # the human text, not the path again
    names = [f for f, _ in err.field_violations]
    assert any((f == field) if exact else (field in f) for f in names), (field, names)


def raised(fn, *args, **kwargs) -> RpcError:
    with pytest.raises(RpcError) as err:
        fn(*args, **kwargs)
    return err.value


async def araised(coro) -> RpcError:
    with pytest.raises(RpcError) as err:
        await coro
    return err.value


def first_violation(status) -> tuple[str, str]:
    """The first field violation of a google.rpc.Status (asserting it is INVALID_ARGUMENT)."""
    assert status is not None and status.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert len(status.details) == 1 and status.details[0].Unpack(bad)
    v = bad.field_violations[0]
    return v.field, v.description


# ------------------------------------------------------------------------------------------------
# PolicyService
# ------------------------------------------------------------------------------------------------


def test_policy_catalogue_sync_unary_and_stream(policy_target, policy_info):
    info, limit = policy_info
    with PolicyClient(policy_target) as c:
        for name, kwargs, field in bad_generate_inputs(info.max_context, info.vocab_size, limit):
            check_violations(raised(c.generate, **kwargs), policy_pb2.GenerateRequest, field, exact=False)
            streamed = raised(lambda: list(c.generate_stream(**kwargs)))
            check_violations(streamed, policy_pb2.GenerateStreamRequest, field, exact=False)


async def test_policy_catalogue_async_unary_and_stream(policy_target, policy_info):
    info, limit = policy_info
    async with AsyncPolicyClient(policy_target, timeout=30) as c:
        for name, kwargs, field in bad_generate_inputs(info.max_context, info.vocab_size, limit):
            check_violations(await araised(c.generate(**kwargs)), policy_pb2.GenerateRequest, field,
                             exact=False)

            async def drain(kwargs=kwargs):
                return [x async for x in c.generate_stream(**kwargs)]

            check_violations(await araised(drain()), policy_pb2.GenerateStreamRequest, field, exact=False)


def test_policy_chat_and_missing_prompt_name_their_field(policy_target):
    """Raw messages the catalogue lacks: a prompt with no content, a chat with no turn."""
    with grpc.insecure_channel(policy_target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        for request, want in [
            (policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(text="hi"), policy_pb2.Prompt()]),
             "prompts[1]"),
            (policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(chat=policy_pb2.ChatMessages())]),
             "prompts[0].chat"),
            (policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(text="hi")],
                                        params=policy_pb2.SamplingParams(stop=["ok", ""])), "params.stop[1]"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, timeout=30)
            field, description = first_violation(rpc_status.from_call(err.value))
            assert field == want and resolves(policy_pb2.GenerateRequest, field)
            assert err.value.details() == f"{field}: {description}"


def test_raw_sync_stub_reads_the_status_with_rpc_status(policy_target):
    with grpc.insecure_channel(policy_target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        request = policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(text="hi")],
                                             params=policy_pb2.SamplingParams(top_p=1.5))
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request, timeout=30, metadata=(("x-request-id", "violations-1"),))
        status = rpc_status.from_call(err.value)
        assert status.message == err.value.details()
        assert first_violation(status) == ("params.top_p", "must be in (0, 1], got 1.5")
        # abort_with_status replaces the trailers: the request id is still echoed beside the details
        assert dict(err.value.trailing_metadata())["x-request-id"] == "violations-1"
        with pytest.raises(grpc.RpcError) as err:  # a stream fails before its first message alike
            next(iter(stub.GenerateStream(policy_pb2.GenerateStreamRequest(
                prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, -3]))]), timeout=30)))
        assert first_violation(rpc_status.from_call(err.value))[0] == "prompts[0].token_ids.ids[1]"


async def test_raw_aio_stub_reads_the_status_with_rpc_status_aio(policy_target):
    async with grpc.aio.insecure_channel(policy_target) as ch:
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        call = stub.Generate(policy_pb2.GenerateRequest(prompts=[policy_pb2.Prompt(text="hi")], n=0),
                             timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert first_violation(await rpc_status.aio.from_call(call)) == ("n", "must be ≥ 1, got 0")
        # the raised AioRpcError answers without awaiting, so the sync reader works on it too
        assert first_violation(rpc_status.from_call(err.value)) == ("n", "must be ≥ 1, got 0")


# ------------------------------------------------------------------------------------------------
# RewardService
# ------------------------------------------------------------------------------------------------


def test_reward_catalogue_sync(reward_target):
    with RewardClient(reward_target) as c:
        info = c.get_model()
        for name, items, field in bad_score_inputs(info.max_context, info.vocab_size):
            check_violations(raised(c.score, items), reward_pb2.ScoreRequest, field, exact=True)
        for args, field in bad_compare_inputs(info.max_context, info.vocab_size):
            check_violations(raised(c.compare, *args), reward_pb2.CompareRequest, field, exact=True)


async def test_reward_catalogue_async_and_raw_messages(reward_target):
    async with AsyncRewardClient(reward_target, timeout=30) as c:
        info = await c.get_model()
        for name, items, field in bad_score_inputs(info.max_context, info.vocab_size):
            check_violations(await araised(c.score(items)), reward_pb2.ScoreRequest, field, exact=True)
        for args, field in bad_compare_inputs(info.max_context, info.vocab_size):
            check_violations(await araised(c.compare(*args)), reward_pb2.CompareRequest, field, exact=True)
    # messages the typed client never builds: an item with neither form, text mixed with ids
    async with grpc.aio.insecure_channel(reward_target) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        call = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()]), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert first_violation(await rpc_status.aio.from_call(call))[0] == "items[0]"
        mixed = reward_pb2.CompareRequest(prompt="hi", response_a_ids=common_pb2.TokenIds(ids=[5]),
                                          response_b_ids=common_pb2.TokenIds(ids=[6]))
        call = stub.Compare(mixed, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert first_violation(await rpc_status.aio.from_call(call))[0] == "prompt"


# ------------------------------------------------------------------------------------------------
# ReferenceService
# ------------------------------------------------------------------------------------------------


def test_reference_catalogue_sync(reference_target):
    with ReferenceClient(reference_target) as c:
        info = c.get_model()
        for items, field in bad_logprobs_inputs(info.max_context, info.vocab_size):
            check_violations(raised(c.logprobs, items), reference_pb2.LogProbsRequest, field, exact=True)


async def test_reference_catalogue_async(reference_target):
    async with AsyncReferenceClient(reference_target, timeout=30) as c:
        info = await c.get_model()
        for items, field in bad_logprobs_inputs(info.max_context, info.vocab_size):
            err = await araised(c.logprobs(items))
            check_violations(err, reference_pb2.LogProbsRequest, field, exact=True)


# ------------------------------------------------------------------------------------------------
# every service: the admin RPC, other codes
# ------------------------------------------------------------------------------------------------


async def test_load_version_names_the_version_field_on_every_service(policy_target, reward_target,
                                                                     reference_target):
    for sync_cls, async_cls, target in [(PolicyClient, AsyncPolicyClient, policy_target),
                                        (RewardClient, AsyncRewardClient, reward_target),
                                        (ReferenceClient, AsyncReferenceClient, reference_target)]:
        with sync_cls(target, admin_token=ADMIN_TOKEN) as c:
            check_violations(raised(c.load_version, NOT_A_VERSION), common_pb2.LoadVersionRequest,
                             "version", exact=True)
        async with async_cls(target, admin_token=ADMIN_TOKEN, timeout=30) as c:
            err = await araised(c.load_version(NOT_A_VERSION))
            check_violations(err, common_pb2.LoadVersionRequest, "version", exact=True)


def test_other_codes_carry_no_violations(policy_target, reward_target, reference_target):
    with PolicyClient(policy_target, admin_token=ADMIN_TOKEN) as c:
        err = raised(c.generate, ["hi"] * 65)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.field_violations == []
        err = raised(c.load_version, "no-such-version")
        assert err.code == grpc.StatusCode.NOT_FOUND and err.field_violations == []
    with RewardClient(reward_target) as c:  # no admin token: refused before any check
        err = raised(c.load_version, NOT_A_VERSION)
        assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.field_violations == []
    with ReferenceClient(reference_target) as c:
        assert len(c.logprobs([([5], [6])]).results) == 1  # every server still serves


def test_every_invalid_argument_goes_through_the_one_status_helper():
    """No servicer aborts by itself or names the code: InvalidArgument → status_of_error is the
    only road to INVALID_ARGUMENT, so none leaves without its violations."""
    offenders = []
    for path in SERVICES_DIR.rglob("*.py"):
        text = path.read_text()
        rel = path.relative_to(SERVICES_DIR).as_posix()
        # a comparison reads a client's error (judge.py); anything else would make the status
        if rel != "errors.py" and re.search(r"(?<![=!]= )grpc\.StatusCode\.INVALID_ARGUMENT", text):
            offenders.append(f"{rel}: names INVALID_ARGUMENT")
        if re.search(r"context\.abort\(|\.set_code\(", text):
            offenders.append(f"{rel}: aborts without status_of_error")
    assert offenders == []
    interceptors = (SERVICES_DIR / "serving" / "interceptors.py").read_text()
    assert re.search(r"abort_with_status\(\s*status_of_error\(", interceptors)
