"""deploy/: the image recipe, its two scripts and the Kubernetes manifests.

No image is built and no cluster is reached here. What can be checked offline is: the
health probe script against a real server, the entrypoint's command lines (with a stand-in
`two-tower` that prints its argv), every COPY source, and the manifests parsed with PyYAML
and held against the CLI's real parser. Kustomize overlays are rendered when `kustomize` or
`kubectl` is on PATH; otherwise those cases skip with the install command.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests: "
                           "pip install pyyaml==6.0.3")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROBE = DEPLOY / "grpc_health_check.py"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
IMAGE = "two-tower-retrieval"
SERVICE = "two_tower.retrieval.v1.RetrievalService"
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob"}
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
KUSTOMIZE_HINT = ("no kustomize: GOBIN=$PWD/.tools/bin go install "
                  "sigs.k8s.io/kustomize/kustomize/v5@v5.7.1 (or install kubectl)")


# --- reading the manifests ------------------------------------------------------------------


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _source_docs() -> list[dict]:
    """Every object of base/ and jobs/ as written (before kustomize)."""
    paths = sorted((K8S / "base").glob("*.yaml")) + sorted((K8S / "jobs").glob("*.yaml"))
    return [d for p in paths if p.name != "kustomization.yaml" for d in _load(p)]


def _kustomize_command() -> list[str] | None:
    for candidate in (ROOT / ".tools" / "bin" / "kustomize", shutil.which("kustomize")):
        if candidate and os.access(candidate, os.X_OK):
            return [str(candidate), "build"]
    kubectl = shutil.which("kubectl")
    return [kubectl, "kustomize"] if kubectl else None


_RENDERED: dict[str, list[dict]] = {}


def _render(target: str) -> list[dict]:
    if target not in _RENDERED:
        command = _kustomize_command()
        if command is None:
            pytest.skip(KUSTOMIZE_HINT)
        done = subprocess.run([*command, str(K8S / target)], capture_output=True, text=True,
                              check=False, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)} {target} failed:\n{done.stderr}"
        _RENDERED[target] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _RENDERED[target]


def _docs(view: str) -> list[dict]:
    return _source_docs() if view == "source" else _render(view) + _render("jobs")


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} (got {len(found)})"
    return found[0]


def _pod_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def _containers(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            pod = _pod_spec(doc)
            for container in pod.get("initContainers", []) + pod["containers"]:
                yield doc, container


def _ours(docs: list[dict]):
    return [(d, c) for d, c in _containers(docs) if _image_name(c).startswith(IMAGE)]


def _image_name(container: dict) -> str:
    """two-tower-retrieval or two-tower-retrieval-train, without registry and tag."""
    return container["image"].split(":")[0].rsplit("/", 1)[-1]


def _arg(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


VIEWS = ["source", "overlays/trial", "overlays/production"]
NAMESPACES = {"overlays/trial": "two-tower-trial", "overlays/production": "two-tower"}


# --- every manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_parses_with_kind_and_name(path):
    docs = _load(path)
    assert docs, f"{path}: no YAML document"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{path}: {doc['kind']} without a name"


@pytest.mark.parametrize("target", ["base", "jobs", "overlays/trial", "overlays/production"])
def test_kustomize_renders(target):
    docs = _render(target)
    assert docs
    if target.startswith("overlays/"):
        namespace = NAMESPACES[target]
        _one(docs, "Namespace", namespace)
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]


# Offline schema check: kubeconform needs schemas from the internet; the `kubernetes` Python
# client carries the API's field names and types in its models, which is enough to catch a
# misspelt or misplaced field (as `kubectl apply --validate=strict` would against a cluster).
_SCALARS = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
            "datetime": (str,), "date": (str,), "bytes": (str,)}


def _schema_errors(value, type_name: str, path: str) -> list[str]:
    client = pytest.importorskip("kubernetes.client",
                                 reason="field check: pip install kubernetes==37.0.2")
    if type_name.startswith(("List[", "list[")):
        if not isinstance(value, list):
            return [f"{path}: expected a list (got {value!r})"]
        return [e for i, v in enumerate(value) for e in _schema_errors(v, type_name[5:-1],
                                                                       f"{path}[{i}]")]
    if type_name.startswith(("Dict[", "dict(")):  # Dict[str, X] (older clients: dict(str, X))
        inner = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping (got {value!r})"]
        return [e for k, v in value.items() for e in _schema_errors(v, inner, f"{path}.{k}")]
    if type_name == "object":  # int-or-string, quantities, free-form
        return []
    if type_name in _SCALARS:
        accepted = _SCALARS[type_name] + ((int, float) if "resources" in path else ())
        ok = isinstance(value, accepted) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name} (got {value!r})"]
    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping (got {value!r})"]
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = [f"{path}.{key}: no such field in {type_name}" for key in value if key not in fields]
    return errors + [e for key, v in value.items() if key in fields
                     for e in _schema_errors(v, model.openapi_types[fields[key]], f"{path}.{key}")]


@pytest.mark.parametrize("view", VIEWS + ["examples"])
def test_every_object_has_only_fields_the_kubernetes_api_knows(view):
    docs = (_load(K8S / "overlays" / "production" / "secret.example.yaml") if view == "examples"
            else _docs(view))
    errors = []
    for doc in docs:
        version = doc["apiVersion"].split("/")[-1].capitalize()
        where = f"{doc['kind']} {doc['metadata']['name']}"
        errors += _schema_errors(doc, f"{version}{doc['kind']}", where)
    assert not errors, "\n".join(errors)


# --- the serving Deployment and its Service ---------------------------------------------------


@pytest.mark.parametrize("view", VIEWS)
def test_probes_ask_grpc_health_on_the_named_port_serve_listens_on(view):
    deployment = _one(_docs(view), "Deployment", "retrieval")
    [container] = _pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[0] == "serve"
    assert ports["grpc"] == int(_arg(args, "--port"))
    assert ports["metrics"] == int(_arg(args, "--metrics-port"))
    assert _arg(args, "--host") == "0.0.0.0", "the CLI's default host is loopback only"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["grpc"]  # native gRPC probe: grpc.health.v1 Check
        assert probe["port"] == ports["grpc"], kind
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.parametrize("view", VIEWS)
def test_service_hpa_and_pdb_point_at_the_deployment(view):
    docs = _docs(view)
    deployment = _one(docs, "Deployment", "retrieval")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = _pod_spec(deployment)["containers"]
    port_names = {p["name"] for p in container["ports"]}
    service = _one(docs, "Service", "retrieval")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == \
        {"grpc": "grpc", "metrics": "metrics"}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    hpa = _one(docs, "HorizontalPodAutoscaler", "retrieval")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "retrieval"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(docs, "PodDisruptionBudget", "retrieval")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --- every container running the image ----------------------------------------------------------


def _cli_options() -> dict[str, set[str]]:
    from app.cli import build_parser as _parser

    [subparsers] = [a for a in _parser()._actions if a.choices and a.dest == "command"]
    return {name: set(p._option_string_actions) for name, p in subparsers.choices.items()}


@pytest.mark.parametrize("view", ["source", "overlays/trial", "overlays/production"])
def test_every_command_line_is_one_the_cli_accepts(view):
    from app.cli import build_parser as _parser

    options = _cli_options()
    used = _ours(_docs(view))
    assert {c["args"][0] for _, c in used} >= {"serve", "build-index", "train"}
    for doc, container in used:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert "command" not in container, f"{where}: keep the image's entrypoint"
        sub, *rest = container["args"]
        assert sub in options, f"{where}: no subcommand {sub!r}"
        for token in rest:  # exact names: argparse would also accept abbreviations
            if token.startswith("--"):
                assert token.split("=")[0] in options[sub], f"{where}: {sub} has no {token}"
        try:
            _parser().parse_args([VAR.sub("x", a) for a in container["args"]])
        except SystemExit:
            pytest.fail(f"{where}: `two-tower {shlex.join(container['args'])}` is rejected")


@pytest.mark.parametrize("view", VIEWS)
def test_every_variable_reference_is_defined_before_use(view):
    # Kubernetes leaves an undefined $(NAME) as it is, so a typo would reach the CLI silently.
    docs = _docs(view)
    config = {k for d in docs if d["kind"] == "ConfigMap" for k in d["data"]}
    for doc, container in _containers(docs):
        defined = set(config) if container.get("envFrom") else set()
        for entry in container.get("env", []):
            for name in VAR.findall(entry.get("value", "")):
                assert name in defined, f"{doc['metadata']['name']}: {entry['name']} uses {name}"
            defined.add(entry["name"])
        for name in VAR.findall(" ".join(container.get("args", []))):
            assert name in defined, f"{doc['metadata']['name']}: args use undefined {name}"


@pytest.mark.parametrize("view", VIEWS)
def test_every_container_has_resource_requests_and_a_memory_limit(view):
    for doc, container in _containers(_docs(view)):
        resources = container.get("resources", {})
        where = f"{doc['kind']} {doc['metadata']['name']}/{container['name']}"
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert "memory" in resources.get("limits", {}), where


@pytest.mark.parametrize("view", VIEWS)
def test_the_image_runs_as_the_dockerfiles_non_root_user(view):
    uid = int(_dockerfile_args()["APP_UID"])
    images = set()
    for doc, container in _ours(_docs(view)):
        context = _pod_spec(doc)["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid
        images.add(container["image"])
        expected = IMAGE if doc["kind"] == "Deployment" else f"{IMAGE}-train"
        assert _image_name(container) == expected, (doc["metadata"]["name"], container["image"])
    assert len(images) == 2, f"the service's image and the jobs' image (got {images})"


# --- index CronJob, training Jobs ------------------------------------------------------------


CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _valid_cron_field(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not match or (match.group(4) is not None and int(match.group(4)) == 0):
            return False
        if match.group(2) is not None:
            start, end = int(match.group(2)), int(match.group(3) or match.group(2))
            if not low <= start <= end <= high:
                return False
    return True


@pytest.mark.parametrize("schedule, valid", [
    ("30 2 * * *", True), ("*/15 0-6,22,23 * * 1-5", True), ("0 0 1 1 0", True),
    ("30 2 * *", False), ("60 2 * * *", False), ("0 24 * * *", False), ("*/0 * * * *", False),
    ("5-1 * * * *", False), ("@daily", False)])
def test_cron_field_check(schedule, valid):
    assert _valid_cron(schedule) is valid


def _valid_cron(schedule: str) -> bool:
    fields = schedule.split()
    return len(fields) == 5 and all(_valid_cron_field(f, *r) for f, r in zip(fields, CRON_RANGES))


@pytest.mark.parametrize("view", VIEWS)
def test_index_cronjob_is_a_valid_nightly_build_index(view):
    docs = _docs(view)
    cron = _one(docs, "CronJob", "build-index")
    assert _valid_cron(cron["spec"]["schedule"]), cron["spec"]["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = _pod_spec(cron)["containers"]
    args = container["args"]
    assert args[0] == "build-index"
    deployment = _one(docs, "Deployment", "retrieval")
    [serving] = _pod_spec(deployment)["containers"]
    # it indexes a model of the store the service reads, into the index store it watches
    assert _arg(args, "--model") == _arg(serving["args"], "--model") + "/$(MODEL_VERSION)"
    assert _arg(args, "--out") == _arg(serving["args"], "--index")
    # it notifies the Redis the service reads, the password from the Secret, not the URL
    assert _arg(args, "--notify-redis") == _arg(serving["args"], "--redis-url")
    assert _arg(args, "--redis-password-env") == "REDIS_PASSWORD"
    assert not any("$(REDIS_PASSWORD)" in str(e.get("value", "")) for e in container["env"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/artifacts"].get("readOnly"), "build-index writes the store"


def test_distributed_training_workers_match_tf_config(monkeypatch):
    docs = _load(K8S / "jobs" / "train-distributed.yaml")
    job = _one(docs, "Job", "train-distributed")
    headless = _one(docs, "Service", "train-workers")
    spec, pod = job["spec"], _pod_spec(job)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    assert pod["subdomain"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    hosts = env["TRAIN_WORKER_HOSTS"].split(",")
    assert len(hosts) == spec["completions"], "one TF_CONFIG cluster entry per worker"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["tf-worker"]
    name, subdomain = job["metadata"]["name"], pod["subdomain"]
    assert hosts == [f"{name}-{i}.{subdomain}:{port}" for i in range(len(hosts))]

    from training.distributed import worker_role

    for index in range(spec["completions"]):  # what the entrypoint composes, as training reads it
        done = _run_entrypoint(["train"], TRAIN_WORKER_HOSTS=env["TRAIN_WORKER_HOSTS"],
                               JOB_COMPLETION_INDEX=str(index))
        monkeypatch.setenv("TF_CONFIG", done.env["TF_CONFIG"])
        role = worker_role()
        assert (role.num_workers, role.index) == (spec["completions"], index)


def test_secrets_in_the_repository_are_placeholders():
    for path in K8S.rglob("*.yaml"):
        for doc in _load(path):
            if doc["kind"] == "Secret":
                for key, value in {**doc.get("stringData", {}), **doc.get("data", {})}.items():
                    assert re.search("placeholder|REPLACE", value), f"{path}: {key}"
    # production's Secret is created out of band: an apply must never overwrite it
    overlay = K8S / "overlays" / "production"
    for resource in yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"]:
        if (overlay / resource).is_file():
            assert all(d["kind"] != "Secret" for d in _load(overlay / resource)), resource
    if _kustomize_command():
        assert all(d["kind"] != "Secret" for d in _render("overlays/production"))


def test_redis_is_in_cluster_for_trials_and_managed_in_production():
    trial = _render("overlays/trial")
    assert _one(trial, "StatefulSet", "redis")["spec"]["replicas"] == 1
    host = _one(trial, "ConfigMap", "two-tower-config")["data"]["REDIS_HOST"]
    _one(trial, "Service", host)
    production = _render("overlays/production")
    assert _one(production, "Service", "redis")["spec"]["type"] == "ExternalName"
    assert not [d for d in production if d["kind"] == "StatefulSet"]
    assert _one(production, "ConfigMap", "two-tower-config")["data"]["REDIS_SCHEME"] == "rediss"


def test_artifact_store_is_a_shared_volume():
    [pvc] = _load(K8S / "base" / "artifacts-pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc, container in _ours(_source_docs()):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in _pod_spec(doc)["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/artifacts"]] == pvc["metadata"]["name"], doc["metadata"]["name"]


# --- Dockerfile and .dockerignore -------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def _dockerfile_args() -> dict[str, str]:
    args = [rest for kind, rest in _instructions() if kind == "ARG" and "=" in rest]
    return dict(rest.split("=", 1) for rest in args)


def _stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions, those of the stage it is built FROM included."""
    instructions = _instructions()
    starts = [i for i, (kind, _) in enumerate(instructions) if kind == "FROM"] + [None]
    stages: dict[str, list[tuple[str, str]]] = {}
    for start, end in zip(starts, starts[1:]):
        base, _, name = instructions[start][1].partition(" AS ")
        stages[name.strip()] = stages.get(base.strip(), [])[1:] + instructions[start:end]
    return stages


