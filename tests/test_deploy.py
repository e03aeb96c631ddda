"""The Dockerfile and the Kubernetes/KServe manifests agree with the service: every flag and environment
variable they use exists, probes point at the open health routes, and ports match.  The Kubernetes
manifests validate against Kubernetes' own published schemas (one pinned version); the KServe one is
an InferenceService whose predictor is a valid pod spec; the Dockerfile builds, and its image serves
(where a Docker daemon runs)."""

import copy
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
    command = re.search(r'^CMD (\[.*\])$', text, re.M).group(1)
    argv = yaml.safe_load(command)
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
        assert [p["containerPort"] for p in container["ports"]] == [port]
        for probe in ("readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert path in service.OPEN_PATHS, f"{probe} {path} must stay open when tokens are required"
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
    assert protocol == ["v2"], "a custom predictor declares its protocol in PROTOCOL: v1 or v2"


def test_the_kserve_manifest_is_an_inference_service_whose_predictor_is_a_valid_pod_spec():
    (document,) = documents("kserve.yaml")
    check_inference_service(document)


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

def docker_daemon():
    """None when a Docker daemon answers, else why the image cannot be built here."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "no Docker daemon runs here (docker info: " + (info.stderr.strip().splitlines() or ["?"])[-1] + ")"
    return None


@pytest.mark.slow
def test_the_dockerfile_builds_an_image_that_serves_the_bundled_store():
    """docker build, then docker run: the image's own store answers /readyz and a prediction."""
    reason = docker_daemon()
    if reason:
        pytest.skip(reason)
    tag = f"model-service:test-{uuid.uuid4().hex[:12]}"
    build = subprocess.run(["docker", "build", "-t", tag, ROOT], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    port, name = free_port(), tag.replace(":", "-")
    try:
        run = subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8080", tag],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        base = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return requests.get(base + "/readyz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=120, what="the container's readiness")
        answer = requests.post(base + "/models/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"] == ["setosa"], answer.text
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
