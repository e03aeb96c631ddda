"""V2 (Open Inference Protocol) over gRPC for the benchmark: the sanity call and the load's client sessions.

The messages are tritonclient's compiled ones (`tritonclient.grpc.service_pb2`, KServe's
grpc_predict_v2.proto as Triton ships it), the client every V2 server is driven with. A request is built
once from the V2 JSON body the HTTP points send (the same rows, as one `raw_input_contents` tensor, which is
what tritonclient sends), and each call is the stub's ModelInfer alone: no client-side encoding per call.

A target is `grpc://HOST:PORT/MODEL`. The load is run.py's Python threads (run_threads), one channel each, so
its figures are a lower bound, like --python-load's: it is compared with the same service answering V2 over
HTTP from Python threads (run.py's `service-v2-py`), never with wrk's figures.
"""
import contextlib
import json

#: V2 datatype -> numpy dtype of raw contents (little-endian, as the protocol says)
RAW_DTYPES = {"FP64": "<f8", "FP32": "<f4", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1"}


class GrpcUnmeasured(Exception):
    """The server did not answer the call as V2 over gRPC should; the message says why."""


def _pb2():
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    return service_pb2, service_pb2_grpc


def parse_target(url):
    """(host:port, model) of grpc://HOST:PORT/MODEL."""
    address, _, model = url[len("grpc://"):].partition("/")
    return address, model


def infer_request(model, body):
    """The ModelInferRequest for a V2 JSON body (bytes): each input tensor as raw contents."""
    import numpy as np
    service_pb2, _ = _pb2()
    request = service_pb2.ModelInferRequest(model_name=model)
    for tensor in json.loads(body)["inputs"]:
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        data = np.asarray(tensor["data"], dtype=RAW_DTYPES[tensor["datatype"]])
        request.raw_input_contents.append(data.tobytes())
    return request


def _outputs(response):
    """The first output tensor's values, from raw or typed contents."""
    import numpy as np
    first = response.outputs[0]
    if response.raw_output_contents:
        if first.datatype == "BYTES":
            raise GrpcUnmeasured("BYTES outputs are not read by the benchmark")
        return np.frombuffer(response.raw_output_contents[0], dtype=RAW_DTYPES[first.datatype]).tolist()
    contents = first.contents
    for field in ("fp64_contents", "fp32_contents", "int64_contents", "int_contents", "bool_contents"):
        values = list(getattr(contents, field))
        if values:
            return values
    return []


def predictions(address, model, body, timeout=60.0):
    """One ModelInfer call on a fresh channel: the first output's values (a GrpcUnmeasured if refused)."""
    import grpc
    _, service_pb2_grpc = _pb2()
    with grpc.insecure_channel(address) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer_request(model, body), timeout=timeout)
        except grpc.RpcError as error:
            raise GrpcUnmeasured(f"ModelInfer on {address} answered {error.code().name}: {error.details()}") from None
    return _outputs(response)


def grpc_session(url, body_path):
    """For run.py's run_threads: a session per client thread on its own channel (one HTTP/2 connection each,
    as wrk's connections), whose call sends the request built once from the body and says whether it was
    answered."""
    import grpc
    _, service_pb2_grpc = _pb2()
    address, model = parse_target(url)
    with open(body_path, "rb") as f:
        request = infer_request(model, f.read())

    @contextlib.contextmanager
    def session():
        with grpc.insecure_channel(address) as channel:
            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            def call():
                try:
                    infer(request, timeout=10)
                    return True
                except grpc.RpcError:
                    return False
            yield call

    return session
