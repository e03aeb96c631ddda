"""The Dockerfile and the Kubernetes/KServe manifests agree with the service: every flag and environment
variable they use exists, probes point at the open health routes, and ports match.  The Kubernetes
manifests validate against Kubernetes' own published schemas (one pinned version); the KServe one is
an InferenceService whose predictor is a valid pod spec; the Dockerfile builds, and its image serves
(where a Docker daemon runs)."""

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import uuid

import kubernetes_validate
import pytest
import requests
import yaml

import service
from support import ROOT, free_port, wait_until

FLAGS = {setting.flag for setting in service.SETTINGS}
VARIABLES = {setting.env for setting in service.SETTINGS}
KSERVE_VARIABLES = {"PROTOCOL"}     # KServe reads a custom predictor's protocol from its container's PROTOCOL
# The schemas kubernetes-validate (pinned in setup.cfg) bundles for this Kubernetes version; strict: a field
# the schema does not know is an error, as `kubectl apply` (server-side strict field validation) makes it.
KUBERNETES = "1.31.0"


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


def documents(name):
    return [doc for doc in yaml.safe_load_all(read("deploy", name)) if doc]


def containers(name):
    found = []
    for doc in documents(name):
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("predictor") or {}
        found += pod.get("containers", [])
    return found


def assert_arguments_are_settings(arguments):
    parsed = service.build_parser().parse_args(arguments)   # argparse exits on an unknown flag
    config = service.Config.load(vars(parsed), environ={})
    for argument in arguments:
        if argument.startswith("--"):
            assert argument in FLAGS, argument
    return config


def test_the_dockerfile_runs_the_console_script_with_real_settings():
    text = read("Dockerfile")
    argv = dockerfile_instruction("ENTRYPOINT") + dockerfile_instruction("CMD")
    assert argv[0] == "model-service"
    assert_arguments_are_settings(argv[1:])
    for variable in re.findall(r"(MODEL_SERVICE_[A-Z_]+)=", text):
        assert variable in VARIABLES, variable
    assert "EXPOSE 8080" in text and "MODEL_SERVICE_PORT=8080" in text
    assert re.search(r"^USER 10001$", text, re.M), "the service does not run as root"
    assert "/healthz" in text


@pytest.mark.parametrize("name", ["kubernetes.yaml", "kserve.yaml"])
def test_manifests_use_real_flags_variables_ports_and_open_probe_routes(name):
    found = containers(name)
    assert found
    for container in found:
        config = assert_arguments_are_settings(container.get("args", []))
        environment = {item["name"]: item["value"] for item in container.get("env", [])}
        for variable in environment:
            assert variable in VARIABLES or name == "kserve.yaml" and variable in KSERVE_VARIABLES, variable
        port = int(environment.get("MODEL_SERVICE_PORT", config.port))
        assert environment.get("MODEL_SERVICE_HOST") == "0.0.0.0", "reachable from the pod network"
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        if "h2c" in ports:              # KServe's one port, for gRPC: probed by TCP, as no HTTP answers there
            assert ports == {"h2c": config.grpc_port}
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe] == {"tcpSocket": {"port": config.grpc_port}}, probe
            continue
        assert list(ports.values()) == [port] + ([config.grpc_port] if config.grpc_port else [])
        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert path in {route.path for route in service.ROUTES if route.access == service.OPEN}, f"{probe} {path} must stay open when tokens are required"
        assert container["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/v2/health/ready")
        assert container["livenessProbe"]["httpGet"]["path"] in ("/healthz", "/v2/health/live")


