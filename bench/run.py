#!/usr/bin/env python3
"""model-service benchmark: this service beside the plainest Bottle server, the seed's Flask app and,
when asked, the servers a user would pick instead (MLServer, `mlflow models serve`).

Usage (from the repository, in the virtualenv where `pip install .` ran):

    python bench/run.py [--quick] [--duration S] [--rounds N] [--peers mlserver,mlflow] [--out results.md]

It trains the two reference models (iris LogisticRegression; 100-tree RandomForest on 20
features) into a temporary model store, then measures in one run:

  * the raw in-process predict cost (1 row, 64 rows);
  * over HTTP, with wrk and a Lua script that POSTs the body: the minimal Bottle + waitress server
    (bench/peers/bottle_floor.py, 1 and 8 threads), the seed's Flask app (bench/peers/seed_flask.py,
    Flask's own server and under waitress), and `python service.py` (default threads, --threads 1
    and 8, and --workers 2 / batching when `python service.py --help` shows those flags):
    req/s and p50/p99 latency at concurrency 1, 8 and 32 for one-row requests, rows/s for 64-row
    requests at concurrency 8;
  * V2 over gRPC (`--grpc-port`) beside V2 over HTTP, both driven by Python threads (bench/grpc_load.py:
    wrk speaks no gRPC);
  * with --peers: MLServer (defaults, adaptive batching, and over gRPC) and `mlflow models serve`, each
    installed into its own virtual environment and driven with its own protocol's body, beside the
    service answering the same body;
  * cold start (`import service`; process start to the first /healthz answer and to the first
    prediction of a lazily loaded model) and memory (RSS with nothing loaded, and per model);

Every server is started first and left running; then each point is taken round-robin across them,
--rounds times, and the median round is reported, because this machine's speed drifts by 2-3x within
minutes: servers measured back to back see the same machine, servers measured minutes apart do not.

It prints a Markdown report with the ratios that the issues set as targets (6, 14, 16). Progress goes
to stderr, the report to stdout (and to --out). Exit code: 0 when every server answered, 1 when
one could not be measured, 2 when wrk is missing (install it: `apt-get install wrk`), or run
with --python-load for a rougher Python load generator. Linux only: it reads /proc for CPU and memory.

Every process it starts runs in its own process group and is stopped on exit, Ctrl-C included.
Load goes to 127.0.0.1 only. See bench/README.md.
"""
import argparse
import concurrent.futures
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SERVICE = os.path.join(REPO, "service.py")
PEERS = os.path.join(HERE, "peers")
LUA = os.path.join(HERE, "post.lua")
PY = sys.executable
HOST = "127.0.0.1"                     # the only address load is ever sent to
MODELS = ("iris", "rf")
#: the pipeline tabular data is usually served with (named records with text categories): only the service takes
#: records, so only its default configuration is measured on it (make_models.build writes it and its bodies)
TABULAR = "tabular"
CONCURRENCY = (1, 8, 32)
BULK_ROWS, BULK_CONCURRENCY = 64, 8
POINTS = [(1, c) for c in CONCURRENCY] + [(BULK_ROWS, BULK_CONCURRENCY)]    # (rows per request, concurrency)

#: Where a request protocol's answer holds the predictions: V1 (the service's /models/<name>/predict,
#: MLflow's /invocations) and V2 (the Open Inference Protocol: MLServer, the service's /v2/.../infer).
#: "v2-grpc" is V2 over gRPC (bench/grpc_load.py): the same V2 body, sent as a ModelInferRequest.
PREDICTIONS = {"v1": lambda answer: answer["predictions"],
               "v2": lambda answer: answer["outputs"][0]["data"]}
GRPC = "v2-grpc"

#: The peers' virtual environments: what pip installs into each (with this run's scikit-learn, so that
#: they load the same joblib files), the import that proves it is there, the versions the report names.
PEER_ENVS = {
    "mlserver": {"what": "MLServer 1.7.1 with mlserver-sklearn 1.7.1",
                 # MLServer 1.7.1 cannot load a model with uvloop 0.22 or newer
                 "requirements": ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0"),
                 "check": "import mlserver, mlserver_sklearn",
                 "versions": ("mlserver", "mlserver-sklearn", "uvloop", "scikit-learn")},
    "mlflow": {"what": "MLflow 3.17.2 (`mlflow models serve`)",
               "requirements": ("mlflow==3.17.2",),
               "check": "import mlflow.sklearn",
               "versions": ("mlflow", "scikit-learn")},
}
#: The peer servers --peers can add: key -> (label, environment, models, adaptive batching, the service
#: configuration it is compared with). Each is compared with the service answering the same body:
#: MLServer speaks only V2, so the service is driven with V2 too (service-v2, service-batch-v2); MLflow's
#: /invocations takes the service's own V1 body ({"instances": ...}) and answers {"predictions": ...}.
PEER_SERVERS = {
    "mlserver": ("MLServer {mlserver}, defaults", "mlserver", MODELS, None, "service-v2"),
    "mlserver-batch": ("MLServer {mlserver}, adaptive batching (max_batch_size 32, max_batch_time 2 ms)",
                       "mlserver", ("rf",), {"max_batch_size": 32, "max_batch_time": 0.002}, "service-batch-v2"),
    "mlflow": ("mlflow models serve {mlflow}, defaults", "mlflow", MODELS, None, "service"),
    "mlserver-grpc": ("MLServer {mlserver}, defaults, V2 over gRPC", "mlserver", MODELS, None, "service-grpc"),
}

sys.path.insert(0, HERE)
sys.dont_write_bytecode = True          # nothing written into the checkout besides what --out names


T0 = time.perf_counter()


def log(message):
    elapsed = int(time.perf_counter() - T0)
    print(f"[{elapsed // 60}:{elapsed % 60:02d}] {message}", file=sys.stderr, flush=True)


class Unmeasured(Exception):
    """A server or a figure that could not be measured; the message says why."""


###############################################################################
# Processes: each in its own group, all stopped on exit ######################
###############################################################################

class Processes:
    def __init__(self):
        self.live = []

    def start(self, argv, env, cwd, logpath):
        logfile = open(logpath, "ab")
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            logfile.close()
        proc.logpath = logpath
        self.live.append(proc)
        return proc

    @staticmethod
    def _group_alive(pgid):
        return bool(group_pids(pgid))

    def stop(self, proc, grace=12.0):
        """SIGTERM to the process group, then SIGKILL to whatever of it is left after `grace` s."""
        if proc not in self.live:
            return
        pgid = proc.pid                     # start_new_session: the leader's pid is the group id
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if proc.returncode is not None and not self._group_alive(pgid):
                break
            time.sleep(0.02)
        if proc.returncode is None or self._group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.live.remove(proc)

    def stop_all(self):
        for proc in list(self.live):
            self.stop(proc, grace=3.0)


PROCS = Processes()


def group_pids(pgid):
    """Pids of the live (non-zombie) processes in process group `pgid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def group_cpu_seconds(pgid):
    """utime + stime of the live processes in a process group, in seconds."""
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def proc_kib(pid, file, field):
    """A size in KiB from /proc/PID/FILE's line "FIELD: N kB"."""
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise Unmeasured(f"no {field} for pid {pid}")


def vmrss_kib(pid):
    return proc_kib(pid, "status", "VmRSS")


def pss_kib(pid):
    """Proportional set size: each page shared by k processes counts 1/k in each (what N workers really cost)."""
    return proc_kib(pid, "smaps_rollup", "Pss")


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


###############################################################################
# HTTP helpers ################################################################
###############################################################################

