"""The Open Inference Protocol over gRPC (Protocols: OpenInferenceGrpc; Serving: start_grpc_server, grpc_call),
driven with the real tritonclient.grpc client against live servers, and with plain gRPC stubs (the client's
own generated messages, sent through its channel) for typed contents and the edge cases."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas
import pytest
import requests
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

import service
from doubles import SlowModel
from support import (ROOT, ROWS, LiveServer, collector, exported_spans, free_port, metric_value, versioned_store,
                     wait_until, write_artifact)

@pytest.fixture(scope="module")
def store(tmp_path_factory, iris_classifier, named_iris_classifier):
    root = tmp_path_factory.mktemp("store")
    write_artifact(root / "iris.joblib", iris_classifier, "joblib")
    write_artifact(root / "named.joblib", named_iris_classifier, "joblib")
    write_artifact(root / "slow.pkl", SlowModel(1.5), "pickle")
    return root


@pytest.fixture(scope="module")
def grpc_server(store):
    """(HTTP base URL, gRPC address) of one `python service.py --grpc-port` on the module's store."""
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "service.py", "--store", str(store), "--port", str(port), "--grpc-port", str(grpc_port),
               "--max-body-bytes", "200000", "--admin-token", "admin-token-0123456789", "--poll-interval", "0"]
    with LiveServer(command, port) as server:
        yield server.base, f"127.0.0.1:{grpc_port}"


def rows_input(rows, datatype="FP64", name="input-0"):
    tensor = triton.InferInput(name, list(np.shape(rows)), datatype)
    tensor.set_data_from_numpy(np.asarray(rows, dtype=service.V2_DTYPES[datatype]))
    return tensor


def test_health_metadata_and_the_repository_answer_as_triton_clients_expect(grpc_server):
    client = triton.InferenceServerClient(grpc_server[1])
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "model-service" and list(metadata.extensions) == ["model_repository"]
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    model = client.get_model_metadata("named")
    assert model.platform == "sklearn" and list(model.versions) == ["1"]
    assert [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in model.inputs][0] == \
        ("sepal_length", "FP64", [-1])
    assert [tensor.name for tensor in model.outputs][:2] == ["predict", "predict_proba"]
    index = {(entry.name, entry.version) for entry in client.get_model_repository_index().models}
    assert {("iris", "1"), ("named", "1"), ("slow", "1")} <= index


@pytest.mark.parametrize("datatype", ["FP64", "FP32", "INT64"])
def test_raw_tensors_of_each_numeric_datatype_answer_bit_for_bit(grpc_server, iris_classifier, datatype):
    client = triton.InferenceServerClient(grpc_server[1])
    rows = np.asarray(ROWS, dtype=service.V2_DTYPES[datatype]) if datatype != "INT64" else np.array([[5, 3, 1, 0]])
    result = client.infer("iris", [rows_input(rows, datatype)], request_id="42",
                          outputs=[triton.InferRequestedOutput("predict"), triton.InferRequestedOutput("predict_proba")])
    expected = iris_classifier.predict_proba(rows.astype(np.float64))
    assert result.as_numpy("predict_proba").tobytes() == expected.tobytes()
    assert result.as_numpy("predict").tolist() == iris_classifier.predict(rows.astype(np.float64)).tolist()
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("iris", "1", "42")
    assert len(response.raw_output_contents) == 2, "raw inputs are answered with raw outputs"


def test_the_explain_parameter_answers_the_explanation_as_over_http(grpc_server, iris_classifier):
    """parameters["explain"] (a bool_param, as tritonclient sends True) adds the "explain" output: one BYTES
    element, the explanation's JSON, equal to the HTTP route's; any other kind of parameter is refused."""
    client = triton.InferenceServerClient(grpc_server[1])
    result = client.infer("iris", [rows_input(ROWS)], parameters={"explain": True})
    assert result.as_numpy("predict").tolist() == iris_classifier.predict(np.array(ROWS)).tolist()
    response = result.get_response()
    assert [output.name for output in response.outputs] == ["predict", "explain"]
    assert response.outputs[1].parameters["content_type"].string_param == "str"
    explanations = json.loads(result.as_numpy("explain")[0])
    over_http = requests.post(f"{grpc_server[0]}/models/iris/explain", json={"instances": ROWS}, timeout=30).json()
    assert explanations == over_http["explanations"]
    with pytest.raises(InferenceServerException, match=r'parameters\["explain"\] must be a bool_param') as refused:
        client.infer("iris", [rows_input(ROWS)], parameters={"explain": "yes"})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