def test_the_kubernetes_files_hold_what_the_readme_describes():
    kinds = [doc["kind"] for doc in documents("kubernetes.yaml")]
    assert kinds == ["Deployment", "Service"]
    deployment = documents("kubernetes.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    args = pod["containers"][0]["args"]
    timeout = float(args[args.index("--shutdown-timeout") + 1])
    assert grace > timeout + 5, "the pod is given time to drain before it is killed"
    assert pod["containers"][0]["volumeMounts"][0]["readOnly"] is True
    serving = documents("kserve.yaml")[0]
    container = serving["spec"]["predictor"]["containers"][0]
    assert serving["kind"] == "InferenceService" and {"name": "PROTOCOL", "value": "v2"} in container["env"]


# -- against the schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(documents("kubernetes.yaml"))))
def test_the_kubernetes_manifest_validates_against_kubernetes_schemas(index):
    document = documents("kubernetes.yaml")[index]
    assert kubernetes_validate.validate(document, KUBERNETES, strict=True) == "1.31"


def broken(document, path, value):
    """A deep copy of `document` with the value at `path` (keys and indexes) set; None deletes it."""
    document = copy.deepcopy(document)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return document


CONTAINER = ("spec", "template", "spec", "containers", 0)


@pytest.mark.parametrize("path, value, fragment", [
    (CONTAINER + ("ports", 0, "containerPort"), "8080", "is not of type 'integer'"),
    (CONTAINER + ("readinessProbe", "httpGet", "pth"), "/readyz", "'pth' was unexpected"),
    (CONTAINER + ("image",), 1, "is not of type 'string'"),
    (("spec", "selector"), None, "'selector' is a required property"),
], ids=["port-as-text", "misspelled-field", "image-not-text", "no-selector"])
def test_the_kubernetes_validation_catches_a_broken_deployment(path, value, fragment):
    """The check has teeth: each of these breaks the Deployment, and the pinned schemas say so."""
    with pytest.raises(kubernetes_validate.ValidationError) as error:
        kubernetes_validate.validate(broken(documents("kubernetes.yaml")[0], path, value), KUBERNETES, strict=True)
    assert fragment in error.value.message


# KServe's InferenceService (serving.kserve.io/v1beta1, pkg/apis/serving/v1beta1 in KServe's source): no pip
# package ships its schema, so its structure is checked here and the part that is Kubernetes' own, the
# predictor's inlined core/v1 PodSpec, against Kubernetes' schemas.  A predictor's own fields besides the
# PodSpec: its ComponentExtensionSpec, and the one-of runtime specs of which a custom predictor uses none.
KSERVE_EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy"}
KSERVE_RUNTIME_FIELDS = {"sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface", "pmml",
                         "lightgbm", "paddle", "model", "storageUris", "workerSpec"}
KSERVE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")     # KServe's InferenceService name rule


def check_inference_service(document):
    """Raise (AssertionError, or ValidationError for the pod spec) unless `document` is an InferenceService
    with a custom V2 predictor that KServe and Kubernetes would accept."""
    assert document["apiVersion"] == "serving.kserve.io/v1beta1" and document["kind"] == "InferenceService"
    assert set(document) <= {"apiVersion", "kind", "metadata", "spec"}
    assert KSERVE_NAME.fullmatch(document["metadata"]["name"]), "KServe's name rule"
    assert set(document["spec"]) <= {"predictor", "transformer", "explainer"} and "predictor" in document["spec"]
    predictor = document["spec"]["predictor"]
    assert not set(predictor) & KSERVE_RUNTIME_FIELDS, "a custom predictor: containers, no runtime spec"
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_EXTENSION_FIELDS}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": document["metadata"],
                                  "spec": pod_spec}, KUBERNETES, strict=True)
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container", "KServe finds the predictor by this name"
    protocol = [item["value"] for item in container.get("env", []) if item["name"] == "PROTOCOL"]
    grpc = any(port.get("name") == "h2c" for port in container["ports"])
    assert protocol == (["grpc-v2"] if grpc else ["v2"]), "a custom predictor declares its protocol in PROTOCOL"


@pytest.mark.parametrize("index", range(len(documents("kserve.yaml"))))
def test_the_kserve_manifest_is_an_inference_service_whose_predictor_is_a_valid_pod_spec(index):
    check_inference_service(documents("kserve.yaml")[index])


PREDICTOR = ("spec", "predictor")


@pytest.mark.parametrize("path, value", [
    (PREDICTOR + ("protocolVersion",), "v2"),                       # a runtime spec's field, not a predictor's
    (PREDICTOR + ("containers", 0, "ports", 0, "containerPort"), "8080"),
    (PREDICTOR + ("containers", 0, "name"), "model-service"),
    (PREDICTOR + ("containers", 0, "env", 0, "value"), "v3"),
    (PREDICTOR + ("sklearn",), {"storageUri": "pvc://models/iris"}),
    (("metadata", "name"), "Iris_1"),
    (("apiVersion",), "serving.kubeflow.org/v1alpha2"),
], ids=["protocolVersion", "port-as-text", "container-name", "protocol-v3", "runtime-spec", "name", "api"])
def test_the_kserve_check_catches_a_broken_inference_service(path, value):
    with pytest.raises((AssertionError, kubernetes_validate.ValidationError)):
        check_inference_service(broken(documents("kserve.yaml")[0], path, value))