def http_call(port, method, path, body=None, timeout=60.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def flat(values):
    return [x for v in values for x in (flat(v) if isinstance(v, list) else [v])]


def grpc_call(name, *args):
    """bench/grpc_load.py's function `name` (imported when a gRPC point runs), its refusals as Unmeasured."""
    import grpc_load
    try:
        return getattr(grpc_load, name)(*args)
    except grpc_load.GrpcUnmeasured as error:
        raise Unmeasured(str(error)) from None


def check_prediction(port, path, body, expected, protocol="v1"):
    """One POST (one ModelInfer call for V2 over gRPC, `path` being /MODEL): must answer 200 with exactly
    the `expected` predictions (what the model predicts in-process), found where `protocol`'s answers
    hold them."""
    if protocol == GRPC:
        predictions = grpc_call("predictions", f"{HOST}:{port}", path[1:], body)
        if [float(x) for x in predictions] != [float(x) for x in expected]:
            raise Unmeasured(f"sanity call ModelInfer {path[1:]}: answered {predictions[:8]}, the model "
                             f"predicts {expected[:8]}")
        return
    status, data = http_call(port, "POST", path, body)
    if status != 200:
        raise Unmeasured(f"sanity request POST {path} answered HTTP {status}: {data[:300]!r}")
    try:
        predictions = flat(PREDICTIONS[protocol](json.loads(data)))
    except (ValueError, KeyError, IndexError, TypeError):
        raise Unmeasured(f"sanity request POST {path}: no {protocol} predictions in {data[:300]!r}") from None
    if [float(x) for x in predictions] != [float(x) for x in expected]:
        raise Unmeasured(f"sanity request POST {path}: answered {predictions[:8]} (of {len(predictions)}), "
                         f"the model predicts {expected[:8]} (of {len(expected)})")


def wait_until(proc, probe, timeout, what):
    """Call probe() until it returns truthy; fail if the process dies or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unmeasured(f"{what}: the process exited with code {proc.returncode}:\n"
                             f"{tail(proc.logpath)}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, http.client.HTTPException) as error:
            last = error
        except Unmeasured as error:
            last = error
        time.sleep(0.02)
    raise Unmeasured(f"{what}: not ready within {timeout:g} s (last: {last}):\n{tail(proc.logpath)}")


def warm_burst(port, path, body, expected, protocol, n=16, width=8):
    """Concurrent sanity requests on fresh connections, so every worker process loads the model."""
    with concurrent.futures.ThreadPoolExecutor(width) as pool:
        for future in [pool.submit(check_prediction, port, path, body, expected, protocol) for _ in range(n)]:
            future.result()


###############################################################################
# Load generators #############################################################
###############################################################################

def wrk_version():
    try:
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "wrk"


def run_wrk(url, body_path, concurrency, duration):
    argv = ["wrk", f"-t{min(1, concurrency)}", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s",
            "--latency", "-s", LUA, url]
    env = dict(os.environ, BODY_FILE=body_path)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise Unmeasured(f"wrk printed no RESULT line (exit {out.returncode}): {out.stdout[-300:]} {out.stderr[-300:]}")
    values = dict(item.split("=", 1) for item in line.split()[1:])
    errors = sum(int(values[k]) for k in ("err_status", "err_connect", "err_read", "err_write", "err_timeout"))
    return {"rps": float(values["rps"]), "p50": float(values["p50_ms"]), "p99": float(values["p99_ms"]),
            "requests": int(values["requests"]), "errors": errors}


def run_python_load(url, body_path, concurrency, duration):
    """--python-load: `concurrency` Python threads, one keep-alive connection each. Rougher than wrk:
    the client shares the GIL and the two cores with the server, so figures are lower bounds."""
    path = url.split(f"{HOST}:", 1)[1]
    port, path = int(path.split("/", 1)[0]), "/" + path.split("/", 1)[1]
    with open(body_path, "rb") as f:
        body = f.read()

    @contextlib.contextmanager
    def session():
        conns = [http.client.HTTPConnection(HOST, port, timeout=10)]

        def call():
            try:
                conns[0].request("POST", path, body, {"Content-Type": "application/json"})
                response = conns[0].getresponse()
                response.read()
                return response.status == 200
            except (OSError, http.client.HTTPException):
                conns[0].close()
                conns[0] = http.client.HTTPConnection(HOST, port, timeout=10)
                return False
        try:
            yield call
        finally:
            conns[0].close()

    return run_threads(session, concurrency, duration)


def run_threads(session, concurrency, duration):
    """The Python load generators' one loop: `concurrency` threads, each in its own `session()` (a context
    manager giving `call`, which sends one request and says whether it was answered), calling back to back
    for `duration` seconds: req/s and p50/p99 ms of the answered calls, their number and the errors."""
    latencies = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop_at = time.perf_counter() + duration

    def worker(i):
        with session() as call:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                if call():
                    latencies[i].append(time.perf_counter() - t0)
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    lat = sorted(x for per in latencies for x in per)
    if not lat:
        raise Unmeasured(f"python load generator: no request completed ({sum(errors)} errors)")

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3

    return {"rps": len(lat) / elapsed, "p50": pct(50), "p99": pct(99), "requests": len(lat),
            "errors": sum(errors)}


###############################################################################
# Servers #####################################################################
###############################################################################

class Server:
    """One server configuration: how to start it, where it predicts and with which protocol's body.
    `client` names its load generator when it is not the run's own (wrk): "python" (run_python_load) or
    "grpc" (bench/grpc_load.py), so that V2 over gRPC is compared with V2 over HTTP from the same kind of
    client."""

    def __init__(self, key, label, group, argv, models=MODELS, per_model=False, env=None, cwd=REPO,
                 path="/models/{model}/predict", protocol="v1", client=None):
        self.key, self.label, self.group = key, label, group
        self.argv, self.models, self.per_model = argv, models, per_model
        self.env, self.cwd, self.path, self.protocol = env or (lambda model, port: {}), cwd, path, protocol
        self.client = client

    def url(self, port, model):
        scheme = "grpc" if self.protocol == GRPC else "http"
        return f"{scheme}://{HOST}:{port}{self.path.format(model=model)}"

    def load(self, run_load):
        """The load generator for this server: its own client's, else the run's (`run_load`)."""
        if self.client == "grpc":
            return lambda url, body_path, concurrency, duration: run_threads(
                grpc_call("grpc_session", url, body_path), concurrency, duration)
        return run_python_load if self.client == "python" else run_load

    def command(self, model="MODEL", port="PORT"):
        env = self.env(model, port)
        shown = " ".join(f"{k}={v}" for k, v in env.items()).replace(os.environ.get("PATH") or "$PATH", "$PATH")
        argv = [a.replace(PY, "python").replace(REPO + os.sep, "") for a in self.argv(model, port)]
        return (shown + " " if shown else "") + " ".join(shlex.quote(a) for a in argv)


def service_features():
    """What `python service.py --help` offers: flags, default threads, version."""
    try:
        out = subprocess.run([PY, SERVICE, "--help"], capture_output=True, text=True, cwd=REPO,
                             env=clean_env(), timeout=60)
        version = subprocess.run([PY, SERVICE, "--version"], capture_output=True, text=True, cwd=REPO,
                                 env=clean_env(), timeout=60).stdout.strip()
    except subprocess.TimeoutExpired:
        raise Unmeasured("python service.py --help did not finish in 60 s") from None
    if out.returncode != 0:
        raise Unmeasured(f"python service.py --help failed:\n{out.stderr[-2000:]}")
    text = out.stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
    threads = re.search(r"--threads N\s+.*?default:\s*(\d+)\)", text, re.S)
    return {"flags": flags, "default_threads": int(threads.group(1)) if threads else None,
            "version": version}


def clean_env(extra=None):
    """This environment without MODEL_SERVICE_* settings (the runs must not depend on them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SERVICE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


#: pip's words when it could not reach a package index at all
NO_NETWORK = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                        r"resolution|Network is unreachable|\(from versions: none\)")


def peer_env(args, name):
    """(environment, None) for the peer environment `name`, pip-installed into --peers-dir on first
    use, or (None, why it cannot be had). A folder per pinned release, reused while its marker file
    lists the same requirements and the peer imports."""
    from importlib import metadata
    spec = PEER_ENVS[name]
    requirements = list(spec["requirements"]) + [f"scikit-learn=={metadata.version('scikit-learn')}"]
    folder = os.path.join(args.peers_dir, spec["requirements"][0].replace("==", "-"))
    python, marker = os.path.join(folder, "bin", "python"), os.path.join(folder, "bench-requirements.txt")

    def ready():
        try:
            with open(marker) as f:
                if f.read().split() != requirements:
                    return False
        except OSError:
            return False
        return subprocess.run([python, "-c", spec["check"]], capture_output=True).returncode == 0

    if not ready():
        if args.no_install:
            return None, f"not installed in {folder} (--no-install was given)"
        kept = "" if args.peers_dir_given else "; --peers-dir DIR (or BENCH_PEERS_DIR=DIR) keeps it for later runs"
        log(f"installing {spec['what']} for --peers into its own virtual environment, {folder}:\n"
            f"  python -m venv {folder} && {python} -m pip install {' '.join(requirements)}\n"
            f"  (a few minutes{kept})")
        logpath = os.path.join(args.tmp, f"install-{name}.log")
        with open(logpath, "w") as logfile:
            try:
                ok = all(subprocess.run(argv, stdout=logfile, stderr=subprocess.STDOUT, timeout=1800).returncode == 0
                         for argv in ([PY, "-m", "venv", folder],
                                      [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                       *requirements]))
            except subprocess.TimeoutExpired:
                ok = False
        if not ok:
            text = tail(logpath, 60)
            if NO_NETWORK.search(text):
                return None, "no network to install it (pip could not reach the package index)"
            errors = [ln for ln in text.splitlines() if ln.startswith("ERROR")] or text.strip().splitlines()[-1:]
            return None, f"install failed: {' '.join(errors)[-400:]}"
        with open(marker, "w") as f:
            f.write("\n".join(requirements) + "\n")
        if not ready():
            return None, f"install failed: `{spec['check']}` fails in {python}"
    code = ("import json, sys; from importlib import metadata; "
            "print(json.dumps({d: metadata.version(d) for d in sys.argv[1:]}))")
    versions = json.loads(subprocess.run([python, "-c", code, *spec["versions"]], capture_output=True, text=True,
                                         check=True).stdout)
    bin_ = os.path.dirname(python)
    variables = {"PATH": bin_ + os.pathsep + os.environ.get("PATH", "")}    # as if activated: mlflow runs `uvicorn`
    if name == "mlflow":
        # MLflow 3 sends usage telemetry to an outside host unless told not to
        variables.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return {"name": name, "python": python, "bin": bin_, "folder": folder, "versions": versions,
            "vars": variables}, None