def typed_request(model, rows, datatype="FP64", field="fp64_contents", **options):
    request = service_pb2.ModelInferRequest(model_name=model, **options)
    tensor = request.inputs.add(name="input-0", datatype=datatype, shape=list(np.shape(rows)))
    getattr(tensor.contents, field).extend(np.ravel(rows).tolist())
    return request


def test_typed_contents_and_named_bytes_inputs_answer_with_typed_contents(grpc_server, iris_classifier,
                                                                          named_iris_classifier):
    client = triton.InferenceServerClient(grpc_server[1])
    request = typed_request("iris", ROWS)
    request.outputs.add(name="predict_proba")
    response = client._client_stub.ModelInfer(request)
    assert not response.raw_output_contents
    (output,) = response.outputs
    assert (output.datatype, list(output.shape)) == ("FP64", [3, 3])
    assert np.array(output.contents.fp64_contents).tobytes() == iris_classifier.predict_proba(np.array(ROWS)).tobytes()
    # one BYTES tensor per named feature, text cells under the same rules as JSON rows
    named = service_pb2.ModelInferRequest(model_name="named")
    for column, values in zip(named_iris_classifier.feature_names_in_, np.array(ROWS).T):
        named.inputs.add(name=column, datatype="FP64", shape=[3]).contents.fp64_contents.extend(values.tolist())
    labels = client._client_stub.ModelInfer(named).outputs[0]
    assert labels.datatype == "BYTES"
    frame = pandas.DataFrame(ROWS, columns=named_iris_classifier.feature_names_in_)
    assert [item.decode() for item in labels.contents.bytes_contents] == named_iris_classifier.predict(frame).tolist()


@pytest.mark.parametrize("request_, code, fragment", [
    (typed_request("nosuch", ROWS), "NOT_FOUND", "model 'nosuch' not found"),
    (typed_request("iris", ROWS, model_version="x"), "INVALID_ARGUMENT", "invalid version"),
    (typed_request("iris", [[1.0, 2.0]]), "INVALID_ARGUMENT", "must have shape [rows, 4], not [1, 2]"),
    (typed_request("iris", ROWS[0]), "INVALID_ARGUMENT", "shape"),
    (typed_request("iris", [[1, 2, 3, 4]], "INT8", "int_contents"), "OK", None),
    (typed_request("iris", [[1, 2, 3, 400]], "INT8", "int_contents"), "INVALID_ARGUMENT", "does not fit datatype INT8"),
    (typed_request("iris", [[1.0, 2.0, 3.0, 4.0]], "BF16", "fp32_contents"), "INVALID_ARGUMENT", "BF16"),
    (typed_request("iris", [[1.0, 2.0, 3.0, 4.0]], "FP16", "fp32_contents"), "INVALID_ARGUMENT", "raw_input_contents"),
    (service_pb2.ModelInferRequest(model_name="iris"), "INVALID_ARGUMENT", "needs inputs"),
], ids=["unknown-model", "bad-version", "width", "shape", "int8", "int8-overflow", "bf16", "fp16-typed", "no-inputs"])
def test_bad_requests_are_refused_with_the_grpc_status_of_their_http_one(grpc_server, request_, code, fragment):
    client = triton.InferenceServerClient(grpc_server[1])
    if code == "OK":
        assert client._client_stub.ModelInfer(request_).outputs[0].name == "predict"
        return
    with pytest.raises(Exception) as refused:
        client._client_stub.ModelInfer(request_)
    assert refused.value.code().name == code and fragment in refused.value.details(), refused.value.details()


def test_raw_contents_that_do_not_fill_their_shape_are_refused(grpc_server):
    client = triton.InferenceServerClient(grpc_server[1])
    request = service_pb2.ModelInferRequest(model_name="iris", raw_input_contents=[b"\0" * 24])
    request.inputs.add(name="input-0", datatype="FP64", shape=[1, 4])
    with pytest.raises(Exception) as refused:
        client._client_stub.ModelInfer(request)
    assert refused.value.code().name == "INVALID_ARGUMENT" and "24 bytes do not hold 4 values" in refused.value.details()


