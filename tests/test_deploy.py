"""The Dockerfile and the Kubernetes/KServe manifests agree with the service: every flag and environment
variable they use exists, probes point at the open health routes, and ports match."""

import os
import re

import pytest
import yaml

import service
from conftest import ROOT

FLAGS = {setting.flag for setting in service.SETTINGS}
VARIABLES = {setting.env for setting in service.SETTINGS}


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
            assert variable in VARIABLES, variable
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
    assert serving["kind"] == "InferenceService" and serving["spec"]["predictor"]["protocolVersion"] == "v2"