def _final_stage() -> list[tuple[str, str]]:
    """The default target (the last stage), with what it inherits from its base stage."""
    return list(_stages().values())[-1]


def _ignored(path: str) -> bool:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*") \
            .replace(r"\?", "[^/]").replace(r"\[", "[").replace(r"\]", "]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            return True
    return False


def test_serving_image_has_no_tensorflow_and_the_jobs_image_has_it():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = lambda reqs: {re.split(r"[=<>\[ ]", r)[0] for r in reqs}  # noqa: E731
    heavy = {"tensorflow", "tf-keras", "tensorflow-recommenders"}
    assert not heavy & names(project["dependencies"] + extras["serve"])
    assert heavy <= names(extras["train"]) and "two-tower-retrieval[serve]" in extras["train"]
    stages = _stages()
    assert list(stages)[-1] == "serve", "serve is the default target"
    copied = lambda stage: [r for k, r in stages[stage] if k == "COPY" and "--from=" in r]  # noqa: E731
    assert [r.split()[0] for r in copied("serve")] == ["--from=build"]
    assert [r.split()[0] for r in copied("train")] == ["--from=build-train"]
    runs = lambda stage: " ".join(r for k, r in stages[stage] if k == "RUN")  # noqa: E731
    assert "['train']" not in runs("build") and "x['serve']" in runs("build")
    assert "['train']" in runs("build-train")