def test_a_message_over_max_body_bytes_is_resource_exhausted_and_the_server_carries_on(grpc_server):
    client = triton.InferenceServerClient(grpc_server[1])
    with pytest.raises(InferenceServerException) as refused:
        client.infer("iris", [rows_input(np.zeros((10_000, 4)))])
    assert "RESOURCE_EXHAUSTED" in str(refused.value)
    assert client.is_server_live()


def test_the_repository_load_and_unload_need_the_admin_token_and_load_only_from_the_store(grpc_server):
    client = triton.InferenceServerClient(grpc_server[1])
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        client.load_model("iris")
    admin = {"authorization": "Bearer admin-token-0123456789"}
    client.unload_model("iris", headers=admin)
    client.load_model("iris", headers=admin)
    assert client.is_model_ready("iris")
    with pytest.raises(InferenceServerException, match="only from the model store"):
        client.load_model("iris", headers=admin, config='{"backend": "python"}')


def test_a_client_deadline_is_honoured_and_a_cancelled_call_leaves_the_server_as_it_was(grpc_server):
    base, address = grpc_server
    client = triton.InferenceServerClient(address)
    client.infer("slow", [rows_input(ROWS)])                              # loaded
    began = time.perf_counter()
    with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED"):
        client.infer("slow", [rows_input(ROWS)], client_timeout=0.3)
    assert time.perf_counter() - began < 1.0, "answered at the deadline, not when the work ended"
    call = client._client_stub.ModelInfer.future(typed_request("slow", ROWS))
    time.sleep(0.2)
    assert call.cancel()
    wait_until(lambda: metric_value(requests.get(base + "/metrics", timeout=5).text,
                                    "model_service_requests_in_flight") == 0, timeout=10,
               what="the cancelled call's prediction to end")
    assert client.infer("iris", [rows_input(ROWS)]).as_numpy("predict").shape == (3,)


def test_grpc_requests_are_counted_by_protocol_in_the_same_metrics(grpc_server):
    base, address = grpc_server
    client = triton.InferenceServerClient(address)
    before = metric_value(requests.get(base + "/metrics", timeout=5).text, "model_service_requests_total",
                          model="iris", version="1", method="predict", protocol="grpc", status="200") or 0
    for _ in range(3):
        client.infer("iris", [rows_input(ROWS)])
    after = metric_value(requests.get(base + "/metrics", timeout=5).text, "model_service_requests_total",
                         model="iris", version="1", method="predict", protocol="grpc", status="200")
    assert after == before + 3


def test_a_traced_grpc_call_continues_the_callers_trace_and_is_payload_logged(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port, grpc_port = free_port(), free_port()
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--grpc-port",
               str(grpc_port), "--payload-log", str(tmp_path / "logs")]
    with collector() as received:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{received.server_address[1]}",
               "OTEL_BSP_SCHEDULE_DELAY": "50"}
        with LiveServer(command, port, env=env):
            client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            client.infer("iris", [rows_input(ROWS)], headers={"traceparent": parent, "x-request-id": "grpc-42"})
            wait_until(lambda: any(span.name == "ModelInfer" for _, span in exported_spans(received)), timeout=30,
                       what="the call's span at the collector")
            wait_until(lambda: any("grpc-42" in path.read_text() for path in (tmp_path / "logs").glob("*.jsonl")),
                       timeout=30, what="the payload log's line")
        spans = exported_spans(received)
    server = next(span for _, span in spans if span.name == "ModelInfer")
    assert server.trace_id.hex() == parent[3:35] and server.parent_span_id.hex() == parent[36:52]
    assert {"read", "decode", "predict", "encode"} <= {s.name for _, s in spans if s.parent_span_id == server.span_id}
    (line,) = [json.loads(line) for path in (tmp_path / "logs").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert (line["protocol"], line["request_id"], line["status"]) == ("grpc", "grpc-42", 200)
    assert line["inputs"] == ROWS and line["outputs"]["predict"] == iris_classifier.predict(ROWS).tolist()


def test_bearer_tokens_come_from_the_authorization_metadata_and_health_stays_open(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--grpc-port",
               str(grpc_port)]
    with LiveServer(command, port, env={"MODEL_SERVICE_AUTH_TOKENS": "client-token-0123456789"}):
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.infer("iris", [rows_input(ROWS)])
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.get_model_metadata("iris", headers={"authorization": "Bearer wrong-token-0123456789"})
        answer = client.infer("iris", [rows_input(ROWS)], headers={"authorization": "Bearer client-token-0123456789"})
        assert answer.as_numpy("predict").tolist() == iris_classifier.predict(ROWS).tolist()


def test_a_routing_key_parameter_is_sticky_as_over_http(tmp_path, iris_classifier):
    versioned_store(tmp_path, [iris_classifier] * 2, {"version_policy": "all", "traffic": {"1": 1, "2": 1}})
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--grpc-port",
               str(grpc_port)]
    with LiveServer(command, port) as server:
        base = server.base
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for key in ("a", "b", "c", "d"):
            over_http = requests.post(base + "/models/m/predict", json={"instances": ROWS},
                                      headers={"X-Routing-Key": key}, timeout=10).json()["version"]
            for _ in range(3):
                answer = client.infer("m", [rows_input(ROWS)], parameters={"routing_key": key})
                assert answer.get_response().model_version == over_http, key
        with pytest.raises(InferenceServerException, match="routing_key"):
            client.infer("m", [rows_input(ROWS)], parameters={"routing_key": 7})


