"""The Kubernetes manifests (issue 13): every manifest validated against the
Kubernetes schemas (kubernetes-validate ships them: no cluster, no network),
the Kustomize base rendered, and what the deployment relies on checked in
the rendered objects: probes, security context, secrets, replicas and the
disruption budget, scrape annotations, and agreement with the image."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from lcic_guard.flags import parse_duration
from lcic_guard.sidecar.server import LIVENESS_SERVICE
from lcic_guard.store.connect import parse_sentinel_url

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes" / "base"
# The oldest version the base supports (native sidecars: 1.29) and the newest
# whose schemas the package ships.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
Obj = dict[str, Any]


def kustomization() -> Obj:
    data: Obj = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return data


def manifests() -> list[Path]:
    return sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")


def render() -> list[Obj]:
    """``kubectl kustomize`` where kubectl is installed, else :func:`concatenate`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return concatenate()
    done = subprocess.run(
        [kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def concatenate() -> list[Obj]:
    """The resources the kustomization lists, concatenated, with its labels
    and image tag applied as Kustomize applies them."""
    k = kustomization()
    objs = [
        d for name in k["resources"] for d in yaml.safe_load_all((BASE / name).read_text()) if d
    ]
    labels = {key: v for entry in k.get("labels", []) for key, v in entry["pairs"].items()}
    tags = {i["name"]: i["newTag"] for i in k.get("images", [])}
    for obj in objs:
        obj["metadata"].setdefault("labels", {}).update(labels)
        for c in containers(obj):
            if c["image"] in tags:
                c["image"] = f"{c['image']}:{tags[c['image']]}"
    return objs


def containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def by_name(objs: list[Obj], kind: str, name: str) -> Obj:
    [found] = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return render()


def test_concatenation_renders_what_kustomize_renders(rendered: list[Obj]) -> None:
    """The fallback used where kubectl is missing is checked against the real
    renderer where it is present."""
    if shutil.which("kubectl") is None:
        # Nothing to compare with here; the other tests check the concatenation.
        assert len(rendered) == len(kustomization()["resources"])
        return

    def key(o: Obj) -> tuple[str, str]:
        return (o["kind"], o["metadata"]["name"])

    assert sorted(concatenate(), key=key) == sorted(rendered, key=key)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in manifests()}, "a manifest is not in the kustomization"
    count = 0
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                # strict: unknown fields are errors too (a misspelt key
                # would otherwise be dropped silently by the API server).
                kubernetes_validate.validate(doc, version, strict=True)
                count += 1
    assert count == 6


def test_the_validator_rejects_a_wrong_manifest() -> None:
    """So that the test above can fail: a misspelt field and a wrong type."""
    doc = yaml.safe_load((BASE / "reconciler.yaml").read_text())
    doc["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    doc = yaml.safe_load((BASE / "reconciler.yaml").read_text())
    doc["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_rendered_base_validates_and_holds_the_expected_objects(rendered: list[Obj]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == [
        ("ConfigMap", "lcic-guard"),
        ("Deployment", "classroom-service"),
        ("Deployment", "lcic-guard-reconciler"),
        ("PodDisruptionBudget", "lcic-guard-reconciler"),
        ("Secret", "lcic-guard-auth"),
        ("Secret", "lcic-guard-redis"),
    ]
    for obj in rendered:
        kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lcic-guard"
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    images = {c["image"] for o in rendered for c in containers(o) if "lcic-guard" in c["image"]}
    assert images == {f"lcic-guard:{version.group(1)}"}


def test_sidecar_probes_security_and_secrets(rendered: list[Obj]) -> None:
    pod = by_name(rendered, "Deployment", "classroom-service")["spec"]["template"]
    [guard] = [
        c
        for c in containers(by_name(rendered, "Deployment", "classroom-service"))
        if c["name"] == "lcic-guard"
    ]
    assert guard["restartPolicy"] == "Always"  # a native sidecar
    assert guard["args"] == ["serve"]
    env = env_of(guard)
    grpc_port = int(env["LCIC_GUARD_LISTEN"]["value"].rpartition(":")[2])
    assert env["LCIC_GUARD_LISTEN"]["value"].startswith("0.0.0.0:")  # kubelet reaches it
    ports = {p["name"]: p["containerPort"] for p in guard["ports"]}
    assert ports["grpc"] == grpc_port
    # Native gRPC probes: liveness on the entry that stays SERVING, readiness
    # on the server's own health (the same answer as /readyz).
    for probe in ("startupProbe", "livenessProbe"):
        assert guard[probe]["grpc"] == {"port": grpc_port, "service": LIVENESS_SERVICE}
    assert guard["readinessProbe"]["grpc"] == {"port": grpc_port}
    # Read-only root, not root, the same user as the image.
    sc = guard["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"USER {sc['runAsUser']}:{sc['runAsGroup']}" in dockerfile
    mounts = {m["mountPath"]: m for m in guard["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["medium"] == "Memory"
    # The token file the sidecar reads is the mounted secret's key.
    token_file = Path(env["LCIC_GUARD_AUTH_TOKEN_FILE"]["value"])
    mount = mounts[str(token_file.parent)]
    assert mount["readOnly"] is True
    secret = volumes[mount["name"]]["secret"]
    assert {i["path"] for i in secret["items"]} == {token_file.name}
    auth = by_name(rendered, "Secret", secret["secretName"])
    assert any(i["key"] in auth["stringData"] for i in secret["items"])
    # The Redis URL from a secret, in a form the store accepts.
    ref = env["LCIC_GUARD_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    url = by_name(rendered, "Secret", ref["name"])["stringData"][ref["key"]]
    assert url.startswith("redis://")
    # Resources from the measured RSS (docs/benchmarks.md: 278 MB with
    # 1,000,000 cached applications) with room to spare.
    assert mebibytes(guard["resources"]["limits"]["memory"]) >= 300
    assert mebibytes(guard["resources"]["requests"]["memory"]) >= 84


def test_reconciler_replicas_budget_probes_and_scrape_annotations(rendered: list[Obj]) -> None:
    rec = by_name(rendered, "Deployment", "lcic-guard-reconciler")
    pdb = by_name(rendered, "PodDisruptionBudget", "lcic-guard-reconciler")
    assert rec["spec"]["replicas"] == 2
    assert rec["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = rec["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [c] = containers(rec)
    assert c["args"] == ["reconcile"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = by_name(rendered, "ConfigMap", "lcic-guard")["data"]
    metrics_port = int(config["LCIC_GUARD_METRICS_LISTEN"].rpartition(":")[2])
    for deployment in ("lcic-guard-reconciler", "classroom-service"):
        obj = by_name(rendered, "Deployment", deployment)
        notes = obj["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == metrics_port
        assert notes["prometheus.io/path"] == "/metrics"
        for container in containers(obj):
            if container["image"].startswith("lcic-guard"):
                assert {"configMapRef": {"name": "lcic-guard"}} in container["envFrom"]
                ports = {p["containerPort"] for p in container["ports"]}
                assert metrics_port in ports
    # Shadow mode first (docs/deployment.md), and values the CLI accepts.
    assert config["LCIC_GUARD_SHADOW"] == "all"
    env = env_of(containers(by_name(rendered, "Deployment", "classroom-service"))[0])
    assert parse_duration(env["LCIC_GUARD_SHUTDOWN_DELAY"]["value"]) == 5000


def test_documented_sentinel_url_parses() -> None:
    text = (BASE / "secrets.yaml").read_text()
    [url] = re.findall(r"(redis\+sentinel://\S+?);?$", text, re.M)
    target = parse_sentinel_url(url)
    assert len(target.sentinels) == 2


def mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    return int(match.group(1)) * (1024 if match.group(2) == "Gi" else 1)