def test_dockerfile_is_multi_stage_on_slim_python_311():
    froms = [rest for kind, rest in _instructions() if kind == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper()
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", _dockerfile_args()["PYTHON_IMAGE"])


def test_every_copy_source_exists_and_is_not_dockerignored():
    copies = [rest for kind, rest in _instructions() if kind == "COPY"]
    sources = []
    for rest in copies:
        words = shlex.split(rest)
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    assert {"pyproject.toml", "proto", "retrieval", "deploy/entrypoint.sh",
            "deploy/grpc_health_check.py"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out_and_stubs_generated():
    for path in (".venv/bin/python", "artifacts/models", "demo-run/data", ".pytest_cache/x",
                 ".git/HEAD", "retrieval/v1/retrieval_pb2.py", "retrieval/v1/retrieval_pb2_grpc.py",
                 "retrieval/__pycache__/cli.cpython-311.pyc", "tests/test_deploy.py"):
        assert _ignored(path), path
    for path in ("app/cli.py", "retrieval/v1/__init__.py", "pyproject.toml",
                 "proto/retrieval/v1/retrieval.proto", "deploy/entrypoint.sh"):
        assert not _ignored(path), path


def test_protoc_command_is_the_makefiles_proto_target():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    [target] = re.findall(r"^proto:.*\n\t(.*)$", makefile, re.MULTILINE)
    expected = target.replace("$(BIN)/python", "python").split()
    runs = [rest for kind, rest in _instructions() if kind == "RUN" and "grpc_tools.protoc" in rest]
    assert len(runs) == 1
    command = runs[0].split("&&")[0].split()
    assert command == expected
    assert "pip install --no-deps ." in runs[0]  # the stubs go into the installed package


def _build_context(into: Path) -> None:
    """The files the build stage's COPY lines take from the context, less .dockerignore."""
    instructions = _instructions()
    starts = [i for i, (kind, _) in enumerate(instructions) if kind == "FROM"]
    stage = instructions[starts[0]:starts[1]]
    for rest in (r for kind, r in stage if kind == "COPY"):
        for source in shlex.split(rest)[:-1]:
            root = ROOT / source
            for path in [root] if root.is_file() else root.rglob("*"):
                relative = path.relative_to(ROOT).as_posix()
                if path.is_file() and not _ignored(relative):
                    (into / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, into / relative)


@pytest.mark.slow
def test_build_stage_replayed_without_docker_packages_freshly_generated_stubs(tmp_path):
    _build_context(tmp_path)
    assert not list((tmp_path / "retrieval" / "v1").glob("*_pb2*")), "stubs must be generated"
    [run] = [rest for kind, rest in _instructions() if kind == "RUN" and "protoc" in rest]
    protoc = run.split("&&")[0].split()
    subprocess.run([sys.executable, *protoc[1:]], cwd=tmp_path, check=True, timeout=120)
    # `pip install --no-deps .` of the Dockerfile, as a wheel (offline: no build isolation)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), "."], cwd=tmp_path, check=True,
                   timeout=300, capture_output=True)
    import zipfile

    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("retrieval_pb2.py", "retrieval_pb2_grpc.py", "retrieval_pb2.pyi"):
            packaged = archive.read(f"retrieval/v1/{name}")
            assert packaged == (ROOT / "retrieval" / "v1" / name).read_bytes(), name
        assert "app/cli.py" in archive.namelist()


def test_final_stage_is_non_root_with_probe_entrypoint_and_serve():
    stage = _final_stage()
    args = _dockerfile_args()
    [user] = [rest for kind, rest in stage if kind == "USER"][-1:]
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user).split(":")[0]
    assert uid not in ("root", "0") and int(uid) > 0
    [healthcheck] = [rest for kind, rest in stage if kind == "HEALTHCHECK"]
    probe_cmd = json.loads(healthcheck.split("CMD", 1)[1])
    copied = {shlex.split(rest)[-1]: shlex.split(rest)[-2] for kind, rest in stage
              if kind == "COPY" and "--from" not in rest}
    assert copied[probe_cmd[-1]] == "deploy/grpc_health_check.py"
    [entrypoint] = [json.loads(rest) for kind, rest in stage if kind == "ENTRYPOINT"]
    assert copied[entrypoint[0]] == "deploy/entrypoint.sh"
    assert ENTRYPOINT.read_text().rstrip().endswith('exec two-tower "$@"')
    assert [json.loads(rest) for kind, rest in stage if kind == "CMD"] == [["serve"]]
    env = " ".join(rest for kind, rest in stage if kind == "ENV")
    expose = {int(p) for kind, rest in stage if kind == "EXPOSE" for p in rest.split()}
    assert expose == {int(re.search(r"GRPC_PORT=(\d+)", env)[1]),
                      int(re.search(r"METRICS_PORT=(\d+)", env)[1])}


