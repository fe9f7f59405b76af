"""Generated job specs through `TrainingClient.submit` (validation and submit-time checks).

Each example starts from a spec of a job type that submit accepts (its data in a stream of DB 5
with `block_ms`, a real base directory) and changes one thing: a field set to a random JSON value
(huge and negative numbers, NaN and ±inf, odd unicode, long strings, paths, lists, objects), a
field removed, an unknown field added, or a field of `source` changed. Promises:
- submit either raises `JobRejected` whose lines name real fields of the spec — the changed one
  among them — or accepts it; nothing else is raised;
- an accepted spec round-trips: `parse_spec(json(spec))` is the same spec (so what the worker
  parses is what was submitted), and its job record and Celery message exist.
"""

from __future__ import annotations

import json
import math
import re
import uuid

import pytest
from conftest import FUZZ_REPORT
from helpers import TEST_REDIS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlhf_client.jobspecs import JobRejected, example_spec, job_schema, parse_spec
from rlhf_client.training import TrainingClient

REDIS_URL = f"{TEST_REDIS}/5"  # the fuzz tests' database
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
ACCEPTED_TYPES = ["reward_model", "dpo", "ppo", "sft"]  # an iterate job needs a published version

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
              st.sampled_from([0, -1, 1, 2**31, -(2**31), 10**30, math.nan, math.inf, -math.inf, -0.0, 1e-300]),
              st.floats(), st.text(max_size=20),
              st.sampled_from(["", "../../etc/passwd", "/", "\x00", "🙂" * 100, "x" * 10_000, "policy", "stream",
                               "jsonl", "sigmoid", "grpo", "tensorboard"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=6)


@pytest.fixture(scope="module")
def client():
    tc = TrainingClient(REDIS_URL)
    before = set(tc.r.keys("*"))
    yield tc
    new = set(tc.r.keys("*")) - before  # job records, leases, Celery messages this module made
    if new:
        tc.r.delete(*new)


def base_spec(job_type: str, model_dirs) -> dict:
    spec = example_spec(job_type)
    spec["base_dir"] = str(model_dirs[job_type == "reward_model"])
    spec["source"] = {"type": "stream", "stream": f"fuzz:jobs:{job_type}", "block_ms": 1000}
    return spec


def named_fields(message: str) -> list[str]:
    """The fields a JobRejected names: one `  field: problem` line each (or `type: ...`)."""
    fields = re.findall(r"^  ([^:\n]*?): ", message, flags=re.M)
    if not fields and (m := re.search(r"rejected: ([a-z_]+): ", message)):
        fields = [m[1]]
    return fields


@pytest.mark.parametrize("job_type", ACCEPTED_TYPES)
def test_generated_specs_are_rejected_naming_the_field_or_round_trip(job_type, client, tiny_policy_dir,
                                                                     tiny_reward_dir):
    dirs = (tiny_policy_dir, tiny_reward_dir)
    base = base_spec(job_type, dirs)
    client.submit({**base, "job_id": f"fuzz-{job_type}-{uuid.uuid4().hex[:8]}"})  # the base is accepted
    props = list(job_schema(job_type)["properties"])
    source_props = ["type", "stream", "block_ms", "path", "group", "count"]
    outcome = {"accepted": 0, "rejected": 0, "fields named": set()}

    @FUZZ
    @given(op=st.sampled_from(["set", "set", "set", "remove", "unknown", "source"]),
           key=st.sampled_from(props), skey=st.sampled_from(source_props), value=JSON_VALUES,
           extra=st.text(min_size=1, max_size=12))
    def run(op, key, skey, value, extra):
        spec = json.loads(json.dumps(base))
        spec["job_id"] = f"fuzz-{uuid.uuid4().hex}"
        changed = key
        if op == "set":
            spec[key] = value
        elif op == "remove":
            spec.pop(key, None)
        elif op == "unknown":
            changed = extra if extra not in props else extra + "_x"
            spec[changed] = value
        else:
            spec["source"][skey] = value
            changed = "source"
        try:
            job_id = client.submit(spec)
        except JobRejected as exc:
            fields = named_fields(str(exc))
            assert fields, str(exc)
            tops = {f.split(".")[0] for f in fields}
            assert changed in tops or (op == "remove" and tops <= set(props) | {"spec", ""}), (changed, str(exc))
            outcome["rejected"] += 1
            outcome["fields named"] |= tops
            return
        parsed = parse_spec({**spec, "job_id": job_id})  # an unset job_id was drawn at submit
        again = parse_spec(json.loads(json.dumps(parsed.model_dump(mode="json"), allow_nan=False)))
        assert again == parsed, (parsed, again)
        record = client.status(job_id)  # what the worker will read: the same spec
        assert record.status == "queued" and parse_spec(record.spec) == parsed, record
        outcome["accepted"] += 1

    run()
    FUZZ_REPORT[f"job specs: {job_type}"] = {**outcome, "fields named": sorted(outcome["fields named"])}
    assert outcome["rejected"] > 0