# -- the image ------------------------------------------------------------------------------------------------
# Built and run with podman, from a base image made here: no registry is reachable from these machines, so
# the Dockerfile's default base (python:3.11-slim) cannot be pulled, and its BASE_IMAGE argument is pointed at
# a Debian root file system that mmdebstrap makes from this machine's own package mirror (python3, its venv
# module, and this machine's CA certificates, so that pip inside the build reaches the package index as the
# host's pip does).  The runtime is runc, with explicit ulimits: this sandbox refuses crun's defaults and the
# runtimes' own (1,048,576 open files).  Each container then runs a manifest's own command, resolved the way
# Kubernetes resolves it: the container's `command` (else the image's ENTRYPOINT), then its `args` (else, only
# when it has no `command`, the image's CMD).

PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
BASE_IMAGE = "localhost/model-service-test-base:latest"
SERVICE_USER = "10001"


def kubernetes_argv(container, entrypoint, cmd):
    """The argv Kubernetes runs for `container` of an image with this ENTRYPOINT and CMD."""
    if "command" in container:
        return list(container["command"]) + list(container.get("args", []))
    return list(entrypoint or []) + list(container["args"] if "args" in container else cmd or [])


def dockerfile_instruction(name):
    """A JSON-form instruction of the Dockerfile (ENTRYPOINT, CMD) as a list."""
    found = re.search(rf"^{name} (\[.*\])$", read("Dockerfile"), re.M)
    return yaml.safe_load(found.group(1)) if found else None


@pytest.mark.parametrize("name", ["kubernetes.yaml", "kserve.yaml"])
def test_each_manifest_runs_model_service_with_its_own_flags(name):
    """Kubernetes' `args` replace the image's CMD, not its ENTRYPOINT: the command stays model-service, and every
    argument after it is a flag of the service."""
    for container in containers(name):
        argv = kubernetes_argv(container, dockerfile_instruction("ENTRYPOINT"), dockerfile_instruction("CMD"))
        assert argv[0] == "model-service", argv
        assert_arguments_are_settings(argv[1:])


def test_the_kubernetes_rule_is_the_one_that_broke_a_cmd_only_image():
    """The resolution above, checked on the case it exists for: an image with only a CMD and a manifest with
    `args` would run the first flag as the program."""
    container = {"args": ["--preload"]}
    assert kubernetes_argv(container, None, ["model-service", "--preload"]) == ["--preload"]
    assert kubernetes_argv(container, ["model-service"], ["--x"]) == ["model-service", "--preload"]
    assert kubernetes_argv({"command": ["sh"], "args": ["-c"]}, ["model-service"], ["--x"]) == ["sh", "-c"]
    assert kubernetes_argv({}, ["model-service"], ["--x"]) == ["model-service", "--x"]


def podman(*arguments, timeout=600, check=True):
    done = subprocess.run([*PODMAN, *arguments], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(arguments[:3])}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def container_tools():
    """None when podman and mmdebstrap can build and run the image here, else why not."""
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc mmdebstrap; .ci/run does)"
    release = dict(line.split("=", 1) for line in read_os_release().splitlines() if "=" in line)
    if release.get("ID") != "debian":
        return "the base image is made from this machine's Debian mirror; this is not Debian"
    return None


