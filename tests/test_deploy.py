"""Deployment: the Dockerfile, docker-compose.yml and the Kubernetes manifests in k8s/.

No Docker engine runs here, so the image is never built. Instead, every step the Dockerfile
runs is one the test suite runs too (the install commands of `make install`, the
`python -m ingest` entrypoint), the Dockerfile is linted with hadolint, and each
kustomization is rendered with kubectl and validated against the Kubernetes schemas offline
(kubernetes-validate). The tools come from .ci/install-deploy-tools; a missing one fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ingest.migrate import migration_files
from ingest.settings import ENV_NAMES, SettingsError, load_settings
from ingest.shutdown import GRACE_MARGIN_S

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HINT = "run .ci/install-deploy-tools to install the deploy test tools into the virtualenv"
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/example", "k8s/overlays/scaled"]
SCALED = "k8s/overlays/scaled"
ENTRYPOINT = ["python", "-m", "ingest"]
ROLES = {"ingest", "live"}
# The oldest Kubernetes the manifests promise to work on, and the newest schemas available.
K8S_MIN = "1.30.0"


# --- tools ---------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} not found at {path}: {HINT}", pytrace=False)
    return str(path)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"Python package {name!r} is missing ({exc}): {HINT}", pytrace=False)


def _yaml_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in _module("yaml").safe_load_all(text) if doc]


@cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(ROOT / kustomization)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {kustomization} failed:\n{result.stderr}", pytrace=False)
    return tuple(_yaml_all(result.stdout))


@pytest.fixture(params=KUSTOMIZATIONS)
def objects(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return _render(request.param)


def _of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _workloads(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return _of_kind(objects, "Deployment") + _of_kind(objects, "Job")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _by_role(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """The Deployments keyed by the ROLE their container runs."""
    deployments = {}
    for d in _of_kind(objects, "Deployment"):
        (container,) = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        deployments[env.get("ROLE", "all")] = d
    return deployments


def _container_env(
    objects: tuple[dict[str, Any], ...], container: dict[str, Any]
) -> dict[str, str]:
    """What the process sees: image ENV, then envFrom (ConfigMap, Secret), then env (a
    value, or a key of the Secret), the Secret being the kustomization's template."""
    env = dict(_image_env())
    secret = _secret_of(objects)
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            (cm,) = [c for c in _of_kind(objects, "ConfigMap") if c["metadata"]["name"] == name]
            env.update(cm.get("data", {}))
        else:
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret["stringData"])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], e["name"]
            assert ref["key"] in secret["stringData"], f"{e['name']}: no key {ref['key']}"
            env[e["name"]] = secret["stringData"][ref["key"]]
    return env


@cache
def _secret_template(kustomization: str = "k8s/base") -> dict[str, Any]:
    """The Secret template of a kustomization: its own secret.example.yaml (an overlay that
    needs more keys), else the base's."""
    own = ROOT / kustomization / "secret.example.yaml"
    (secret,) = _yaml_all(
        (own if own.is_file() else ROOT / "k8s/base/secret.example.yaml").read_text()
    )
    return secret


