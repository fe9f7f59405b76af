"""Regenerate the checked-in Python code of the wire contract (`make protos`).

    python protos/generate.py [OUT_DIR]     # default: clients/

Writes `rlhfpb/v1/*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` under OUT_DIR. The test suite runs
it into a temporary directory and fails when the checked-in files differ (a stale contract).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = sorted((PROTO_ROOT / "rlhfpb" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_dir / "rlhfpb"
    for init in (pkg / "__init__.py", pkg / "v1" / "__init__.py"):
        if not init.exists():
            init.write_text('"""Generated protobuf code of the rlhf wire contract (package rlhfpb.v1)."""\n')
    return sorted(p for p in (pkg / "v1").iterdir() if p.suffix in {".py", ".pyi"})


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT.parent / "clients"
    for path in generate(target):
        print(path)
