"""deploy/ and the Dockerfile, checked without a Docker engine or a cluster (neither runs
on the machines these tests run on):

- every Kubernetes manifest, and what each kustomize overlay renders, against the
  Kubernetes schemas (kubernetes-validate, strict: an unknown field is an error);
- the compose file against the Compose Specification's JSON schema (vendored in
  deploy/schema/) and through Docker Compose's own parser (`docker-compose config`);
- the Dockerfile and the manifests through checkov, every finding fixed or skipped with a
  reason written beside it, and the Dockerfile through hadolint;
- the values that must agree across files (the WebRTC UDP range, the autoscaler's metric
  and the adapter's rule, coturn's configuration).

checkov, kubectl (its kustomize) and hadolint come from `make deploy-tools` (a virtual
environment of their own, .cache/deploy-tools); a test whose tool is missing skips and
says so. The real coturn and Prometheus with deploy/'s configuration are exercised in
test_turn_and_prometheus.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes still widely run, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
TOOLS = REPO / ".cache" / "deploy-tools" / "bin"
# What compose.yaml requires from deploy/.env (env.example).
COMPOSE_ENV = {
    "PUBLIC_IP": "203.0.113.10",
    "LIVEFUSE_TOKEN": "test-token",
    "TURN_SECRET": "test-turn-secret",
    "GRAFANA_ADMIN_PASSWORD": "test-password",
}


def tool(name: str) -> str:
    """The path of a deploy tool, or a skip that says how to get it."""
    for candidate in (TOOLS / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} is not installed: `make deploy-tools` installs it")


def run_tool(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    """Every Kubernetes object file under deploy/ (kustomizations and the adapter's and
    Prometheus's configurations are not Kubernetes objects)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent.name == "prometheus-adapter":
            continue
        docs = yaml_documents(path)
        if docs and all("apiVersion" in doc and "kind" in doc for doc in docs):
            found.append(path)
    return found


@cache
def rendered(overlay: str) -> str:
    kubectl = tool("kubectl")
    return run_tool(kubectl, "kustomize", str(K8S / "overlays" / overlay))


def rendered_objects(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    return next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    )


# -- Kubernetes ---------------------------------------------------------------------------


def test_the_manifests_are_found() -> None:
    names = {path.relative_to(DEPLOY).as_posix() for path in manifest_files()}
    assert {
        "k8s/base/deployment.yaml",
        "k8s/base/service.yaml",
        "k8s/base/poddisruptionbudget.yaml",
        "k8s/base/networkpolicy.yaml",
        "k8s/base/horizontalpodautoscaler.yaml",
        "coturn/deployment.yaml",
    } <= names, names


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    for document in yaml_documents(path):
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_kubernetes(overlay: str, version: str) -> None:
    objects = rendered_objects(overlay)
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    } <= kinds
    for document in objects:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_gpu_overlay_asks_for_one_gpu_and_the_cpu_overlay_for_none() -> None:
    gpu = container(find(rendered_objects("gpu"), "Deployment", "livefuse"), "livefuse")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith(":0.1.0-gpu")
    cpu = container(find(rendered_objects("cpu"), "Deployment", "livefuse"), "livefuse")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert cpu["image"].endswith(":0.1.0-cpu")