@pytest.mark.slow
def test_sigterm_lets_a_grpc_call_in_flight_finish_and_exits_0(tmp_path):
    write_artifact(tmp_path / "slow.pkl", SlowModel(1.5), "pickle")
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--grpc-port",
               str(grpc_port), "--preload"]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__))]))
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        wait_until(lambda: _answers(client), timeout=30, what="the gRPC server")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.infer, "slow", [rows_input(ROWS)])
            time.sleep(0.5)                     # the call is being answered
            process.send_signal(signal.SIGTERM)
            assert call.result(timeout=15).as_numpy("predict").tolist() == [0, 0, 0]
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate(timeout=10)[0]
    assert "SIGTERM" in output, output


def _answers(client):
    try:
        return client.is_server_ready()
    except InferenceServerException:
        return False


@pytest.mark.slow
def test_every_worker_serves_grpc_on_the_shared_port(tmp_path, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    port, grpc_port = free_port(), free_port()
    command = [sys.executable, "service.py", "--store", str(tmp_path), "--port", str(port), "--grpc-port",
               str(grpc_port), "--workers", "2", "--preload", "--access-log", "--log-format", "json"]
    with LiveServer(command, port, timeout=60) as server:
        served = set()

        def call(_):
            client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")     # a connection each
            return client.infer("iris", [rows_input(ROWS)]).as_numpy("predict").tolist()
        deadline = time.monotonic() + 60
        while len(served) < 2 and time.monotonic() < deadline:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert all(answer == iris_classifier.predict(ROWS).tolist() for answer in pool.map(call, range(16)))
            served = {line.split('"pid": ')[1].split(",")[0] for line in server.output().splitlines()
                      if "ModelInfer" in line and '"pid": ' in line}
        assert len(served) == 2, server.output()


def test_grpc_port_without_grpcio_exits_2_with_one_line(tmp_path):
    code = ("import sys; sys.modules['grpc'] = None; import service; "          # as if grpcio were not installed
            f"sys.exit(service.main(['--store', {str(tmp_path)!r}, '--grpc-port', '0']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "pip install '.[grpc]'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_runtime_descriptor_is_wire_compatible_with_triton_s_generated_messages():
    """GRPC_PROTO read by the service's own parser: every message it declares round-trips through tritonclient's
    generated class of the same name (same field numbers and types)."""
    classes, methods = service.grpc_messages()
    assert set(methods) <= {method.name for method in
                            service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    request = typed_request("iris", ROWS, id="7", raw_input_contents=[b"x"])
    request.parameters["routing_key"].string_param = "key"
    request.outputs.add(name="predict_proba").parameters["binary_data"].bool_param = True
    ours = classes["ModelInferRequest"].FromString(request.SerializeToString())
    assert ours.SerializeToString() == request.SerializeToString()
    assert ours.parameters["routing_key"].string_param == "key" and list(ours.inputs[0].shape) == [3, 4]