def _secret_of(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (kustomization,) = [k for k in KUSTOMIZATIONS if _render(k) is objects]
    return _secret_template(kustomization)


# --- Dockerfile ----------------------------------------------------------------------------


@cache
def _dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return tuple(instructions)


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, those of the stages it starts FROM first (the image a
    target builds)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in _dockerfile():
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            current = [*stages.get(base.strip(), []), (keyword, args)]
            stages[name.strip() or base.strip()] = current
        else:
            current.append((keyword, args))
    return stages


def _final_stage() -> list[tuple[str, str]]:
    """The default target (the last stage), with what it inherits."""
    return list(_stages().values())[-1]


@cache
def _image_env() -> dict[str, str]:
    env = {}
    for keyword, args in _final_stage():
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _exec_form(keyword: str) -> list[str]:
    (args,) = [a for kw, a in _final_stage() if kw == keyword]
    try:
        value = json.loads(args)  # the exec form is a JSON array
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        pytest.fail(f"{keyword} {args}: use the exec form, so python gets SIGTERM itself")
    return value


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The `pip install` commands, without flags that only change pip's output or cache."""
    noise = {"-q", "--quiet", "--disable-pip-version-check", "--no-cache-dir"}
    found = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            if len(words) >= 2 and Path(words[0]).name == "pip" and words[1] == "install":
                found.append(["pip", *[w for w in words[1:] if w not in noise]])
    return found


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multi_stage_with_a_pinned_slim_non_root_final_stage():
    bases = [args.split()[0] for kw, args in _dockerfile() if kw == "FROM"]
    assert len(bases) >= 2, "build and runtime stages"
    bases = [b for b in bases if b not in _stages()]  # images, not stages built on stages
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", base), f"pin {base} to a full version"
    final = _final_stage()
    assert "slim" in final[0][1], "the final stage starts from a slim image (no compiler)"
    final_runs = " ".join(args for kw, args in final if kw == "RUN")
    for tool in ("gcc", "g++", "build-essential", "make ", "pip install"):
        assert tool not in final_runs, f"the final stage installs nothing ({tool})"
    assert any(kw == "COPY" and args.startswith("--from=") for kw, args in final)
    (user,) = [args for kw, args in final if kw == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user, so runAsNonRoot can check it"


def test_dockerfile_entrypoint_is_python_m_ingest_serve_in_exec_form():
    assert _exec_form("ENTRYPOINT") + _exec_form("CMD") == [*ENTRYPOINT, "serve"]
    assert _image_env()["PATH"].startswith("/opt/venv/bin:"), "`python` is the venv's"
    # The image is the installed package and its locked dependencies: no sources beside it.
    copies = [args.split() for kw, args in _final_stage() if kw == "COPY"]
    assert copies == [["--from=build", "/opt/venv", "/opt/venv"]]
    assert "SQL_DIR" not in _image_env(), "migrations ship inside the package"


def test_the_dev_target_adds_only_devtools_to_the_image():
    stages = _stages()
    base, dev = stages["base"], stages["dev"]
    assert dev[: len(base)] == base, "dev is the production image plus devtools"
    assert [args.split() for kw, args in dev[len(base) :] if kw == "COPY"] == [
        ["devtools/", "/app/devtools/"]
    ]


def test_the_package_ships_its_migrations_and_dashboard_and_no_devtools(tmp_path: Path) -> None:
    """What `pip install --no-deps .` puts in the image: the wheel built from this tree."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ingest-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("ingest/sql/") for n in names if n.startswith("ingest/sql/"))
    assert shipped == sorted(p.name for p in migration_files())
    assert "ingest/static/index.html" in names
    assert not [n for n in names if n.startswith(("devtools/", "tests/", "bench/"))]


def test_the_entrypoint_has_the_commands_the_image_and_manifests_run():
    result = subprocess.run(
        [sys.executable, "-m", "ingest", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "migrate"):
        assert command in result.stdout


def test_dockerfile_installs_exactly_as_make_install_does():
    runs = [args for kw, args in _dockerfile() if kw == "RUN"]
    docker = _pip_installs(runs)
    assert docker == [
        ["pip", "install", "-r", "requirements.lock"],
        ["pip", "install", "--no-deps", "."],
    ]
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:", 1)[1].split("\n\n")[0]
    make = _pip_installs([line.replace("$(BIN)/", "") for line in recipe.splitlines()])
    assert len(make) == 2, recipe
    # The same locked runtime dependencies, installed by the same command.
    assert make[0] == docker[0]
    # The same package from the same tree; make adds -e and the dev extra for development.
    assert re.sub(r"\[.*\]$", "", make[1][-1]) == docker[1][-1] == "."


def test_the_lock_holds_every_runtime_dependency_so_no_deps_loses_nothing():
    """The image installs the package with --no-deps: the lock must close over its
    dependencies (on Linux, CPython 3.11), and the tests must have run on those versions."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version.strip())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = default_environment()
    todo = [Requirement(r) for r in project["dependencies"]]
    seen: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is needed at run time but missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs lock {pins[name]}"
        installed = Version(importlib.metadata.version(req.name))
        assert installed == pins[name], f"{req.name} {installed} installed, lock says {pins[name]}"
        for extra in {""} | req.extras:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for dep in importlib.metadata.requires(req.name) or []:
                sub = Requirement(dep)
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    todo.append(sub)


def test_dockerignore_allows_only_what_the_dockerfile_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for keyword, args in _dockerfile():
        if keyword == "COPY" and not args.startswith("--from="):
            *sources, _dest = args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is not in the build context"
    assert "README.md" in allowed, "pyproject.toml names it: the package build reads it"
    assert not allowed & {".venv", ".git", "tests", "bench", "build", ".dev"}


# --- Kubernetes ----------------------------------------------------------------------------


def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(objects):
    kv = _module("kubernetes_validate")
    secret = _secret_of(objects)
    for version in (K8S_MIN, kv.latest_version()):
        for obj in (*objects, secret):
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name} is invalid for Kubernetes {version}: {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                pytest.fail(f"{name}: {exc.message}")


def test_the_secret_is_a_template_and_never_rendered(objects):
    assert not _of_kind(objects, "Secret"), "applying must never overwrite real credentials"
    secret = _secret_of(objects)
    assert set(secret["stringData"]) >= {"DATABASE_URL", "REDIS_URL", "JWT_SECRET"}
    assert set(_secret_template()["stringData"]) == {"DATABASE_URL", "REDIS_URL", "JWT_SECRET"}
    assert secret["metadata"]["name"] == _secret_template()["metadata"]["name"]
    for key, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{key} holds a placeholder only"
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            assert refs == [secret["metadata"]["name"]]


def test_the_environment_names_are_known_and_accepted_by_the_service(objects):
    """A typo (SHUTDOWN_TIMEOUT_SECONDS) would be silently ignored: every variable set must be
    a setting, and the whole environment must pass the service's own check at start."""
    not_settings = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = _container_env(objects, container)
            unknown = set(env) - set(ENV_NAMES) - not_settings
            assert not unknown, f"{workload['metadata']['name']}: unknown variables {unknown}"
            try:
                load_settings(env)
            except SettingsError as exc:
                pytest.fail(f"{workload['metadata']['name']}: {exc}")


def test_one_deployment_per_role_with_its_service_hpa_and_pdb(objects):
    deployments = _by_role(objects)
    assert set(deployments) == ROLES
    hpas = _of_kind(objects, "HorizontalPodAutoscaler")
    pdbs = _of_kind(objects, "PodDisruptionBudget")
    services = _of_kind(objects, "Service")
    for role, d in deployments.items():
        name = d["metadata"]["name"]
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        others = [o["spec"]["template"]["metadata"]["labels"] for o in deployments.values()]
        others.remove(pod_labels)
        assert "replicas" not in d["spec"], f"{name}: the HPA owns replicas; apply would reset it"
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        (hpa,) = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"], role
        (pdb,) = [p for p in pdbs if _selects(p["spec"]["selector"]["matchLabels"], pod_labels)]
        assert not any(_selects(pdb["spec"]["selector"]["matchLabels"], o) for o in others)
        (svc,) = [s for s in services if _selects(s["spec"]["selector"], pod_labels)]
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
        assert not any(_selects(svc["spec"]["selector"], o) for o in others), role


def test_pods_run_python_m_ingest_with_probes_and_metrics_on_the_service_port(objects):
    for d in _of_kind(objects, "Deployment"):
        pod = d["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        env = _container_env(objects, container)
        image_command = _exec_form("ENTRYPOINT") + _exec_form("CMD")
        assert container["command"] + container["args"] == image_command
        (port,) = container["ports"]
        assert port["name"] == "http" and port["containerPort"] == load_settings(env).port
        ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert (ready["path"], ready["port"]) == ("/readyz", "http")
        assert (live["path"], live["port"]) == ("/healthz", "http")
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert annotations["prometheus.io/port"] == str(port["containerPort"])
        spread = pod["spec"]["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in spread}
        assert keys >= {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for c in spread:
            assert c["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_the_grace_period_outlasts_the_prestop_pause_and_the_worst_drain(objects):
    for d in _of_kind(objects, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = _container_env(objects, container)
        shutdown_s = load_settings(env).shutdown_timeout_s  # as the service reads it
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        pause_s = float(pre_stop[1])
        assert pause_s >= 5, "endpoints and ingress controllers need a few seconds to let go"
        # One deadline for the whole drain, then closing and exit (ingest/shutdown.py).
        worst = pause_s + shutdown_s + GRACE_MARGIN_S
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > worst, f"{d['metadata']['name']}: grace {grace} s <= worst drain {worst} s"


def test_pods_are_restricted_non_root_read_only_with_limits(objects):
    for workload in _workloads(objects):
        name = workload["metadata"]["name"]
        spec = workload["spec"]["template"]["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] in {
            s["metadata"]["name"] for s in _of_kind(objects, "ServiceAccount")
        }
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert sc.get("runAsNonRoot", pod_sc["runAsNonRoot"]) is True, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp_volumes, f"{name}: an emptyDir at /tmp"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_the_migration_job_runs_python_m_ingest_migrate_from_the_same_image(objects):
    (job,) = _of_kind(objects, "Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"] == [*_exec_form("ENTRYPOINT"), "migrate"]
    images = {
        c["image"]
        for d in _of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {container["image"]}
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert "ttlSecondsAfterFinished" in spec, "a Job is immutable: the next apply needs it gone"


def test_the_network_policy_covers_every_pod_and_admits_only_the_service_port(objects):
    (policy,) = _of_kind(objects, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for workload in _workloads(objects):
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "no rule open to every source"
        assert [p["port"] for p in rule["ports"]] == [8080]


def _routes(path: str, rule: dict[str, str]) -> bool:
    """Whether an Ingress path rule sends ``path`` to its backend (Prefix matches whole
    path elements: /static matches /static/x, not /staticx)."""
    if rule["pathType"] == "Exact":
        return path == rule["path"]
    prefix = rule["path"].rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def test_the_example_ingress_routes_the_api_and_never_metrics_or_probes():
    (ingress,) = _of_kind(_render("k8s/overlays/example"), "Ingress")
    rules = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for public in ("/api/v1/tracking/ping", "/api/v1/tracking/trips/t1/latest", "/api/v1/live"):
        assert any(_routes(public, r) for r in rules), public
    for private in ("/metrics", "/healthz", "/readyz"):
        assert not [r["path"] for r in rules if _routes(private, r)], private


def test_the_scaled_overlay_reads_from_a_replica_and_keeps_live_data_in_a_redis_cluster():
    objects = _render(SCALED)
    deployments = _by_role(objects)
    for role, d in deployments.items():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        (read_url,) = [e for e in container["env"] if e["name"] == "DATABASE_READ_URL"]
        # From the Secret by name: a Secret without the key stops the pod, never a silent
        # fallback to the primary.
        ref = read_url["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ingest-secrets", "key": "DATABASE_READ_URL"}, role
        settings = load_settings(_container_env(objects, container))
        assert settings.database_read_url and settings.database_read_url != settings.database_url
        assert settings.redis_mode == "cluster", role
        assert settings.redis_cluster_buckets >= 16, "a very large org must spread over shards"
        # Failover: the primary and its standbys, connecting to whichever takes writes.
        hosts = urlsplit(settings.database_url).netloc.rsplit("@", 1)[1]
        assert "," in hosts, settings.database_url
        assert "target_session_attrs=read-write" in urlsplit(settings.database_url).query
    (job,) = _of_kind(objects, "Job")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert "DATABASE_READ_URL" not in {e["name"] for e in migrate.get("env", [])}
    # The same comment in the kustomization documents the multi-host DATABASE_URL.
    assert "target_session_attrs=read-write" in (ROOT / SCALED / "kustomization.yaml").read_text()


def test_the_scaled_overlay_has_the_autoscaler_bounds_of_the_capacity_model():
    """docs/scaling.md states the bounds the model gives; the overlay must carry the same,
    and at its maximum every pod's pool must fit PostgreSQL's max_connections."""
    objects = _render(SCALED)
    text = (ROOT / "docs/scaling.md").read_text()
    model = re.search(
        r"`k8s/overlays/scaled` sets ingest (\d+) to (\d+) pods and live (\d+) to (\d+)", text
    )
    assert model, "docs/scaling.md: the bounds of k8s/overlays/scaled"
    bounds = {"ingest": model.group(1, 2), "live": model.group(3, 4)}
    pool_at_max = 0
    for role, d in _by_role(objects).items():
        (hpa,) = [
            h for h in _of_kind(objects, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == d["metadata"]["name"]
        ]  # fmt: skip
        spec = hpa["spec"]
        assert (str(spec["minReplicas"]), str(spec["maxReplicas"])) == bounds[role], role
        (container,) = d["spec"]["template"]["spec"]["containers"]
        pool_at_max += (
            spec["maxReplicas"] * load_settings(_container_env(objects, container)).db_pool_max
        )
    base = {
        h["metadata"]["name"]: h["spec"]
        for h in _of_kind(_render("k8s/base"), "HorizontalPodAutoscaler")
    }
    scaled = {
        h["metadata"]["name"]: h["spec"] for h in _of_kind(objects, "HorizontalPodAutoscaler")
    }
    assert all(scaled[n]["maxReplicas"] > base[n]["maxReplicas"] for n in base)
    max_connections = int(re.search(r"`max_connections` of (\d+)", text).group(1))
    assert pool_at_max <= max_connections - 20, "room for migrations, maintenance and people"


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_runs_migrations_once_before_the_service():
    (compose,) = _yaml_all((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "ingest"} <= set(services)
    simulator = services["simulator"]
    assert simulator["build"]["target"] == "dev", "devtools are not in the production image"
    assert simulator["entrypoint"][-1] == "devtools.simulate"
    assert simulator["profiles"] == ["simulator"], "started only when asked for"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["ingest"]["command"] == ["serve"]
    assert services["migrate"]["image"] == services["ingest"]["image"]
    depends = services["ingest"]["depends_on"]
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "ingest"):
        env = services[name]["environment"]
        assert set(env) <= set(ENV_NAMES), set(env) - set(ENV_NAMES)
    grace = int(services["ingest"]["stop_grace_period"].removesuffix("s"))
    shutdown_s = float(services["ingest"]["environment"]["SHUTDOWN_TIMEOUT_S"])
    assert grace > shutdown_s + GRACE_MARGIN_S