def spare_port(port):
    """A free port for a peer's other listeners (MLServer's gRPC and metrics), shown as such in commands."""
    return "FREE_PORT" if port == "PORT" else str(free_port())


def mlserver_server(args, key, label, env, models, batching, built):
    """MLServer serving `models` from one folder of model-settings.json (its own layout), each naming
    this run's joblib file; HTTP on the port given, gRPC and metrics on free ports (gRPC on the port
    given and HTTP on a free one for the `-grpc` key, driven by bench/grpc_load.py)."""
    folder = os.path.join(args.tmp, key)
    for model in models:
        os.makedirs(os.path.join(folder, model))
        with open(os.path.join(folder, model, "model-settings.json"), "w") as f:
            json.dump({"name": model, "implementation": "mlserver_sklearn.SKLearnModel",
                       "parameters": {"uri": built["artifacts"][model]}, **(batching or {})}, f, indent=2)
    grpc = key.endswith("-grpc")
    return Server(key, label, "peer", lambda m, p: [os.path.join(env["bin"], "mlserver"), "start", folder],
                  models=models, cwd=folder, path="/{model}" if grpc else "/v2/models/{model}/infer",
                  protocol=GRPC if grpc else "v2", client="grpc" if grpc else None,
                  env=lambda m, p: {**env["vars"], "MLSERVER_HOST": HOST,
                                    "MLSERVER_HTTP_PORT": spare_port(p) if grpc else str(p),
                                    "MLSERVER_GRPC_PORT": str(p) if grpc else spare_port(p),
                                    "MLSERVER_METRICS_PORT": spare_port(p)})


#: run in MLflow's environment: argv = folder, then (model name, joblib file, 64-row body) triples
MLFLOW_SAVE = """
import json, os, sys
import joblib, numpy, mlflow.sklearn
from mlflow.models import infer_signature
folder, rest = sys.argv[1], sys.argv[2:]
for name, artifact, body in zip(rest[0::3], rest[1::3], rest[2::3]):
    model = joblib.load(artifact)
    with open(body) as f:
        X = numpy.asarray(json.load(f)["instances"])
    mlflow.sklearn.save_model(model, os.path.join(folder, name), signature=infer_signature(X, model.predict(X)),
                              serialization_format="cloudpickle")
"""


def mlflow_server(args, key, label, env, models, batching, built):
    """`mlflow models serve`, one process per model (it serves one), from folders that
    mlflow.sklearn.save_model writes in MLflow's own environment, with a signature (which MLflow
    recommends; it checks every request against it) and cloudpickle (skops refuses tree types)."""
    folder = os.path.join(args.tmp, key)
    argv = [env["python"], "-c", MLFLOW_SAVE, folder]
    for model in models:
        argv += [model, built["artifacts"][model], built["bodies"][(model, BULK_ROWS)]]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=args.tmp, env=clean_env(env["vars"]), timeout=600)
    if out.returncode != 0:
        raise Unmeasured(f"mlflow.sklearn.save_model failed: {out.stderr.strip()[-600:]}")
    return Server(key, label, "peer",
                  lambda m, p: [os.path.join(env["bin"], "mlflow"), "models", "serve", "-m", os.path.join(folder, m),
                                "-h", HOST, "-p", str(p), "--env-manager", "local"],
                  models=models, per_model=True, cwd=folder, path="/invocations", env=lambda m, p: env["vars"])


def peer_servers(args, built, notes):
    """The Server of every peer --peers asks for, with its environment installed and its models written
    in its own format. A peer that cannot be had is left out with the reason in `notes`: it never
    stops the run."""
    asked = set(args.peers.split(",")) if args.peers else set()
    envs, servers = {}, []
    for key, (label, name, models, batching, _) in PEER_SERVERS.items():
        if not asked & {key, name, "all"}:
            continue
        if name not in envs:
            envs[name] = peer_env(args, name)
        env, why = envs[name]
        label = label.format(**{n: spec["requirements"][0].split("==")[1] for n, spec in PEER_ENVS.items()})
        if env is None:
            notes.append(f"{label} (`{key}`): not measured, {why}")
            continue
        log(f"{label}: writing its model folders (environment: {env['folder']})...")
        try:
            servers.append((mlserver_server if name == "mlserver" else mlflow_server)(
                args, key, label, env, models, batching, built))
        except (Unmeasured, OSError, subprocess.SubprocessError) as error:
            notes.append(f"{label} (`{key}`): not measured, its models could not be written: {error}")
    return servers, {name: env for name, (env, _) in envs.items() if env}


def build_servers(args, features, built, notes, have_flask, have_gunicorn, have_grpc, peers=()):
    """The servers to measure: those --only picks, then the service configurations the peers are
    compared with (whatever --only says), then the peers."""
    servers, artifacts = [], built["artifacts"]
    wanted = set(args.only.split(",")) if args.only else None
    versus = {PEER_SERVERS[peer.key][4] for peer in peers}

    def add(server):
        if wanted is None or server.key in wanted or server.group in wanted or server.key in versus:
            servers.append(server)

    for threads in (1, 8):
        add(Server(f"bottle-t{threads}", f"Bottle floor, waitress {threads} thread{'s' if threads > 1 else ''}",
                   "bottle", lambda m, p: [PY, os.path.join(PEERS, "bottle_floor.py")], per_model=True,
                   env=lambda m, p, t=threads: {"MODEL_PATH": artifacts.get(m, m), "PORT": str(p), "THREADS": str(t)},
                   cwd=PEERS, path="/predict"))
    if have_flask:
        add(Server("flask-dev", "seed Flask, Flask dev server (threaded)", "flask",
                   lambda m, p: [PY, os.path.join(PEERS, "seed_flask.py")], per_model=True,
                   env=lambda m, p: {"MODEL_PATH": artifacts.get(m, m), "PORT": str(p)}, cwd=PEERS, path="/predict"))
        add(Server("flask-waitress", "seed Flask under waitress, 8 threads", "flask",
                   lambda m, p: [PY, "-m", "waitress", "--host", HOST, "--port", str(p), "--threads", "8",
                                 "seed_flask:app"], per_model=True,
                   env=lambda m, p: {"MODEL_PATH": artifacts.get(m, m)}, cwd=PEERS, path="/predict"))

    def service(key, label, extra, models=MODELS, store=built["store"]):
        add(Server(key, label, "service",
                   lambda m, p: [PY, SERVICE, "--store", store, "--port", str(p)] + extra, models=models))
        if key + "-v2" in versus:           # the same configuration answering the V2 body, beside MLServer
            add(Server(key + "-v2", label + ", V2 body", "service",
                       lambda m, p: [PY, SERVICE, "--store", store, "--port", str(p)] + extra,
                       models=tuple(m for m in models if m != TABULAR),
                       path="/v2/models/{model}/infer", protocol="v2"))

    default_threads = features["default_threads"]
    shown = f"{default_threads} threads" if default_threads else "default threads"
    service("service", f"model-service, defaults ({shown})", [], models=MODELS + (TABULAR,))
    for threads in (1, 8):
        if threads != default_threads:
            service(f"service-t{threads}", f"model-service --threads {threads}", ["--threads", str(threads)])
    # traffic management's costs, beside the defaults: each request also run on a shadow version; every
    # request written to the payload log
    service("service-shadow", "model-service, a shadow version (store-shadow)", [], store=built["store_shadow"])
    flags = features["flags"]
    if "--payload-log" in flags:
        service("service-log", "model-service --payload-log (every request)",
                ["--payload-log", os.path.join(args.tmp, "payload-log")])
    if "--workers" in flags:
        if have_gunicorn:
            service("service-w2", f"model-service --workers 2 ({shown} each)", ["--workers", "2"])
        else:
            notes.append("model-service --workers 2: not measured, gunicorn is not installed (pip install gunicorn)")
    else:
        notes.append("model-service --workers 2: not measured, `python service.py --help` shows no --workers flag")
    if "--grpc-port" in flags and have_grpc:
        # V2 over gRPC (HTTP on a free port beside it) and V2 over HTTP, both driven by Python threads
        add(Server("service-grpc", "model-service --grpc-port, V2 over gRPC (Python gRPC client)", "service",
                   lambda m, p: [PY, SERVICE, "--store", built["store"], "--port", spare_port(p), "--grpc-port", str(p)],
                   path="/{model}", protocol=GRPC, client="grpc"))
        add(Server("service-v2-py", "model-service, defaults, V2 over HTTP (Python HTTP client)", "service",
                   lambda m, p: [PY, SERVICE, "--store", built["store"], "--port", str(p)],
                   path="/v2/models/{model}/infer", protocol="v2", client="python"))
    elif "--grpc-port" not in flags:
        notes.append("model-service over gRPC: not measured, `python service.py --help` shows no --grpc-port flag")
    if "--max-batch-size" in flags and "--max-latency-ms" in flags:
        extra = shlex.split(args.batching_args)
        service("service-batch", "model-service, batching on (" + " ".join(extra) + ")", extra, models=("rf",))
    else:
        notes.append("model-service with batching: not measured, `python service.py --help` shows no "
                     "--max-batch-size/--max-latency-ms flags")
    return servers + list(peers)