def test_the_rendered_coturn_runs_deploys_turnserver_conf() -> None:
    objects = rendered_objects("cpu")
    config = next(
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("coturn-config-")
    )
    assert config["data"]["turnserver.conf"] == (DEPLOY / "coturn" / "turnserver.conf").read_text()
    coturn = find(objects, "Deployment", "coturn")
    volumes = coturn["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes


def test_the_token_and_turn_secret_come_from_secrets_never_from_the_files() -> None:
    deployment = find(rendered_objects("cpu"), "Deployment", "livefuse")
    env = {e["name"]: e for e in container(deployment, "livefuse")["env"]}
    for name in ("LIVEFUSE_TOKEN", "LIVEFUSE_TURN_SECRET"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert not [o for o in rendered_objects("cpu") if o["kind"] == "Secret"]


# -- compose --------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification_schema() -> None:
    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert {"livefuse", "coturn", "prometheus", "grafana"} <= set(compose["services"])


def test_compose_file_is_read_by_docker_compose() -> None:
    compose = tool("docker-compose")
    config = run_tool(compose, "-f", str(COMPOSE), "config", "--format", "json", env=COMPOSE_ENV)
    services = json.loads(config)["services"]
    livefuse = services["livefuse"]
    assert livefuse["read_only"] is True
    assert livefuse["environment"]["LIVEFUSE_TURN_URLS"] == (
        '["turn:203.0.113.10:3478?transport=udp"]'
    )
    coturn_args = services["coturn"]["command"]
    assert "--static-auth-secret=test-turn-secret" in coturn_args


def test_compose_needs_its_secrets_set(tmp_path: Path) -> None:
    compose = tool("docker-compose")
    env = {key: value for key, value in os.environ.items() if key not in COMPOSE_ENV}
    empty = tmp_path / "empty.env"  # not a deploy/.env someone made on this machine
    empty.write_text("")
    done = subprocess.run(
        [compose, "-f", str(COMPOSE), "--env-file", str(empty), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert done.returncode != 0
    assert "set " in done.stderr and "deploy/.env" in done.stderr, done.stderr


# -- the values that must agree -------------------------------------------------------------


def _range(text: str) -> tuple[int, int]:
    first, last = re.split(r"[\s-]+", text.strip())
    return int(first), int(last)


def udp_ranges() -> dict[str, tuple[int, int]]:
    ranges: dict[str, tuple[int, int]] = {}
    expose = re.findall(r"^EXPOSE .*?(\d+-\d+)/udp", DOCKERFILE.read_text(), re.M)
    assert expose, "the Dockerfile exposes no UDP range"
    for index, found in enumerate(expose):
        ranges[f"Dockerfile EXPOSE #{index + 1}"] = _range(found)
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["livefuse"]
    defaults = dict(re.findall(r"\$\{(LIVEFUSE_UDP_M(?:IN|AX)):-(\d+)\}", COMPOSE.read_text()))
    first, last = int(defaults["LIVEFUSE_UDP_MIN"]), int(defaults["LIVEFUSE_UDP_MAX"])
    ranges["compose defaults"] = (first, last)
    # The sysctl and the published ports are made of the same two variables.
    low, high = f"${{LIVEFUSE_UDP_MIN:-{first}}}", f"${{LIVEFUSE_UDP_MAX:-{last}}}"
    assert compose["sysctls"]["net.ipv4.ip_local_port_range"] == f"{low} {high}"
    assert f"{low}-{high}:{low}-{high}/udp" in compose["ports"]
    deployment = yaml_documents(K8S / "base" / "deployment.yaml")[0]
    sysctls = deployment["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    value = next(s["value"] for s in sysctls if s["name"] == "net.ipv4.ip_local_port_range")
    ranges["pod sysctl"] = _range(value)
    policy = yaml_documents(K8S / "base" / "networkpolicy.yaml")[0]
    udp = next(
        p for rule in policy["spec"]["ingress"] for p in rule["ports"] if p["protocol"] == "UDP"
    )
    ranges["NetworkPolicy"] = (udp["port"], udp["endPort"])
    return ranges


def test_the_webrtc_udp_range_is_the_same_everywhere() -> None:
    ranges = udp_ranges()
    assert len(set(ranges.values())) == 1, ranges
    first, last = next(iter(ranges.values()))
    # The kernel prefers a start and end of different parity (it warns otherwise).
    assert first < last and (first + last) % 2 == 1


def test_the_autoscaler_metric_is_the_adapter_rules_and_a_livefuse_series() -> None:
    from livefuse.web.metrics import Metrics

    hpa = yaml_documents(K8S / "base" / "horizontalpodautoscaler.yaml")[0]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = adapter["rules"]["custom"]
    rule = next(r for r in rules if r["name"]["as"] == metric)
    assert rule["seriesQuery"].startswith(metric + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    exposed = Metrics(sessions=list, ready=lambda: True).render().decode()
    assert f"# TYPE {metric} gauge" in exposed
    # The scrape job gives the series the labels the rule maps onto Kubernetes objects.
    scrape = yaml.safe_load((K8S / "prometheus-adapter" / "prometheus-scrape.yaml").read_text())
    targets = {r.get("target_label") for r in scrape["scrape_configs"][0]["relabel_configs"]}
    assert {"namespace", "pod"} <= targets


def test_the_probes_use_the_services_health_endpoints() -> None:
    deployment = yaml_documents(K8S / "base" / "deployment.yaml")[0]
    livefuse = container(deployment, "livefuse")
    assert livefuse["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert livefuse["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "/readyz" in next(
        line
        for line in DOCKERFILE.read_text().splitlines()
        if "CMD [" in line and "urlopen" in line
    )


# -- the Dockerfile -------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if match := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_the_dockerfile_builds_cpu_by_default_and_gpu_on_request() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the last stage is what a plain `docker build` makes"
    builder = " ".join(stages["builder"])
    assert "livefuse models pull" in builder and "livefuse models verify" in builder
    for target in ("cpu", "gpu"):
        steps = stages[target]
        user = next(s for s in steps if s.startswith("USER "))
        assert user.split()[1].split(":")[0] not in ("0", "root"), user
        assert any(s.startswith("HEALTHCHECK") and "/readyz" in s for s in steps)
        assert any(s.startswith("ENTRYPOINT") and "tini" in s for s in steps)
        assert any("COPY --from=builder /opt/livefuse/models" in s for s in steps)
    assert stages["gpu"][0].split()[1].startswith("nvidia/cuda:")


def test_the_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = {name for line in copied for name in line.split()}
    assert sources and sources <= kept, (sources, kept)
    for name in sources:
        assert (REPO / name).exists(), name


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint")
    run_tool(hadolint, str(DOCKERFILE))


# -- checkov --------------------------------------------------------------------------------


def checkov(*args: str) -> list[dict[str, Any]]:
    """checkov's reports (one per framework), offline (`--skip-download`)."""
    binary = tool("checkov")
    done = subprocess.run(
        [binary, *args, "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "PYTHONWARNINGS": "ignore"},
    )
    try:
        reports = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no report (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return reports if isinstance(reports, list) else [reports]


def _findings(reports: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for report in reports:
        results = report.get("results", {})
        for outcome in ("failed_checks", "skipped_checks"):
            for check in results.get(outcome, []):
                yield outcome, check


def assert_clean(reports: list[dict[str, Any]]) -> None:
    failed = [c for outcome, c in _findings(reports) if outcome == "failed_checks"]
    assert not failed, "\n".join(
        f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}" for c in failed
    )
    passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
    assert passed > 0, "checkov checked nothing"
    skipped = [c for outcome, c in _findings(reports) if outcome == "skipped_checks"]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 10, f"{check['check_id']} skipped without a reason"


def test_checkov_passes_the_dockerfile() -> None:
    assert_clean(checkov("--file", str(DOCKERFILE), "--framework", "dockerfile"))


def test_checkov_passes_the_manifests() -> None:
    assert_clean(checkov("--directory", str(DEPLOY), "--framework", "kubernetes"))


def test_checkov_passes_the_rendered_overlays(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered(overlay))
    assert_clean(checkov("--directory", str(tmp_path), "--framework", "kubernetes"))
