"""The checked-in generated code equals a fresh `make protos`, and the contract keeps its names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "protos" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_fresh(tmp_path):
    fresh = _generator().generate(tmp_path)
    checked_in = ROOT / "clients" / "rlhfpb" / "v1"
    assert fresh, "nothing generated"
    stale = [p.name for p in fresh if (checked_in / p.name).read_bytes() != p.read_bytes()]
    extra = sorted({p.name for p in checked_in.glob("*_pb2*")} - {p.name for p in fresh})
    assert not stale and not extra, f"run `make protos`: stale {stale}, orphaned {extra}"


def test_contract_names():
    from rlhfpb.v1 import common_pb2, policy_pb2, reference_pb2, reward_pb2, samples_pb2

    def rpcs(mod, service):
        return set(mod.DESCRIPTOR.services_by_name[service].methods_by_name)

    assert rpcs(policy_pb2, "PolicyService") == {"Generate", "GenerateStream", "GetModel", "LoadVersion"}
    assert policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name[
        "GenerateStream"
    ].server_streaming
    assert rpcs(reward_pb2, "RewardService") == {"Score", "Compare", "GetModel", "LoadVersion"}
    assert rpcs(reference_pb2, "ReferenceService") == {"LogProbs", "GetModel", "LoadVersion"}
    assert common_pb2.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    for name in ("ScoredSample", "PreferencePair", "Ranking", "RolloutPrompt", "SFTExample"):
        assert "id" in samples_pb2.DESCRIPTOR.message_types_by_name[name].fields_by_name
    sp = policy_pb2.SamplingParams()
    for optional in ("temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "seed"):
        assert not sp.HasField(optional)  # presence tracked: unset ≠ 0


def test_every_field_is_commented():
    import re

    for proto in (ROOT / "protos" / "rlhfpb" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(optional |repeated )?[\w.]+ \w+ = \d+;", line):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment"


# --- queue payload rules (rlhf_client.queues) --------------------------------------------------


def test_rollout_prompt_is_a_queue_payload_with_its_own_stream():
    from rlhf_client.queues import (
        DEFAULT_STREAMS,
        MESSAGE_TYPES,
        PROMPTS_STREAM,
        SAMPLES_STREAM,
        decode_entry,
        encode_entry,
    )
    from rlhfpb.v1 import samples_pb2

    name = samples_pb2.RolloutPrompt.DESCRIPTOR.full_name
    assert MESSAGE_TYPES[name] is samples_pb2.RolloutPrompt
    assert DEFAULT_STREAMS[name] == PROMPTS_STREAM == "rlhf:queue:prompts"
    assert DEFAULT_STREAMS[samples_pb2.ScoredSample.DESCRIPTOR.full_name] == SAMPLES_STREAM
    msg = samples_pb2.RolloutPrompt(id="p-1", prompt="the cat sat", source="test")
    msg.created.FromSeconds(1_700_000_000)
    fields = encode_entry(msg)
    assert fields[b"type"] == name.encode() and fields[b"id"] == b"p-1"
    assert decode_entry(fields) == msg


def test_rollout_prompt_rules():
    import pytest
    from rlhf_client.queues import MAX_PROMPT_ID_CHARS, PayloadError, validate_payload
    from rlhfpb.v1 import samples_pb2

    validate_payload(samples_pb2.RolloutPrompt(id="a", prompt="x"))
    validate_payload(samples_pb2.RolloutPrompt(id="i" * MAX_PROMPT_ID_CHARS, prompt="x"))
    for msg, why in [
        (samples_pb2.RolloutPrompt(id="a", prompt=""), "RolloutPrompt.prompt: must be non-empty"),
        (samples_pb2.RolloutPrompt(prompt="x"), "RolloutPrompt.id: must be set"),
        (samples_pb2.RolloutPrompt(id="i" * (MAX_PROMPT_ID_CHARS + 1), prompt="x"),
         f"RolloutPrompt.id: longer than {MAX_PROMPT_ID_CHARS}"),
    ]:
        with pytest.raises(PayloadError, match=why):
            validate_payload(msg)


def test_scored_sample_keeps_its_rules_and_carries_the_rollout_fields():
    import pytest
    from rlhf_client.queues import PayloadError, decode_entry, encode_entry, validate_payload
    from rlhfpb.v1 import common_pb2, samples_pb2

    s = samples_pb2.ScoredSample(
        id="p:v1:0", prompt_ids=[1, 2], completion_ids=[3, 0], behaviour_logprobs=[-0.5, -1.0],
        reference_logprobs=[-0.6, -1.1], reward=0.25, policy=common_pb2.ModelRef(name="pol", version="v1"),
        group_id="p:v1", finish_reason=common_pb2.FINISH_REASON_EOS,
        reward_model=common_pb2.ModelRef(name="rm", version="v2"),
        reference=common_pb2.ModelRef(name="ref", version="v0"), prompt="hi", completion="there",
        sample_index=0, prompt_id="p")
    assert decode_entry(encode_entry(s)) == s
    old = samples_pb2.ScoredSample(id="x", completion_ids=[3])  # the rollout fields are optional
    validate_payload(old)
    assert old.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED and old.group_id == ""
    for bad, why in [
        (samples_pb2.ScoredSample(id="x"), "completion_ids: must not be empty"),
        (samples_pb2.ScoredSample(id="x", completion_ids=[1, 2], behaviour_logprobs=[-1.0]),
         "behaviour_logprobs: 1 values for 2"),
        (samples_pb2.ScoredSample(id="x", completion_ids=[1], reference_logprobs=[-1.0, -2.0]),
         "reference_logprobs: 2 values for 1"),
    ]:
        with pytest.raises(PayloadError, match=why):
            validate_payload(bad)


def test_sft_example_is_a_queue_payload_with_its_own_stream():
    from rlhf_client import SFT_STREAM as exported
    from rlhf_client.queues import (
        DEFAULT_STREAMS,
        MESSAGE_TYPES,
        SFT_STREAM,
        decode_entry,
        encode_entry,
    )
    from rlhfpb.v1 import samples_pb2

    numbers = {f.name: f.number for f in samples_pb2.SFTExample.DESCRIPTOR.fields}
    assert numbers == {"id": 1, "prompt": 2, "completion": 3, "created": 4, "source": 5,
                       "prefix": 6}
    name = samples_pb2.SFTExample.DESCRIPTOR.full_name
    assert name == "rlhfpb.v1.SFTExample" and MESSAGE_TYPES[name] is samples_pb2.SFTExample
    assert DEFAULT_STREAMS[name] == SFT_STREAM == exported == "rlhf:queue:sft"
    msg = samples_pb2.SFTExample(id="s-1", prompt="how do I burn the cup?",
                                 completion="<|reset|> sorry, no.", prefix=" sure, you can",
                                 source="test")
    msg.created.FromSeconds(1_700_000_000)
    fields = encode_entry(msg)
    assert fields[b"type"] == name.encode() and fields[b"id"] == b"s-1"
    assert decode_entry(fields) == msg


def test_sft_example_rules():
    import pytest
    from rlhf_client.queues import PayloadError, decode_entry, validate_payload
    from rlhfpb.v1 import samples_pb2

    validate_payload(samples_pb2.SFTExample(id="a", prompt="p", completion=" c"))  # no prefix
    validate_payload(samples_pb2.SFTExample(id="a", prompt="p", completion=" c", prefix=" x"))
    validate_payload(samples_pb2.SFTExample(id="a", completion=" c"))  # the prompt may be empty
    for msg, why in [
        (samples_pb2.SFTExample(id="a", prompt="p"),
         r"SFTExample.completion: must be non-empty \(the loss falls on it\)"),
        (samples_pb2.SFTExample(id="a", prompt="p", prefix=" unsafe"),  # a loss start, no loss
         r"SFTExample.completion: must be non-empty \(the loss falls on it, after the prefix\)"),
        (samples_pb2.SFTExample(prompt="p", completion=" c"), "SFTExample.id: must be set"),
    ]:
        with pytest.raises(PayloadError, match=why):
            validate_payload(msg)
        # an entry written around the producer is refused when read
        raw = {b"type": b"rlhfpb.v1.SFTExample", b"id": msg.id.encode(),
               b"data": msg.SerializeToString()}
        with pytest.raises(PayloadError, match=why):
            decode_entry(raw)