###############################################################################
# Measuring ###################################################################
###############################################################################

def start_server(args, load, server, bodies, expected, lost):
    """Start the server (one process, or one per model, all started together so their start-up
    overlaps; an idle one costs nothing), check that every model answers what it predicts in-process,
    warm it. Returns [(model, proc, port)] for the models ready to measure; lost(server, why) hears
    of the others."""
    ready, procs = [], {}
    for model in (server.models if server.per_model else server.models[:1]):
        port = free_port()
        logpath = os.path.join(args.tmp, f"{server.key}{'-' + model if server.per_model else ''}.log")
        env = clean_env(server.env(model, port))
        if server.group != "service":
            env["PYTHONDONTWRITEBYTECODE"] = "1"    # no __pycache__ in bench/peers
        procs[model] = (PROCS.start(server.argv(model, port), env, server.cwd, logpath), port)
    body = bodies[server.protocol]
    checked = set()
    for model in server.models:
        proc, port = procs[model if server.per_model else server.models[0]]
        path = server.path.format(model=model)
        try:
            if server.group == "service" and server.protocol != GRPC and proc not in checked:
                wait_until(proc, lambda: http_call(port, "GET", "/healthz", timeout=5)[0] == 200, 60, "/healthz")
                checked.add(proc)
            with open(body[(model, 1)], "rb") as f:
                body1 = f.read()
            with open(body[(model, BULK_ROWS)], "rb") as f:
                body64 = f.read()
            # first request: for a peer, waits for its start-up; for the service, loads the model
            wait_until(proc, lambda: check_prediction(port, path, body1, expected[(model, 1)], server.protocol) or True,
                       180, "first request")
            warm_burst(port, path, body1, expected[(model, 1)], server.protocol)
            check_prediction(port, path, body64, expected[(model, BULK_ROWS)], server.protocol)
            if args.warmup:
                server.load(load)(server.url(port, model), body[(model, 1)], 8, args.warmup)    # not recorded
            ready.append((model, proc, port))
        except Unmeasured as error:
            lost(server, f"{server.label}, {model}: did not start, or answered wrongly: {error}")
            log(f"  NOT MEASURED: {server.label}, {model}: {error}")
    for proc, _ in procs.values():
        if not any(proc is p for _, p, _ in ready):
            PROCS.stop(proc)
    return ready


def measure_rounds(args, load, running, bodies, expected, results, lost):
    """Every point, round-robin across the running servers, --rounds times (each round starting one
    server further along, so that none always follows the same one); one result per point: the median
    round by req/s, with every round's req/s in "rounds".

    `running` is [(server, model, proc, port)]; a server that stops answering (or answers wrongly) is
    dropped for that model, and lost(server, why) hears of it."""
    samples, dropped = {}, set()
    total, done = args.rounds * len(running) * len(POINTS), 0
    for round_ in range(args.rounds):
        for model in MODELS + (TABULAR,):
            here = [r for r in running if r[1] == model]
            here = here[round_ % len(here):] + here[:round_ % len(here)] if here else here
            for rows, c in POINTS:
                for server, _, proc, port in here:
                    done += 1
                    if (server.key, model) in dropped:
                        continue
                    log(f"  [{done}/{total}] round {round_ + 1}/{args.rounds}: {server.label}: {model}, "
                        f"{rows} row{'s' if rows > 1 else ''}, c={c}")
                    path, body = server.path.format(model=model), bodies[server.protocol][(model, rows)]
                    try:
                        if proc.poll() is not None:
                            raise Unmeasured(f"the server exited (code {proc.returncode}):\n{tail(proc.logpath)}")
                        with open(body, "rb") as f:
                            check_prediction(port, path, f.read(), expected[(model, rows)], server.protocol)
                        cpu0, wall0 = group_cpu_seconds(proc.pid), time.perf_counter()
                        result = server.load(load)(server.url(port, model), body, c, args.duration)
                        cpu1, wall1 = group_cpu_seconds(proc.pid), time.perf_counter()
                    except Unmeasured as error:
                        dropped.add((server.key, model))
                        lost(server, f"{server.label}, {model}: stopped at {rows} rows, c={c}, round {round_ + 1}: "
                                     f"{error}")
                        log(f"    FAILED: {error}")
                        continue
                    result["cpu_pct"] = 100 * (cpu1 - cpu0) / (wall1 - wall0)
                    result["cpu_us"] = 1e6 * (cpu1 - cpu0) / result["requests"] if result["requests"] else None
                    samples.setdefault((server.key, model, rows, c), []).append(result)
                    if result["errors"]:
                        log(f"    {result['errors']} errors")
    for (server, model, rows, c), rounds in samples.items():
        if (server, model) in dropped:
            continue
        result = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
        result.update(server=server, model=model, rows=rows, c=c, rows_s=result["rps"] * rows,
                      rounds=[r["rps"] for r in rounds])
        results.append(result)


