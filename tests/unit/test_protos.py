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
    for name in ("ScoredSample", "PreferencePair", "Ranking"):
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