# --- the entrypoint script --------------------------------------------------------------------


class _Run:
    def __init__(self, done: subprocess.CompletedProcess):
        self.returncode, self.stderr = done.returncode, done.stderr
        lines = done.stdout.splitlines()
        self.argv = lines[:-1] if lines else []
        self.env = json.loads(lines[-1]) if lines else {}


def _run_entrypoint(argv: list[str], tmp: Path | None = None, **env: str) -> _Run:
    """Run deploy/entrypoint.sh with a stand-in `two-tower` printing its argv and TF_CONFIG."""
    if tmp is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fake-two-tower-") as fake:
            return _run_entrypoint(argv, Path(fake), **env)
    stand_in = tmp / "two-tower"
    stand_in.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n"
                        "exec python -c 'import json,os; print(json.dumps("
                        "{\"TF_CONFIG\": os.environ.get(\"TF_CONFIG\")}))'\n")
    stand_in.chmod(0o755)
    path = f"{tmp}:{Path(sys.executable).parent}:/usr/bin:/bin"  # python: as in the image
    done = subprocess.run(["sh", str(ENTRYPOINT), *argv], env={"PATH": path, **env}, check=False,
                          capture_output=True, text=True, timeout=30)
    return _Run(done)


def test_entrypoint_fills_serve_flags_from_the_environment(tmp_path):
    run = _run_entrypoint(["serve"], tmp_path, MODEL_VERSION="m-1", REDIS_URL="redis://r:6379/0")
    assert run.returncode == 0, run.stderr
    assert run.argv == ["serve", "--model", "/artifacts/models/m-1", "--index",
                        "/artifacts/indexes", "--host", "0.0.0.0", "--port", "50051",
                        "--metrics-port", "9090", "--redis-url", "redis://r:6379/0"]
    from app.cli import build_parser as _parser

    _parser().parse_args(run.argv)  # a command line the real CLI accepts