def measure_import(runs, tmp):
    """`import service` in fresh interpreters: seconds, and which heavy modules it pulled in."""
    code = ("import json, sys, time\n"
            "t0 = time.perf_counter()\n"
            "import service\n"
            "dt = time.perf_counter() - t0\n"
            "mods = set(m.split('.')[0] for m in sys.modules)\n"
            "print(json.dumps({'s': dt, 'file': service.__file__, 'sklearn': 'sklearn' in mods,\n"
            "                  'numpy': 'numpy' in mods, 'scipy': 'scipy' in mods, 'joblib': 'joblib' in mods}))\n")
    # bytecode cached (in the temporary folder, not beside service.py), as after `pip install .`,
    # even where PYTHONDONTWRITEBYTECODE is set
    env = clean_env({"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                     "PYTHONPYCACHEPREFIX": os.path.join(tmp, "pycache")})
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    samples = []
    for _ in range(runs + 1):                              # the first run compiles service.py: kept apart
        out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        if out.returncode != 0:
            raise Unmeasured(f"import service failed:\n{out.stderr[-2000:]}")
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, samples = samples[0], samples[1:]
    if os.path.realpath(first["file"]) != os.path.realpath(SERVICE):
        raise Unmeasured(f"import service found {first['file']}, not {SERVICE}")
    # where the time goes: service's direct imports, from -X importtime (children print before parents)
    out = subprocess.run([PY, "-X", "importtime", "-c", "import service"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120)
    top, children = [], []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)", line)
        if not m:
            continue
        depth = len(m.group(3))
        if depth <= 1:
            if m.group(4) == "service":
                top = sorted(children, reverse=True)[:5] + [(int(m.group(1)), "service.py itself")]
            children = []
        elif depth == 3:
            children.append((int(m.group(2)), m.group(4)))
    return {"median_s": statistics.median(s["s"] for s in samples), "max_s": max(s["s"] for s in samples),
            "first_s": first["s"], "runs": len(samples), "sklearn": any(s["sklearn"] for s in samples),
            "numpy": any(s["numpy"] for s in samples), "scipy": any(s["scipy"] for s in samples),
            "joblib": any(s["joblib"] for s in samples), "top": top}


def measure_cold(args, store, bodies, expected, runs):
    """Fresh `python service.py` processes: time to /healthz, to the first prediction of a model
    loaded lazily, and RSS before and after each model loads. Runs alternate which model goes first."""
    samples = []
    for i in range(runs):
        order = MODELS if i % 2 == 0 else tuple(reversed(MODELS))
        port = free_port()
        logpath = os.path.join(args.tmp, f"cold-{i}.log")
        t0 = time.perf_counter()
        proc = PROCS.start([PY, SERVICE, "--store", store, "--port", str(port)], clean_env(), REPO, logpath)
        try:
            def healthz():
                return http_call(port, "GET", "/healthz", timeout=5)[0] == 200
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise Unmeasured(f"cold start: service exited (code {proc.returncode}):\n{tail(logpath)}")
                try:
                    if healthz():
                        break
                except (OSError, http.client.HTTPException):
                    pass
                if time.monotonic() > deadline:
                    raise Unmeasured(f"cold start: no /healthz answer within 60 s:\n{tail(logpath)}")
                time.sleep(0.002)
            sample = {"order": order, "healthz_s": time.perf_counter() - t0, "rss0": vmrss_kib(proc.pid)}
            for n, model in enumerate(order):
                with open(bodies[(model, 1)], "rb") as f:
                    body = f.read()
                r0 = time.perf_counter()
                check_prediction(port, f"/models/{model}/predict", body, expected[(model, 1)])
                r1 = time.perf_counter()
                sample[f"rss{n + 1}"] = vmrss_kib(proc.pid)
                sample[f"load{n + 1}_s"] = r1 - r0
                if n == 0:
                    sample["first_prediction_s"] = r1 - t0
            samples.append(sample)
        finally:
            PROCS.stop(proc)
    return samples


WORKERS_MEMORY = (1, 4)        # process counts compared: `--workers 4` should cost at most 1.5x one process


def measure_workers_memory(args):
    """Total PSS of the service's processes (gunicorn's parent and its workers) serving a ~200 MB model
    preloaded, after 32 predictions: one process, then --workers 4 (which share what the parent loaded)."""
    import make_models
    store, body_path, expected = make_models.build_forest(args.tmp)
    size = os.path.getsize(os.path.join(store, "forest", "1", "model.joblib"))
    with open(body_path, "rb") as f:
        body = f.read()
    totals = {}
    for workers in WORKERS_MEMORY:
        port = free_port()
        logpath = os.path.join(args.tmp, f"memory-w{workers}.log")
        proc = PROCS.start([PY, SERVICE, "--store", store, "--port", str(port), "--preload", "--workers",
                            str(workers)], clean_env(), REPO, logpath)
        try:
            wait_until(proc, lambda: http_call(port, "GET", "/readyz", timeout=5)[0] == 200, 300,
                       f"--workers {workers} ready with the forest loaded")
            for _ in range(32):
                check_prediction(port, "/models/forest/predict", body, expected)
            processes = 1 if workers == 1 else workers + 1          # gunicorn's parent and every worker
            wait_until(proc, lambda: len(group_pids(proc.pid)) == processes, 60, f"{processes} processes")
            pids = group_pids(proc.pid)
            totals[workers] = (len(pids), sum(pss_kib(pid) for pid in pids))
        finally:
            PROCS.stop(proc)
    return {"artifact_bytes": size, "totals": totals}


def workers_memory_lines(memory):
    """The report's rows for measure_workers_memory, with the target (4 workers at most 1.5x one process)."""
    (_, one), (processes, four) = memory["totals"][1], memory["totals"][4]
    ratio = four / one
    return ["| service.py processes | processes | total PSS |", "|---|---:|---:|",
            f"| one process, `--preload` | 1 | {fmt_mib(one)} |",
            f"| `--workers 4 --preload` (gunicorn's parent and 4 workers) | {processes} | {fmt_mib(four)} |",
            "",
            f"The model: ExtraTreesRegressor, 9 trees, a {memory['artifact_bytes'] / 2 ** 20:.0f} MiB artifact. "
            f"`--workers 4` vs one process: {ratio:.2f}x (target at most 1.5x: {'met' if ratio <= 1.5 else '**NOT met**'})."]


###############################################################################
# Report ######################################################################
###############################################################################

def fmt_rate(x):
    return "–" if x is None else f"{x:,.0f}"


def point_cell(result, show):
    """One table cell: `show(result)`, flagged with its errors; a dash where nothing was measured."""
    if result is None:
        return "–"
    errors = f" **{result['errors']} errors**" if result["errors"] else ""
    return show(result) + errors


def fmt_ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_us(x):
    return "–" if x is None else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def fmt_mib(kib):
    return f"{kib / 1024:.1f} MiB"


def machine_info(features, wrk, peer_envs=None):
    info = {"peers": [f"{env['name']}: " + ", ".join(f"{d} {v}" for d, v in env["versions"].items())
                      + f" (in {env['folder']})" for env in (peer_envs or {}).values()]}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor() or "unknown"
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    info["cores"] = os.cpu_count()
    try:
        info["usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["usable"] = info["cores"]
    try:
        with open("/proc/meminfo") as f:
            info["mem"] = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        info["mem"] = "?"
    info["os"] = f"{platform.system()} {platform.release()}"
    info["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    from importlib import metadata
    versions = []
    for dist in ("scikit-learn", "numpy", "scipy", "joblib", "bottle", "waitress", "flask", "werkzeug", "gunicorn"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    info["packages"] = ", ".join(versions)
    info["service"] = features.get("version") or "?"
    info["wrk"] = wrk
    return info


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def floor_at(by, model, rows, c):
    """The better Bottle floor (1 or 8 threads) at a point, by median req/s; None if neither ran."""
    cands = [r for r in (by.get((k, model, rows, c)) for k in ("bottle-t1", "bottle-t8")) if r]
    return max(cands, key=lambda r: r["rps"]) if cands else None


def ratio_cell(a, b):
    """a ÷ b by median req/s, the two figures, and the lowest and highest ratio within one round (the two
    servers measured back to back, so the machine's drift cancels out)."""
    if not a or not b:
        return "–"
    per_round = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    spread = f"; rounds {min(per_round):.2f}–{max(per_round):.2f}" if len(per_round) > 1 else ""
    return f"**{a['rps'] / b['rps']:.2f}×** ({fmt_rate(a['rps'])} / {fmt_rate(b['rps'])}{spread})"


def spread_line(results, labels):
    """How far apart the rounds of one point were: (max - min) / median req/s, typical and worst."""
    spreads = sorted([((max(r["rounds"]) - min(r["rounds"])) / r["rps"], r) for r in results
                      if len(r["rounds"]) > 1 and r["rps"]], key=lambda pair: pair[0])
    if not spreads:
        return "one round: no spread to show"
    worst, r = spreads[-1]
    return (f"spread of a point's req/s across rounds ((max − min) / median): median "
            f"{100 * spreads[len(spreads) // 2][0]:.0f} %, largest {100 * worst:.0f} % "
            f"({labels[r['server']]}, {r['model']}, {r['rows']} rows, c={r['c']})")


def build_report(args, info, raw, imp, cold, servers, results, notes, failures, peer_failures, load_before,
                 load_after, elapsed, features_flags=frozenset(), memory=None):
    by = {(r["server"], r["model"], r["rows"], r["c"]): r for r in results}
    labels = {s.key: s.label for s in servers}
    lines = []
    out = lines.append
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out(f"# model-service benchmark ({stamp}{', QUICK smoke run: figures are noisy' if args.quick else ''})")
    out("")
    out(f"- Machine: {info['cpu']}, {info['cores']} cores ({info['usable']} usable), {info['mem']} RAM, {info['os']}")
    la = "/".join(f"{x:.2f}" for x in load_before) if load_before else "?"
    lb = "/".join(f"{x:.2f}" for x in load_after) if load_after else "?"
    out(f"- Load average (1/5/15 min) before: {la}; after: {lb} (the load generator shares the cores with the server)")
    if load_before and load_before[0] > 0.5:
        out(f"- **The machine was busy when the run started** (1-min load average {load_before[0]:.2f} on "
            f"{info['usable']} cores): other work competed for the CPU, so figures are lower and noisier than "
            "on an idle machine; ratios measured close together in time are less affected than absolute figures.")
    out(f"- {info['python']}; {info['packages']}; {info['service']}")
    gen = info["wrk"] if not args.python_load else "Python threads (--python-load: LESS PRECISE than wrk, lower bounds)"
    warm = f"16 requests and a {args.warmup} s warm-up at c=8" if args.warmup else "a warm-up of 16 requests"
    out(f"- Load generator: {gen}; {args.duration} s per point after {warm}; {args.rounds} round"
        f"{'s' if args.rounds > 1 else ''}, every point taken round-robin across the servers (all running) in "
        f"each, the median round reported; HTTP/1.1 keep-alive on {HOST}; total run time {elapsed:.0f} s")
    out(f"- {spread_line(results, labels)}")
    for peer in info["peers"]:
        out(f"- Peer {peer}")
    out("")

    # in-process
    out("## In-process predict (no HTTP), µs, median")
    out("")
    cases = list(dict.fromkeys(r["case"] for r in raw))
    out("| case | " + " | ".join(MODELS) + " |")
    out("|---|" + "---:|" * len(MODELS))
    for case in cases:
        vals = {r["model"]: r["us"] for r in raw if r["case"] == case}
        out(f"| {case} | " + " | ".join(fmt_us(vals.get(m)) for m in MODELS) + " |")
    out("")

    # single rows
    out("## One-row requests: req/s (p50 / p99 ms)")
    out("")
    cols = [(m, c) for m in MODELS for c in CONCURRENCY]
    out("| server | " + " | ".join(f"{m} c={c}" for m, c in cols) + " |")
    out("|---|" + "---:|" * len(cols))
    for s in servers:
        cells = [point_cell(by.get((s.key, m, 1, c)),
                            lambda r: f"{fmt_rate(r['rps'])} ({fmt_ms(r['p50'])} / {fmt_ms(r['p99'])})")
                 for m, c in cols]
        out(f"| {s.label} | " + " | ".join(cells) + " |")
    out("")

    # bulk
    out(f"## {BULK_ROWS}-row requests at c={BULK_CONCURRENCY}: rows/s (req/s; p50 / p99 ms)")
    out("")
    out("| server | " + " | ".join(MODELS) + " |")
    out("|---|" + "---:|" * len(MODELS))
    for s in servers:
        cells = [point_cell(by.get((s.key, m, BULK_ROWS, BULK_CONCURRENCY)),
                            lambda r: f"{fmt_rate(r['rows_s'])} ({fmt_rate(r['rps'])}; "
                                      f"{fmt_ms(r['p50'])} / {fmt_ms(r['p99'])})")
                 for m in MODELS]
        out(f"| {s.label} | " + " | ".join(cells) + " |")
    out("")

    # the tabular pipeline, on the service alone
    tabular = [(key, by[key]) for key in sorted(by) if key[1] == TABULAR]
    if tabular:
        out("## The tabular pipeline (named records with text categories): req/s (p50 / p99 ms)")
        out("")
        out("| server | rows | c | req/s (p50 / p99 ms) | rows/s |")
        out("|---|---:|---:|---:|---:|")
        labels = {s.key: s.label for s in servers}
        for (key, _, rows, c), r in tabular:
            out(f"| {labels.get(key, key)} | {rows} | {c} | {fmt_rate(r['rps'])} ({fmt_ms(r['p50'])} / "
                f"{fmt_ms(r['p99'])}) | {fmt_rate(r['rows_s'])} |")
        out("")

    # the peers, like for like
    peers = [s for s in servers if s.group == "peer"]
    if peers:
        columns = [("service", "Bottle floor at its best", lambda m, r, c: floor_at(by, m, r, c))]
        columns += [(PEER_SERVERS[p.key][4], p.label, lambda m, r, c, k=p.key: by.get((k, m, r, c)))
                    for p in peers]
        out("## The service beside the peers: its req/s ÷ theirs, per point")
        out("")
        within = f", and the lowest and highest ratio within one round (of {args.rounds})" if args.rounds > 1 else ""
        out(f"Each cell: the ratio of the median req/s (**above 1: the service answered more**), the two figures"
            f"{within}. Each column compares servers that get the same body: `service-v2` and `service-batch-v2` "
            "are the service answering MLServer's V2 body on /v2/models/NAME/infer; `service-grpc` answers the "
            "same rows over gRPC beside MLServer's gRPC port, both driven by bench/grpc_load.py's Python client; "
            "MLflow's /invocations takes the service's own body.")
        out("")
        out("| point | " + " | ".join(f"`{versus}` ÷ {title}" for versus, title, _ in columns) + " |")
        out("|---|" + "---:|" * len(columns))
        for model in MODELS:
            for rows, c in POINTS:
                cells = [ratio_cell(by.get((versus, model, rows, c)), other(model, rows, c))
                         for versus, _, other in columns]
                if any(cell != "–" for cell in cells):
                    out(f"| {model}, {rows} row{'s' if rows > 1 else ''}, c={c} | " + " | ".join(cells) + " |")
        out("")

    grpc_lines = grpc_section(by, args.rounds)
    if grpc_lines:
        lines += grpc_lines

    # cold start and memory
    out("## Cold start and memory (model-service, defaults)")
    out("")
    out("| measure | value |")
    out("|---|---:|")
    if imp:
        mods = ", ".join(f"{k}: {'yes' if imp[k] else 'no'}" for k in ("sklearn", "numpy", "scipy", "joblib"))
        out(f"| `import service`, fresh interpreter, bytecode cached (median of {imp['runs']}; max) | "
            f"{imp['median_s'] * 1e3:.0f} ms ({imp['max_s'] * 1e3:.0f} ms) |")
        out(f"| `import service` compiling service.py (no cached bytecode, one run) | {imp['first_s'] * 1e3:.0f} ms |")
        out(f"| modules `import service` pulls in | {mods} |")
        if imp["top"]:
            out("| where the import time goes (`-X importtime`, service's largest direct imports, cumulative) | "
                + ", ".join(f"{name} {us / 1e3:.0f} ms" for us, name in imp["top"]) + " |")
    if cold:
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        n = len(cold)
        out(f"| process start → first 200 on /healthz (median of {n}; max) | "
            f"{med([s['healthz_s'] for s in cold]) * 1e3:.0f} ms ({max(s['healthz_s'] for s in cold) * 1e3:.0f} ms) |")
        for model in MODELS:
            first = [s for s in cold if s["order"][0] == model]
            second = [s for s in cold if s["order"][1] == model]
            if first:
                out(f"| process start → first {model} prediction, loaded lazily as the first model "
                    f"(median of {len(first)}) | {med([s['first_prediction_s'] for s in first]):.2f} s |")
                out(f"| … of which that first {model} request (load incl. importing scikit-learn) | "
                    f"{med([s['load1_s'] for s in first]):.2f} s |")
            if second:
                out(f"| first {model} request when another model is already loaded (median of {len(second)}) | "
                    f"{med([s['load2_s'] for s in second]) * 1e3:.0f} ms |")
        out(f"| RSS, nothing loaded (median of {n}) | {fmt_mib(med([s['rss0'] for s in cold]))} |")
        for model in MODELS:
            first = [s for s in cold if s["order"][0] == model]
            second = [s for s in cold if s["order"][1] == model]
            if first:
                out(f"| + {model} loaded first (includes importing scikit-learn, numpy, scipy) | "
                    f"+{fmt_mib(med([s['rss1'] - s['rss0'] for s in first]))} |")
            if second:
                out(f"| + {model} loaded second (the model itself) | "
                    f"+{fmt_mib(med([s['rss2'] - s['rss1'] for s in second]))} |")
        out(f"| RSS with both models loaded (median of {n}) | {fmt_mib(med([s['rss2'] for s in cold]))} |")
    out("")
    if memory:
        out("## Memory of `--workers` (one copy of a preloaded model, shared)")
        out("")
        lines += workers_memory_lines(memory)
        out("")

    # targets
    out("## Targets (issue 6 item 5, tightened by issue 14 item 5; issue 16's traffic costs)")
    out("")
    out("| target | measured | needed | verdict |")
    out("|---|---|---|---|")
    for target, measured, needed, verdict in targets(by, labels, imp, cold, results, features_flags) + \
            native_and_traffic_targets(by, labels):
        out(f"| {target} | {measured} | {needed} | {verdict} |")
    out("")

    # servers and details
    out("## Servers")
    out("")
    out("| key | server | command (PORT and MODEL filled in; --store is the temporary store) |")
    out("|---|---|---|")
    for s in servers:
        out(f"| {s.key} | {s.label} | `{s.command()}` |")
    out("")
    out("## All points")
    out("")
    out("The median round of each point; p50, p99, errors and CPU are that round's.")
    out("")
    out("| server | model | rows | c | req/s | req/s in each round | rows/s | p50 ms | p99 ms | errors | "
        "server CPU % | server CPU µs/req |")
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        out(f"| {r['server']} | {r['model']} | {r['rows']} | {r['c']} | {fmt_rate(r['rps'])} | "
            f"{', '.join(fmt_rate(x) for x in r['rounds'])} | {fmt_rate(r['rows_s'])} | {fmt_ms(r['p50'])} | "
            f"{fmt_ms(r['p99'])} | {r['errors']} | {r['cpu_pct']:.0f} | {fmt_us(r['cpu_us'])} |")
    out("")
    if notes or failures or peer_failures:
        out("## Not measured")
        out("")
        for note in notes:
            out(f"- {note}")
        for prefix, lost in (("FAILED", failures), ("peer not measured", peer_failures)):
            for failure in lost:
                first, _, rest = failure.partition("\n")
                out(f"- {prefix}: {first}")
                if rest.strip():
                    out("  ```")
                    out("  " + rest.strip().replace("\n", "\n  "))
                    out("  ```")
        out("")
    return "\n".join(lines)


def grpc_section(by, rounds):
    """V2 over gRPC beside V2 over HTTP, the same service configuration and rows, both from Python threads
    (wrk speaks no gRPC): the lines of its section, or none when gRPC was not measured."""
    points = [(model, rows, c) for model in MODELS for rows, c in POINTS
              if by.get(("service-grpc", model, rows, c)) and by.get(("service-v2-py", model, rows, c))]
    if not points:
        return []
    within = f", and the lowest and highest ratio within one round (of {rounds})" if rounds > 1 else ""
    lines = ["## V2 over gRPC beside V2 over HTTP", "",
             "The same service (defaults, `--grpc-port` added) and the same rows, one V2 tensor: over gRPC as a "
             "ModelInferRequest with raw contents (tritonclient's messages, one channel per client thread), over "
             "HTTP as JSON on /v2/models/NAME/infer (one keep-alive connection per thread). Both load generators "
             "are Python threads on the same cores, so the absolute figures are lower bounds; the ratio compares "
             f"like with like. Each cell: gRPC's median req/s ÷ HTTP's (**above 1: gRPC answered more**){within}.",
             "", "| point | gRPC req/s (p50 / p99 ms) | HTTP req/s (p50 / p99 ms) | gRPC ÷ HTTP |", "|---|---:|---:|---:|"]
    for model, rows, c in points:
        grpc, http = by[("service-grpc", model, rows, c)], by[("service-v2-py", model, rows, c)]
        lines.append(f"| {model}, {rows} row{'s' if rows > 1 else ''}, c={c} | "
                     f"{fmt_rate(grpc['rps'])} ({fmt_ms(grpc['p50'])} / {fmt_ms(grpc['p99'])}) | "
                     f"{fmt_rate(http['rps'])} ({fmt_ms(http['p50'])} / {fmt_ms(http['p99'])}) | "
                     f"{ratio_cell(grpc, http)} |")
    return lines + [""]


def targets(by, labels, imp, cold, results, flags):
    """Rows of (target, measured, needed, verdict): issue 6 item 5, as issue 14 item 5 tightened it."""
    rows = []

    def get(server, model, rows_, c):
        return by.get((server, model, rows_, c))

    def floor(model, rows_, c):
        return floor_at(by, model, rows_, c)

    def verdict(ok, ratio=None, need=None):
        if ok:
            return "met"
        if ratio is not None and need:
            return f"**NOT met** ({100 * (1 - ratio / need):.0f} % short)"
        return "**NOT met**"

    def batch_verdict(ratio, p99):
        if ratio >= 1.0 and p99 < 50:
            return "met"
        gaps = ([f"{100 * (1 - ratio):.0f} % short"] if ratio < 1.0 else []) + \
            ([f"p99 {p99 / 50:.1f}× the bound"] if p99 >= 50 else [])
        return f"**NOT met** ({'; '.join(gaps)})"

    na = "n/a (not measured)"
    svc = get("service", "iris", 1, 8)
    best_floor = floor("iris", 1, 8)
    # 1. iris c=8 vs the Bottle floor at its best thread setting
    if svc and best_floor:
        ratio = svc["rps"] / best_floor["rps"]
        one_process = [r for r in results if r["model"] == "iris" and r["rows"] == 1 and r["c"] == 8
                       and r["server"] in ("service", "service-t1", "service-t8")]
        best = max(one_process, key=lambda r: r["rps"])
        extra = "" if best["server"] == "service" else (
            f"; best one-process setting, {labels[best['server']]}: {fmt_rate(best['rps'])} req/s = "
            f"{best['rps'] / best_floor['rps']:.2f}×")
        rows.append(("iris, 1 row, c=8, one process (defaults) vs Bottle floor at its best "
                     f"({labels[best_floor['server']]})",
                     f"{fmt_rate(svc['rps'])} vs {fmt_rate(best_floor['rps'])} req/s = {ratio:.2f}×{extra}",
                     "≥ 1.3×", verdict(ratio >= 1.3, ratio, 1.3)))
    else:
        rows.append(("iris c=8 vs Bottle floor", na, "≥ 1.3×", na))
    # 2. vs the seed's Flask approach
    for key, name in (("flask-dev", "the seed's Flask app on Flask's dev server"),
                      ("flask-waitress", "the seed's Flask app under waitress (stricter reading)")):
        flask = get(key, "iris", 1, 8)
        if svc and flask:
            ratio = svc["rps"] / flask["rps"]
            rows.append((f"iris, 1 row, c=8, one process (defaults) vs {name}",
                         f"{fmt_rate(svc['rps'])} vs {fmt_rate(flask['rps'])} req/s = {ratio:.2f}×",
                         "≥ 2×", verdict(ratio >= 2.0, ratio, 2.0)))
        else:
            rows.append((f"iris c=8 vs {name}", na, "≥ 2×", na))
    # 3. forest c=32 with batching vs the Bottle floor's iris c=32
    batch, floor32 = get("service-batch", "rf", 1, 32), floor("iris", 1, 32)
    if batch and floor32:
        ratio = batch["rps"] / floor32["rps"]
        rows.append(("rf, 1 row, c=32, batching on vs Bottle floor's **iris** c=32 at its best; p99",
                     f"{fmt_rate(batch['rps'])} vs {fmt_rate(floor32['rps'])} req/s = {ratio:.2f}×; "
                     f"p99 {fmt_ms(batch['p99'])} ms",
                     "≥ 1.0×, p99 < 50 ms", batch_verdict(ratio, batch["p99"])))
    else:
        plain = get("service", "rf", 1, 32)
        hint = ""
        if plain and floor32:
            hint = (f"; without batching: {fmt_rate(plain['rps'])} vs {fmt_rate(floor32['rps'])} req/s = "
                    f"{plain['rps'] / floor32['rps']:.2f}×, p99 {fmt_ms(plain['p99'])} ms")
        if "--max-batch-size" in flags:
            rows.append(("rf, 1 row, c=32, batching on vs Bottle floor's iris c=32", na + hint,
                         "≥ 1.0×, p99 < 50 ms", na))
        else:
            rows.append(("rf, 1 row, c=32, batching on vs Bottle floor's iris c=32",
                         f"not measurable: service.py has no batching flags{hint}",
                         "≥ 1.0×, p99 < 50 ms", "**NOT met** (no batching)"))
    # 4. 64-row rows/s vs the floor on the same body
    for model in MODELS:
        s64, f64 = get("service", model, BULK_ROWS, BULK_CONCURRENCY), floor(model, BULK_ROWS, BULK_CONCURRENCY)
        if s64 and f64:
            ratio = s64["rows_s"] / f64["rows_s"]
            rows.append((f"{model}, {BULK_ROWS}-row requests, c={BULK_CONCURRENCY}: rows/s vs Bottle floor at its best "
                         f"({labels[f64['server']]})",
                         f"{fmt_rate(s64['rows_s'])} vs {fmt_rate(f64['rows_s'])} rows/s = {ratio:.2f}×",
                         "≥ 0.9×", verdict(ratio >= 0.9, ratio, 0.9)))
        else:
            rows.append((f"{model}, {BULK_ROWS}-row rows/s vs Bottle floor", na, "≥ 0.9×", na))
    # 5. workers 2 vs 1
    w2 = get("service-w2", "iris", 1, 8)
    if w2 and svc:
        ratio = w2["rps"] / svc["rps"]
        rows.append(("iris, 1 row, c=8: --workers 2 vs one process (same threads)",
                     f"{fmt_rate(w2['rps'])} vs {fmt_rate(svc['rps'])} req/s = {ratio:.2f}×",
                     "≥ 1.7×", verdict(ratio >= 1.7, ratio, 1.7)))
    elif "--workers" in flags:
        rows.append(("iris c=8: --workers 2 vs one process", na, "≥ 1.7×", na))
    else:
        rows.append(("iris c=8: --workers 2 vs one process", "not measurable: service.py has no --workers flag",
                     "≥ 1.7×", "**NOT met** (no --workers)"))
    # 6. cold start
    if imp:
        rows.append(("`import service`: time, and without scikit-learn",
                     f"{imp['median_s'] * 1e3:.0f} ms; scikit-learn imported: {'yes' if imp['sklearn'] else 'no'}",
                     "< 150 ms, no",
                     "met" if imp["median_s"] < 0.150 and not imp["sklearn"] else "**NOT met** (" + "; ".join(
                         ([f"{100 * (imp['median_s'] / 0.150 - 1):.0f} % over"] if imp["median_s"] >= 0.150 else [])
                         + (["imports scikit-learn"] if imp["sklearn"] else [])) + ")"))
    else:
        rows.append(("`import service`", na, "< 150 ms, no scikit-learn", na))
    if cold:
        worst = max(s["healthz_s"] for s in cold)
        rows.append(("/healthz answering after process start (worst of the cold starts)",
                     f"{worst * 1e3:.0f} ms", "< 1 s", verdict(worst < 1.0)))
    else:
        rows.append(("/healthz after process start", na, "< 1 s", na))
    return rows


def native_and_traffic_targets(by, labels):
    """Issue 14's forest without batching (the native predictor's gain: ≥ 5× the Bottle floor on the same
    forest), and issue 16's costs of traffic management, iris at c=8 beside the defaults measured in the
    same rounds: a shadow version may not move the client's p50 by more than 5 %, the payload log not cost
    more than 10 % of throughput."""
    rows = []
    plain, floor_rf = by.get(("service", "rf", 1, 32)), floor_at(by, "rf", 1, 32)
    if plain and floor_rf:
        ratio = plain["rps"] / floor_rf["rps"]
        rows.append((f"rf, 1 row, c=32, one process, no batching vs Bottle floor on the same forest "
                     f"({labels[floor_rf['server']]})",
                     f"{fmt_rate(plain['rps'])} vs {fmt_rate(floor_rf['rps'])} req/s = {ratio:.2f}×", "≥ 5×",
                     "met" if ratio >= 5 else f"**NOT met** ({100 * (1 - ratio / 5):.0f} % short)"))
    else:
        rows.append(("rf c=32 vs Bottle floor on the same forest", "n/a (not measured)", "≥ 5×", "n/a"))
    base = by.get(("service", "iris", 1, 8))
    shadow, logged = by.get(("service-shadow", "iris", 1, 8)), by.get(("service-log", "iris", 1, 8))
    if base and shadow:
        ratio = shadow["p50"] / base["p50"]
        rows.append(("iris, 1 row, c=8: p50 with a shadow version vs without",
                     f"{fmt_ms(shadow['p50'])} vs {fmt_ms(base['p50'])} ms = {ratio:.2f}×", "≤ 1.05×",
                     "met" if ratio <= 1.05 else f"**NOT met** ({100 * (ratio - 1):.0f} % slower)"))
    else:
        rows.append(("iris c=8: p50 with a shadow version", "n/a (not measured)", "≤ 1.05×", "n/a"))
    if base and logged:
        ratio = logged["rps"] / base["rps"]
        rows.append(("iris, 1 row, c=8: req/s with --payload-log (every request) vs without",
                     f"{fmt_rate(logged['rps'])} vs {fmt_rate(base['rps'])} req/s = {ratio:.2f}×", "≥ 0.9×",
                     "met" if ratio >= 0.9 else f"**NOT met** ({100 * (0.9 - ratio):.0f} points short)"))
    else:
        rows.append(("iris c=8: req/s with --payload-log", "n/a (not measured)", "≥ 0.9×", "n/a"))
    return rows


###############################################################################
# Main ########################################################################
###############################################################################

def ensure_package(module, dist, args, notes, why):
    """True when `module` imports in this Python; else install `dist` with pip (unless --no-install)."""
    def importable():
        return subprocess.run([PY, "-c", f"import {module}"], capture_output=True, env=clean_env()).returncode == 0
    if importable():
        return True
    if args.no_install:
        notes.append(f"{why}: not measured, {dist} is not installed (pip install {dist}; --no-install was given)")
        return False
    log(f"{dist} is not installed in this environment ({PY}); {why} needs it.")
    log(f"Installing it now: {os.path.basename(PY)} -m pip install {dist}   (--no-install skips this and those rows)")
    out = subprocess.run([PY, "-m", "pip", "install", "-q", dist])
    if out.returncode == 0 and importable():
        return True
    notes.append(f"{why}: not measured, `pip install {dist}` failed")
    return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark model-service against the minimal Bottle server and the seed's Flask app "
                    "(see bench/README.md). Report on stdout (Markdown), progress on stderr.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 s per point, one round, a short warm-up, fewer repeats (about 4 minutes)")
    p.add_argument("--duration", type=int, default=None, metavar="S",
                   help="seconds of load per point (default 4; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=None, metavar="S",
                   help="seconds of warm-up load (wrk, c=8) per server and model before its points, after 16 "
                        "requests that every run sends (default 1; 0 with --quick: those 16 only)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="take every point N times, round-robin across the running servers, and report the "
                        "median round (default 3; 1 with --quick)")
    p.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    p.add_argument("--only", metavar="KEYS",
                   help="comma-separated server keys or groups to run (bottle, flask, service, bottle-t1, "
                        "service-t8, ...); default all. The service configurations that --peers compares "
                        "with are measured whatever this says")
    p.add_argument("--peers", metavar="KEYS",
                   help="also measure the servers a user would pick instead, each pip-installed into its own "
                        "virtual environment on first use: " + ", ".join(PEER_SERVERS) + ", or groups "
                        + ", ".join(PEER_ENVS) + ", all (e.g. --peers mlserver,mlflow); default none")
    p.add_argument("--peers-dir", metavar="DIR", default=os.environ.get("BENCH_PEERS_DIR"),
                   help="where the peers' virtual environments are installed and reused by later runs "
                        "(default: $BENCH_PEERS_DIR, else the run's temporary folder, removed at the end)")
    p.add_argument("--batching-args", default="--max-batch-size 32 --max-latency-ms 5 --threads 32",
                   metavar="ARGS", help="flags of the batching run, when service.py has batching flags "
                                        "(default: %(default)r)")
    p.add_argument("--python-load", action="store_true",
                   help="use a small Python load generator instead of wrk (less precise; for machines without wrk)")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install missing Flask/gunicorn or peers; skip the rows that need them")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (models, bodies, server logs)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory of --workers: total PSS with a ~200 MB model, one process vs --workers 4 "
                        "(a few minutes; no wrk needed; gunicorn must be installed)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 1 if args.quick else 4
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1, --warmup at least 0")
    unknown = set(args.peers.split(",") if args.peers else ()) - set(PEER_SERVERS) - set(PEER_ENVS) - {"all"}
    if unknown:
        p.error(f"--peers: unknown {', '.join(sorted(unknown))} (known: {', '.join(PEER_SERVERS)}, groups "
                f"{', '.join(PEER_ENVS)}, all)")
    args.peers_dir_given = bool(args.peers_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    wrk = None
    if not args.python_load and not args.memory_only:
        wrk = wrk_version() if shutil.which("wrk") else None
        if wrk is None:
            log("wrk is not installed: it is the load generator this benchmark uses.\n"
                "  Debian/Ubuntu: sudo apt-get update && sudo apt-get install wrk   (other Linux: your package manager's wrk)\n"
                "  (or run with --python-load for a rougher, Python-based load generator)")
            return 2
    load = run_python_load if args.python_load else run_wrk

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started with SIGINT ignored
    args.tmp = tempfile.mkdtemp(prefix="model-service-bench-")
    args.peers_dir = os.path.abspath(args.peers_dir) if args.peers_dir else os.path.join(args.tmp, "peers")
    notes, failures, peer_failures, results = [], [], [], []

    def lost(server, why):
        """A peer that fails is listed as not measured; it does not fail the run."""
        (peer_failures if server.group == "peer" else failures).append(why)
    try:
        load_before = loadavg()
        log(f"temporary folder: {args.tmp}")
        if args.memory_only:
            log("memory: a ~200 MB model, one process and --workers 4...")
            print("\n".join(workers_memory_lines(measure_workers_memory(args))), flush=True)
            return 0
        features = service_features()
        have_flask = ensure_package("flask", "flask", args, notes, "the seed's Flask baseline")
        have_gunicorn = "--workers" not in features["flags"] or ensure_package(
            "gunicorn", "gunicorn", args, notes, "model-service --workers")
        have_grpc = "--grpc-port" in features["flags"] and ensure_package(
            "grpc, tritonclient.grpc", "tritonclient[grpc]", args, notes, "model-service over gRPC") and \
            ensure_package("grpc", "grpcio", args, notes, "model-service over gRPC")
        log("training the reference models (iris LogisticRegression, 100-tree RandomForest)...")
        import make_models
        import raw_predict
        built = make_models.build(args.tmp)
        store, bodies, artifacts = built["store"], built["bodies"], built["artifacts"]
        peers, peer_envs = peer_servers(args, built, notes)
        servers = build_servers(args, features, built, notes, have_flask, have_gunicorn, have_grpc, peers)

        log("in-process predict cost...")
        raw = raw_predict.measure(artifacts, bodies, quick=args.quick)
        imp = cold = None
        log("cold start: import service...")
        try:
            imp = measure_import(3 if args.quick else 7, args.tmp)
        except Unmeasured as error:
            failures.append(f"import service: {error}")
        log("cold start and memory: fresh service processes...")
        try:
            cold = measure_cold(args, store, bodies, built["expected"], 2 if args.quick else 4)
        except (Unmeasured, OSError, http.client.HTTPException) as error:
            failures.append(f"cold start: {error}")
            log(f"  FAILED: cold start: {error}")

        memory = None
        if have_gunicorn and "--workers" in features["flags"]:
            log("memory: a ~200 MB model, one process and --workers 4...")
            try:
                memory = measure_workers_memory(args)
            except (Unmeasured, OSError, http.client.HTTPException) as error:
                failures.append(f"memory of --workers: {error}")
                log(f"  FAILED: memory of --workers: {error}")

        by_protocol = {"v1": bodies, "v2": built["bodies_v2"], GRPC: built["bodies_v2"]}
        running = []
        for server in servers:
            log(f"starting {server.label}, checking its answers, warming it up...")
            running += [(server, model, proc, port) for model, proc, port in
                        start_server(args, load, server, by_protocol, built["expected"], lost)]
        measure_rounds(args, load, running, by_protocol, built["expected"], results, lost)
        PROCS.stop_all()
        report = build_report(args, machine_info(features, wrk, peer_envs), raw, imp, cold, servers, results,
                              notes, failures, peer_failures, load_before, loadavg(), time.perf_counter() - started,
                              features["flags"], memory)
        print(report, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(report + "\n")
            log(f"report written to {args.out}")
        return 1 if failures else 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process this run started")
        return 130
    except Unmeasured as error:
        log(f"benchmark failed: {error}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        PROCS.stop_all()
        if args.keep:
            log(f"kept {args.tmp}")
        else:
            shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