def read_os_release():
    with open("/etc/os-release", encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The Dockerfile, unchanged, built on a Debian base made here; its tag."""
    reason = container_tools()
    if reason:
        pytest.skip(reason)
    release = dict(line.split("=", 1) for line in read_os_release().splitlines() if "=" in line)
    rootfs = tmp_path_factory.mktemp("base") / "rootfs.tar"
    made = subprocess.run(
        ["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "--customize-hook=copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/",
         "--customize-hook=printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > \"$1/etc/pip.conf\"",
         release["VERSION_CODENAME"].strip('"'), str(rootfs)],
        capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    podman("import", str(rootfs), BASE_IMAGE)
    tag = f"localhost/model-service:test-{uuid.uuid4().hex[:12]}"
    podman("build", "--format", "docker", *ULIMITS, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, ROOT,
           timeout=1800)
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)
        podman("rmi", "-f", BASE_IMAGE, check=False)


def image_config(tag):
    return json.loads(podman("image", "inspect", tag).stdout)[0]["Config"]


@contextlib.contextmanager
def manifest_container(tag, container, *options):
    """Run `container` (a manifest's) in the image with its env, its command resolved as Kubernetes does, and
    its HTTP port (8080) and declared ports published on free ones; yields (name, HTTP base URL, {container
    port: the address it is published on})."""
    config = image_config(tag)
    argv = kubernetes_argv(container, config.get("Entrypoint"), config.get("Cmd"))
    environment = [f"--env={item['name']}={item['value']}" for item in container.get("env", [])]
    published = {port: f"127.0.0.1:{free_port()}" for port in {8080} | {p["containerPort"] for p in container["ports"]}}
    name = f"model-service-test-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, *ULIMITS, *environment, *options,
           *(f"--publish={address}:{port}" for port, address in published.items()),
           "--entrypoint", json.dumps(argv[:1]), tag, *argv[1:])
    try:
        yield name, f"http://{published[8080]}", published
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def answers(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def served_version(base, model):
    return requests.get(f"{base}/models/{model}", timeout=5).json().get("latest_version")


@pytest.mark.slow
def test_the_kubernetes_deployment_serves_swaps_and_drains_in_the_image(image, tmp_path):
    """The Deployment's container, as Kubernetes would run it (its command and args, env, a read-only root file
    system, the store mounted read-only): ready, a prediction, a new version published into the store taken up
    without a restart, its HEALTHCHECK healthy as the unprivileged user, and SIGTERM drained to exit code 0."""
    store = tmp_path / "models"
    shutil.copytree(os.path.join(ROOT, "model_store"), store)
    for folder, _, files in os.walk(store):
        os.chmod(folder, 0o755)
        for file in files:
            os.chmod(os.path.join(folder, file), 0o644)
    (container,) = containers("kubernetes.yaml")
    mount = container["volumeMounts"][0]["mountPath"]
    with manifest_container(image, container, "--read-only", "-v", f"{store}:{mount}:ro") as (name, base, _):
        wait_until(lambda: answers(base + "/readyz"), timeout=120, what="the container's readiness")
        answer = requests.post(base + "/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"] == ["setosa"], answer.text
        assert podman("exec", name, "id", "-u").stdout.strip() == SERVICE_USER
        assert podman("healthcheck", "run", name, check=False).returncode == 0, "the image's HEALTHCHECK"

        published = store / "iris" / "3" / "model.joblib"          # as README publishes: write, then rename
        published.parent.mkdir(mode=0o755)
        shutil.copy(store / "iris" / "2" / "model.joblib", f"{published}.tmp")
        os.chmod(f"{published}.tmp", 0o644)
        os.rename(f"{published}.tmp", published)
        wait_until(lambda: served_version(base, "iris") == "3", timeout=60, what="version 3 served")
        answer = requests.post(base + "/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["version"] == "3", answer.text

        stopped = podman("stop", "-t", "30", name, timeout=60)
        assert stopped.returncode == 0
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert state == "0", podman("logs", name).stderr[-3000:]


@pytest.mark.slow
def test_the_kserve_inference_service_answers_v2_in_the_image(image):
    """The InferenceService's container with its command and args, on the image's bundled store: KServe's probes
    and a V2 inference on the model it preloads."""
    (container,) = documents("kserve.yaml")[0]["spec"]["predictor"]["containers"]
    with manifest_container(image, container) as (name, base, _):
        wait_until(lambda: answers(base + container["readinessProbe"]["httpGet"]["path"]), timeout=120,
                   what="KServe's readiness probe")
        assert answers(base + container["livenessProbe"]["httpGet"]["path"])
        body = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
        answer = requests.post(base + "/v2/models/iris/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == ["setosa"]


@pytest.mark.slow
def test_the_kserve_grpc_inference_service_answers_over_its_h2c_port_in_the_image(image):
    """The gRPC InferenceService's container, as KServe runs it: tritonclient.grpc on its h2c port."""
    import numpy as np
    import tritonclient.grpc as triton

    (container,) = documents("kserve.yaml")[1]["spec"]["predictor"]["containers"]
    (h2c,) = container["ports"]
    with manifest_container(image, container) as (name, base, published):
        client = triton.InferenceServerClient(published[h2c["containerPort"]])

        def ready():
            try:
                return client.is_model_ready("iris")
            except Exception:  # not listening yet
                return False
        wait_until(ready, timeout=120, what="the model over gRPC")
        rows = triton.InferInput("input-0", [1, 4], "FP64")
        rows.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]]))
        assert client.infer("iris", [rows]).as_numpy("predict").tolist() == [b"setosa"]