def test_entrypoint_keeps_given_flags_and_its_env_names_match_the_dockerfile(tmp_path):
    run = _run_entrypoint(["serve", "--port=6000", "--features", "/data"], tmp_path,
                          MODEL_DIR="/m", INDEX_DIR="/i", GRPC_PORT="7000", METRICS_PORT="",
                          REDIS_URL="redis://ignored")
    assert run.argv == ["serve", "--port=6000", "--features", "/data", "--model", "/m",
                        "--index", "/i", "--host", "0.0.0.0"]
    env = " ".join(rest for kind, rest in _final_stage() if kind == "ENV")
    for name in ("ARTIFACTS_DIR", "INDEX_DIR", "GRPC_HOST", "GRPC_PORT", "METRICS_PORT"):
        assert f"{name}=" in env and name in ENTRYPOINT.read_text(), name


def test_entrypoint_serves_the_stores_by_default(tmp_path):
    run = _run_entrypoint(["serve"], tmp_path, ARTIFACTS_DIR="/a", METRICS_PORT="")
    assert run.returncode == 0, run.stderr
    assert run.argv == ["serve", "--model", "/a/models", "--index", "/a/indexes", "--host",
                        "0.0.0.0", "--port", "50051"]


def test_entrypoint_passes_other_commands_through_and_composes_tf_config(tmp_path):
    run = _run_entrypoint(["train", "--data", "d d", "--out", "m"], tmp_path)
    assert run.argv == ["train", "--data", "d d", "--out", "m"] and run.env["TF_CONFIG"] is None
    run = _run_entrypoint(["train"], tmp_path, TRAIN_WORKER_HOSTS="a:1, b:1",
                          JOB_COMPLETION_INDEX="1")
    assert json.loads(run.env["TF_CONFIG"]) == {"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 1}}
    given = '{"cluster": {"worker": ["x:1"]}, "task": {"type": "worker", "index": 0}}'
    run = _run_entrypoint(["train"], tmp_path, TF_CONFIG=given, TRAIN_WORKER_HOSTS="a:1,b:1",
                          JOB_COMPLETION_INDEX="1")
    assert run.env["TF_CONFIG"] == given
    for index in ("2", "x", ""):
        run = _run_entrypoint(["train"], tmp_path, TRAIN_WORKER_HOSTS="a:1,b:1",
                              JOB_COMPLETION_INDEX=index)
        assert run.returncode == 64 and run.argv == [], index
    assert "in [0, 2)" in _run_entrypoint(["train"], tmp_path, TRAIN_WORKER_HOSTS="a:1,b:1",
                                          TRAIN_WORKER_INDEX="2").stderr


# --- the health probe script against real servers ---------------------------------------------


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True,
                          check=False,
                          timeout=30)


