"""The training service: a Celery worker that runs training jobs fed by Redis Streams.

celery_app.py   the Celery app (JSON only, acks late, prefetch 1)
tasks.py        thin tasks: validate the spec, call jobs.execute with the plain job function
jobs.py         job specs (pydantic), job records and leases in Redis, submit, the run harness
queues.py       the stream consumer (consumer group, ack after commit, reclaim, dead letters)
data.py         preference pairs from payloads or JSONL; ranking expansion; the split
reward_model.py Bradley–Terry reward-model training and its job
publish.py      store version → registry → active
reaper.py       re-queues jobs whose Celery message was lost (no lease, no message)
workdirs.py     each attempt's own temp dir; a dead attempt's is removed by whoever comes next
health.py       the worker's heartbeat file and `rlhf worker-probe` (the pod's probes)
cli.py          `rlhf worker`, `rlhf worker-probe`, `rlhf jobs`, `rlhf models`
"""
