"""Where the reference service's memory goes under malformed traffic (docs/reliability.md, fuzz).

    .venv/bin/python tests/fuzz/memory_probe.py MODEL_DIR     # a policy checkpoint (rlhf tiny-model)

Runs the reference server in this process, sends 4 rounds of 40 concurrent LogProbs requests
(40% of 1k-400k ids, 30% of up to 64 items with a bad id, 30% valid random shapes) and prints,
after each round, RSS, glibc's `mallinfo2()` (bytes in use, bytes freed but kept, mmapped) and
the bytes of live tensors; then RSS after `malloc_trim(0)`. Not a test: a probe to rerun.
"""
import concurrent.futures as cf
import ctypes
import gc
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpc
from helpers import ThreadedApp, make_settings
from rlhf.reference.app import make_reference_app
from rlhfpb.v1 import reference_pb2, reference_pb2_grpc

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena","ordblks","smblks","hblks","hblkhd","usmblks","fsmblks","uordblks","fordblks","keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI
def mi():
    m = libc.mallinfo2()
    return f"malloc: in use {m.uordblks/2**20:.0f} MB, free but kept {m.fordblks/2**20:.0f} MB, mmapped {m.hblkhd/2**20:.0f} MB"
def tensors_mb():
    import torch
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor)) / 2**20
app = make_reference_app(make_settings(model_dir=sys.argv[1]))
V = 1232
rnd = random.Random(0)
def one(stub):
    kind = rnd.random()
    if kind < 0.4:
        items = [reference_pb2.LogProbsItem(prompt_ids=[5]*rnd.randint(1000, 400000), completion_ids=[6])]
    elif kind < 0.7:
        items = [reference_pb2.LogProbsItem(prompt_ids=[rnd.randrange(V) for _ in range(rnd.randint(1,200))], completion_ids=[7]*rnd.randint(1,200)) for _ in range(rnd.randint(1,64))]
        items[-1].completion_ids.append(V + 1)
    else:
        items = [reference_pb2.LogProbsItem(prompt_ids=[rnd.randrange(V) for _ in range(rnd.randint(1,256))], completion_ids=[rnd.randrange(V) for _ in range(rnd.randint(1,256))]) for _ in range(rnd.randint(1,16))]
    try:
        stub.LogProbs(reference_pb2.LogProbsRequest(items=items), timeout=120); return "OK"
    except grpc.RpcError as e: return e.code().name
with ThreadedApp(app) as served:
    ch = grpc.insecure_channel(served.target, options=[("grpc.max_send_message_length", 64<<20)])
    stub = reference_pb2_grpc.ReferenceServiceStub(ch)
    gc.collect()
    print(f"start: rss {rss()} MB, {mi()}, tensors {tensors_mb():.1f} MB", flush=True)
    with cf.ThreadPoolExecutor(8) as ex:
        for r in range(4):
            codes = list(ex.map(lambda _: one(stub), range(40)))
            gc.collect()
            print(f"round {r}: rss {rss()} MB, {mi()}, tensors {tensors_mb():.1f} MB", flush=True)
    before = rss(); libc.malloc_trim(0)
    print(f"malloc_trim(0): rss {before} -> {rss()} MB; {mi()}", flush=True)
    ch.close()