@pytest.mark.slow
def test_probe_exits_0_when_the_served_server_is_serving(server):
    for service in ("", SERVICE):
        done = _probe("--address", server.address, "--service", service)
        assert done.returncode == 0, done.stderr
    done = _probe("--address", server.address, "--service", "no.such.Service")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr


def test_probe_exits_1_while_the_server_is_not_serving(tmp_path):
    from retrieval.server import ServerConfig, create_server

    async def scenario() -> tuple[int, str, int]:
        running = await create_server(ServerConfig(tmp_path / "model", tmp_path / "index", port=0))
        try:  # started, nothing loaded: NOT_SERVING, as while a pod loads its pair
            probe = await asyncio.create_subprocess_exec(
                sys.executable, str(PROBE), env={**os.environ, "GRPC_PORT": str(running.port)},
                stderr=asyncio.subprocess.PIPE)
            _, stderr = await probe.communicate()
            await running.health.set("", 1)  # SERVING
            again = await asyncio.create_subprocess_exec(
                sys.executable, str(PROBE), "--address", f"127.0.0.1:{running.port}")
            return probe.returncode, stderr.decode(), await again.wait()
        finally:
            await running.stop(0)

    code, stderr, serving_code = asyncio.run(scenario())
    assert code == 1 and "NOT_SERVING" in stderr
    assert serving_code == 0


def test_probe_exits_1_when_nothing_listens():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _probe("--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert done.returncode == 1 and ("UNAVAILABLE" in done.stderr or "DEADLINE" in done.stderr)
