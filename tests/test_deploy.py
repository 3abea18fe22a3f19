"""deploy/: every overlay renders, validates against the Kubernetes schemas offline (and its
custom resources against the Prometheus Operator's and KEDA's), meets our policy, and its
servers start with exactly the manifests' args and environment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from loraforge_client import GeneratorClient, TrainerClient, UnauthenticatedError

from loraforge_core.launch import free_port, health_status
from tests.services import tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu-dev", "gpu")
K8S_VERSION = "1.30.0"
OPERATOR_APIS = ("keda.sh", "monitoring.coreos.com")  # KEDA and the Prometheus Operator


def render(overlay: str) -> list[dict]:
    kubectl = tool("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed to render deploy/k8s"
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(rendered) -> None:
    overlay, objects = rendered
    assert {o["kind"] for o in objects} >= {
        "Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
    }  # fmt: skip
    # One machine keeps SQLite and bundles on a volume and scales generators on CPU; the GPU
    # fleet shares no disk and scales on queue depth (KEDA).
    assert bool(by_kind(objects, "PersistentVolumeClaim")) == (overlay == "cpu-dev")
    assert bool(by_kind(objects, "HorizontalPodAutoscaler")) == (overlay == "cpu-dev")
    for obj in objects:
        if obj["apiVersion"].split("/")[0] in OPERATOR_APIS:
            continue  # custom resources: their operators' schemas, test_custom_resources_*
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_policy_probes_security_resources_and_secrets(rendered) -> None:
    overlay, objects = rendered
    for deployment in by_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > 30  # the servers drain for 30 s
        for container in pod["containers"]:
            port = container["ports"][0]["containerPort"]
            assert container["args"][container["args"].index("--port") + 1] == str(port)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == port, probe
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"]
            assert resources["limits"]["memory"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert (gpus == "1") == (overlay == "gpu")
    for secret in by_kind(objects, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), "no inlined tokens"
    # Auth on in every overlay: the token file lies in a Secret volume the pod requires.
    for deployment in by_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        token_file = Path(_container_env(objects, container)["LORAFORGE_AUTH_TOKEN_FILE"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(token_file.parent)])
        assert volume["secret"] == {"secretName": "loraforge-auth", "optional": False}
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service for client-side round-robin over generators"


def test_the_gpu_trainers_are_a_fleet_on_shared_stores_without_a_shared_disk() -> None:
    objects = render("gpu")
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    assert deployments["loraforge-trainer"]["spec"]["replicas"] > 1
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert all("persistentVolumeClaim" not in v for v in pod["volumes"]), pod["volumes"]
        sources = pod["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "loraforge-fleet", "optional": False}} in sources
    assert not [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == "loraforge-fleet"]


def test_monitoring_scrapes_the_metrics_ports_and_keda_scales_real_deployments() -> None:
    objects = render("gpu")
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    (monitor,) = by_kind(objects, "PodMonitor")
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    assert expression["key"] == "app.kubernetes.io/name" and expression["operator"] == "In"
    assert set(expression["values"]) == set(deployments)
    settings = by_kind(objects, "ConfigMap")[0]["data"]
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] in expression["values"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(settings["LORAFORGE_METRICS_PORT"])
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    scaled = by_kind(objects, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(deployments)
    for scaler in scaled:
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0


def validate_custom_resources(objects: list[dict]) -> subprocess.CompletedProcess:
    """Run tests/crd-schemas/validate.mjs: the operators' own CRD schemas, installed by
    ``make test-services`` from npm (@kubernetes-models, pinned by its package-lock.json)."""
    schemas = ROOT / "tests" / "crd-schemas"
    node = shutil.which("node")
    assert node and (schemas / "node_modules").is_dir(), "run `make test-services` first"
    return subprocess.run([node, str(schemas / "validate.mjs")], input=json.dumps(objects),
                          capture_output=True, text=True, cwd=schemas)  # fmt: skip


def test_custom_resources_validate_against_their_operators_schemas() -> None:
    objects = render("gpu")
    custom = [o for o in objects if o["apiVersion"].split("/")[0] in OPERATOR_APIS]
    result = validate_custom_resources(objects)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("valid ") == len(custom) == 4  # 2 ScaledObjects, 1 each other
    # The validator refuses what the operator would: a port given as a number, not a name.
    (monitor,) = by_kind(objects, "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 9400
    refused = validate_custom_resources(objects)
    assert refused.returncode == 1 and "INVALID PodMonitor/loraforge" in refused.stdout
    assert "port must be string" in refused.stdout


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    (rules,) = by_kind(render("gpu"), "PrometheusRule")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def monitoring_queries() -> dict[str, str]:
    """Every PromQL expression the gpu overlay's alerts and scalers use, by name."""
    objects = render("gpu")
    (rules,) = by_kind(objects, "PrometheusRule")
    queries = {r["alert"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}
    for scaler in by_kind(objects, "ScaledObject"):
        queries[scaler["metadata"]["name"]] = scaler["spec"]["triggers"][0]["metadata"]["query"]
    return queries


def _container_env(objects: list[dict], container: dict) -> dict[str, str]:
    config = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


CLIENT_CALLS = {
    "loraforge-generator": (GeneratorClient, lambda client: client.list_adapters()),
    "loraforge-trainer": (TrainerClient, lambda client: list(client.list_jobs())),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["loraforge-generator", "loraforge-trainer"])
def test_servers_start_with_the_manifests_args_and_env(name: str, tmp_path: Path) -> None:
    """The cpu-dev overlay's command line and ConfigMap, as the kubelet would pass them, with
    the loraforge-auth Secret an operator creates: auth is on."""
    objects = render("cpu-dev")
    deployment = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"] == name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = _container_env(objects, container)
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for key, value in env.items():  # the pod's volumes become folders under tmp_path
        for mount, local in mounts.items():
            if value.startswith(mount + "/") or value == mount:
                env[key] = str(local) + value[len(mount) :]
    token = "t" * 32
    tokens = Path(env["LORAFORGE_AUTH_TOKEN_FILE"])  # the Secret's volume
    tokens.parent.mkdir(parents=True)
    tokens.write_text(token + "\n")
    args = list(container["args"])
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    executable = Path(sys.executable).parent / args[0]
    process = subprocess.Popen(
        [str(executable), *args[1:]],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            if health_status(f"127.0.0.1:{port}") == 1:
                break
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            time.sleep(0.2)
        else:
            pytest.fail("server did not become healthy")
        client_class, call = CLIENT_CALLS[name]
        with client_class(f"127.0.0.1:{port}") as client, pytest.raises(UnauthenticatedError):
            call(client)
        with client_class(f"127.0.0.1:{port}", token=token) as client:
            call(client)
    finally:
        process.terminate()
        assert process.wait(60) == 0


def test_dockerfiles_lint_clean_and_copy_only_what_exists() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    dockerfiles = sorted((DEPLOY / "docker").glob("Dockerfile*"))
    assert len(dockerfiles) == 2
    result = subprocess.run(
        [
            str(hadolint),
            "--config",
            str(DEPLOY / "docker" / "hadolint.yaml"),
            *map(str, dockerfiles),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for dockerfile in dockerfiles:
        for line in dockerfile.read_text().splitlines():
            match = re.match(r"COPY (?!--from)(.+) \S+$", line.strip())
            if match:
                for source in match.group(1).split():
                    assert (ROOT / source).exists(), f"{dockerfile.name}: {source} missing"


def test_compose_runs_the_fleet_on_shared_stores_and_volumes_of_their_own() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert (ROOT / services["trainer-a"]["build"]["dockerfile"]).exists()
    assert {"postgres", "s3", "trainer-a", "trainer-b", "generator"} <= set(services)
    s3_config = services["s3"]["volumes"][1].split(":")[0]
    assert (DEPLOY / s3_config).is_file()
    data = set()
    for name in ("trainer-a", "trainer-b", "generator"):
        env = services[name]["environment"]
        assert env["LORAFORGE_ARTIFACT_STORE"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        volume = next(v for v in services[name]["volumes"] if v.endswith(":/data"))
        data.add(volume)
    assert len(data) == 3  # no shared data volume
    for name in ("trainer-a", "trainer-b"):
        env = services[name]["environment"]
        assert env["LORAFORGE_DATABASE_URL"].startswith("postgresql://")
    assert len({services[n]["environment"]["LORAFORGE_REPLICA_ID"]
                for n in ("trainer-a", "trainer-b")}) == 2  # fmt: skip


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_the_image_healthcheck_checks_the_port_its_default_command_serves(dockerfile) -> None:
    import json

    from inference_service.cli import DEFAULT_PORT as GENERATOR_PORT
    from loraforge_core.healthcheck import candidate_ports
    from trainer_service.cli import DEFAULT_PORT as TRAINER_PORT

    text = (ROOT / "deploy" / "docker" / dockerfile).read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    port = {"loraforge-generator": GENERATOR_PORT, "loraforge-trainer": TRAINER_PORT}[command[0]]
    env = dict(re.findall(r"(LORAFORGE_\w+)=(\S+)", text))
    assert port in candidate_ports(None, env)
    # Either service started from the image without --port is checked where it listens.
    assert {GENERATOR_PORT, TRAINER_PORT} <= set(candidate_ports(None, {}))
    assert candidate_ports(None, {"LORAFORGE_PORT": "7000"}) == (7000,)
