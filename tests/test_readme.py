"""README's examples are part of the product: this test runs every one of them, in README's order, and
checks that each prints what README shows.

README writes its examples so that they can be run; the conventions:

- A ```console block holds commands (lines starting with `$ `), each followed by what it prints. Its
  first line may be `# server: [VAR=value ...] python service.py [FLAGS]`: the service its commands
  talk to, which the reader starts in another terminal. The test starts it with exactly those
  variables and flags (and no other MODEL_SERVICE_* variable), plus `--port` with a free port that
  replaces 8080 in the commands (the only place the service's address may appear). A block without that
  line talks to no service.
- A ```python or ```json block right below a line that ends in `` `PATH`: `` is a file the reader
  saves at PATH; the test writes it there (under a temporary name, then renamed) at that point.
- Everything runs in one scratch folder holding a copy of service.py and of the demo store
  (model_store/), in README's order, each command in bash, with `python` the interpreter running the
  tests. A service keeps running while the blocks that follow name the same command, so an example
  may depend on what the ones above it did (a trained model, a published version).
- What a command prints must be what README shows, character for character, but for two allowances
  that README's "How to read the examples" states (`PYTHONPATH=. python tests/test_readme.py` prints
  what every example prints now, to paste):
  - a number with a decimal point or an exponent may differ from the one shown by up to 0.001 (0.1 %
    of numbers above 1): a model trained on another machine, or even a shipped one run there, rounds
    differently (another BLAS library or CPU kernel), and its solver may stop an iteration sooner or
    later (which moves lbfgs' probabilities of README's small fits by about 1e-4);
  - `…` stands for what changes from run to run: in a JSON answer the keys not shown (the keys shown
    must be there, with the values shown); in other output, any text (a file's size and sha256).
- The service takes up a published version or a new settings file at its next looks at the store, a few
  seconds later. Before a command whose answer names the version that answers it, or shows a model's
  status, the test waits for that state in the model's status (`GET /models/<name>`): the version
  serving the route the command asks, the labels, split and shadow shown; STATE_TIMEOUT seconds at
  most, then it fails saying what it waited for. Then it runs the command once.
"""

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import requests

from support import ROOT, LiveServer, free_port, wait_until


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


README = read("README.md")
README_ADDRESS = "127.0.0.1:8080"
README_GRPC_PORT = "8081"             # README's --grpc-port: a free port in its place, as for 8080
SERVER = "# server: "
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SAVED_AS = re.compile(r"`([\w./-]+)`:$")


def commands(lines):
    """[(command, expected output)] from a console block's lines."""
    pairs = []
    for line in lines:
        if line.startswith("$ "):
            pairs.append([line[2:], []])
        else:
            assert pairs, f"output before any command: {line!r}"
            pairs[-1][1].append(line)
    return [(command, "\n".join(output)) for command, output in pairs]


def steps(text):
    """README's runnable steps, in order: ("file", path, content) and ("console", server or None, commands)."""
    found = []
    for match in FENCE.finditer(text):
        kind, body = match.groups()
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        saved = SAVED_AS.search(above)
        if kind in ("python", "json") and saved:
            found.append(("file", saved.group(1), body))
        elif kind == "console":
            lines = body.splitlines()
            server = lines.pop(0)[len(SERVER):] if lines and lines[0].startswith(SERVER) else None
            found.append(("console", server, commands(lines)))
    return found


STEPS = steps(README)
EXAMPLES = [pair for step in STEPS if step[0] == "console" for pair in step[2]]


TOLERANCE = {"rel_tol": 1e-3, "abs_tol": 1e-3}     # README: "up to 0.001 (0.1 % of numbers above 1)"
FLOAT = r"-?\d+(?:\.\d+(?:[eE][-+]?\d+)?|[eE][-+]?\d+)"
FLOAT_WORD = re.compile(rf"(?<![\w.]){FLOAT}(?![\w.])")   # not a part of 1.9.1 or of a name


def close(expected, actual):
    """Floats within the tolerance; anything else exactly, type included (1 is not 1.0)."""
    if type(expected) is float and type(actual) is float:
        return math.isclose(expected, actual, **TOLERANCE)
    return type(actual) is type(expected) and actual == expected


def holds(expected, actual):
    """Objects hold at least the keys shown, with the values shown; lists keep their length."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(key in actual and holds(value, actual[key])
                                                for key, value in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(actual) == len(expected) and all(map(holds, expected, actual))
    return close(expected, actual)


def abridged_json(expected):
    """The JSON value of an output README abridges with `…`, or None when it is not JSON."""
    with contextlib.suppress(ValueError):
        return json.loads(expected.replace(",…", "").replace("…", ""))
    return None


def shows(expected, printed):
    """Whether `printed` is what README shows as `expected` (see the module's docstring)."""
    shown = abridged_json(expected) if "…" in expected else None
    if shown is not None:
        with contextlib.suppress(ValueError):
            return holds(shown, json.loads(printed))
        return False
    pattern, numbers = [], []
    for piece in re.split(f"(…|{FLOAT_WORD.pattern})", expected):
        if piece == "…":
            pattern.append(".*?")
        elif piece and FLOAT_WORD.fullmatch(piece):
            pattern.append(f"({FLOAT_WORD.pattern})")
            numbers.append(float(piece))
        else:
            pattern.append(re.escape(piece or ""))
    match = re.fullmatch("".join(pattern), printed, re.S)
    return match is not None and all(map(close, numbers, map(float, match.groups())))


STATE_KEYS = ("latest_version", "served_versions", "labels", "traffic", "shadow")   # what a status example awaits
STATE_TIMEOUT = 30


def awaited_state(command, expected):
    """(model, what it waits for, check(status)) the model's status must pass before `command`, or None."""
    path = re.search(r"127\.0\.0\.1:8080(/[^\s'\"?]*)", command)
    answer = abridged_json(expected) if path else None
    if not isinstance(answer, dict):
        return None
    model, version = answer.get("model", answer.get("model_name")), answer.get("version", answer.get("model_version"))
    if model and version and "/versions/" not in path[1]:        # a prediction, from a label or the default route
        label = re.search(r"/labels/([^/:]+)", path[1])
        if label:
            return model, f"label {label[1]!r} to name version {version}", \
                lambda status: status["labels"].get(label[1]) == version
        return model, f"version {version} to answer requests that name none", lambda status: version in (
            [target["version"] for target in status["traffic"]] if status["traffic"] else [status["latest_version"]])
    if re.fullmatch(r"/models/[^/]+", path[1]) and "name" in answer:     # a model's status
        shown = {key: answer[key] for key in STATE_KEYS if key in answer}
        return answer["name"], f"its status to show {json.dumps(shown)}", lambda status: holds(shown, status)
    return None


class Session:
    """The scratch folder the examples run in, and the service the current block talks to."""

    def __init__(self, folder):
        self.folder = folder
        shutil.copy(os.path.join(ROOT, "service.py"), folder)
        shutil.copytree(os.path.join(ROOT, "model_store"), os.path.join(folder, "model_store"))
        self.server, self.address, self.headers, self.stack = None, None, {}, contextlib.ExitStack()
        python = os.path.dirname(sys.executable)
        self.env = dict(os.environ, PATH=python + os.pathsep + os.environ["PATH"])

    def save(self, path, content):
        target = os.path.join(self.folder, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(content)
        os.replace(target + ".tmp", target)

    def serve(self, server):
        """Have `server` (README's command line) running, started with exactly its variables and flags."""
        if server == self.server:
            return
        self.stop()
        words = shlex.split(server)
        env = {}
        while "=" in words[0]:
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert words[:2] == ["python", "service.py"], server
        port, self.grpc_port = free_port(), str(free_port())
        flags = [self.grpc_port if word == README_GRPC_PORT else word for word in words[2:]]
        command = [sys.executable, "service.py", *flags, "--port", str(port)]
        self.stack.enter_context(LiveServer(command, port, env=env, cwd=self.folder, pythonpath=()))
        self.server, self.address = server, f"127.0.0.1:{port}"
        token = env.get("MODEL_SERVICE_AUTH_TOKENS", "").split(",")[0]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def stop(self):
        self.stack.close()
        self.server, self.address = None, None

    def run(self, command):
        """What `command` prints (stdout, without its last newline), run in bash in the scratch folder."""
        if self.address:
            command = command.replace(README_ADDRESS, self.address).replace(f"127.0.0.1:{README_GRPC_PORT}",
                                                                            f"127.0.0.1:{self.grpc_port}")
        else:
            assert README_ADDRESS not in command, f"a block that calls the service needs a '{SERVER}' line: {command}"
        done = subprocess.run(["bash", "-c", command], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stderr}"
        return done.stdout.removesuffix("\n")

    def check(self, command, expected):
        """What `command` prints, run once the service is in the state its expected output shows."""
        state = awaited_state(command, expected) if self.address else None
        if state:
            model, what, ready = state
            seen = []

            def in_state():
                answer = requests.get(f"http://{self.address}/models/{model}", headers=self.headers, timeout=10)
                seen[:] = [answer.text]
                return answer.status_code == 200 and ready(answer.json())
            try:
                wait_until(in_state, timeout=STATE_TIMEOUT, interval=0.1, what=f"model {model!r}: {what}")
            except AssertionError as error:
                raise AssertionError(f"{error}, before `{command}`; its status: {seen[0]}") from None
        return self.run(command)

    def play(self, step, report):
        """Run one step; report(command, expected, printed) for each command."""
        if step[0] == "file":
            self.save(step[1], step[2])
            return
        _, server, pairs = step
        if server:
            self.serve(server)
        elif self.server:
            self.stop()
        for command, expected in pairs:
            report(command, expected, self.check(command, expected))


def test_readme_has_examples_for_every_kind_of_call():
    commands_run = " ".join(command for command, _ in EXAMPLES)
    for path in ("/models/iris/predict", "/versions/1/predict", "/models/diabetes/predict",
                 "/models/sentiment/predict", "/predict/", "-X DELETE", "/labels/stable/predict",
                 "/admin/rescan", "/v1/models/", "/v2/models/", "/invocations", "python train.py",
                 "python service.py export"):
        assert path in commands_run, path
    assert len(EXAMPLES) >= 30


def test_an_output_is_shown_exactly_unless_abridged():
    assert shows('{"a":1,"b":0.1}', '{"a":1,"b":0.1}')
    assert not shows('{"a":1,"b":0.1}', '{"b":0.1,"a":1}')                # the text itself, key order included
    assert not shows('{"a":1,"b":0.1}', '{"a":1, "b":0.1}') and not shows('{"a":1}', '{"a":2}')
    assert shows('{"a":1,…}', '{"a":1,"b":2}') and shows('{"a":{…},…}', '{"a":{"c":3},"b":2}')
    assert not shows('{"a":1,…}', '{"a":1.0,"b":2}') and not shows('{"a":[1,…]}', '{"a":[1,2]}')
    assert not shows('{"a":[{"c":1,…}],…}', '{"a":[{"c":1},{"c":2}]}')   # lists keep their length
    assert shows("wrote a.json (… bytes, sha256 …): identical", "wrote a.json (3164 bytes, sha256 5d3a): identical")
    assert not shows("wrote a.json (… bytes): identical", "wrote b.json (3164 bytes): identical")


def test_numbers_with_a_fraction_may_differ_by_the_stated_tolerance_only():
    """README's allowance: another machine's last digits, or its solver's iteration more or less; no more."""
    assert shows('{"p":[0.8725437097781775,0.004788125423846804]}', '{"p":[0.8725437097781777,0.0047881254238468]}')
    assert shows('{"p":[0.8725437097781775,0.0047881254238468],…}', '{"p":[0.87262949141,0.00477243988],"q":1}')
    assert shows('[203.57490370381896]', '[203.68]') and shows('1.4480920327393706e-08', '3.1e-07')
    assert shows("[[0.1, 0.9]]", "[[0.1005, 0.8995]]") and not shows("[[0.1, 0.9]]", "[[0.102, 0.898]]")
    assert not shows('[203.57490370381896]', '[203.9]') and not shows('{"p":[0.87],…}', '{"p":[0.875],"q":1}')
    assert not shows('{"n":1}', '{"n":1.0}') and not shows("version 1.9.1", "version 1.9.2")


def test_an_answer_naming_its_version_or_a_status_waits_for_that_state_first():
    """No example races the service's next look at the store: each that names the version answering it (but
    by its URL) or shows a split or a shadow waits until the model's status says so."""
    for command, expected in EXAMPLES:
        answer = abridged_json(expected)
        if isinstance(answer, dict) and ({"version", "model_version"} & set(answer) and "/versions/" not in command
                                         or {"traffic", "shadow"} & set(answer)):
            assert awaited_state(command, expected) is not None, command
    published = "curl -s http://127.0.0.1:8080/models/wine/predict -d '[[1, 2, 3, 4]]'"
    _, _, ready = awaited_state(published, '{"model":"wine","version":"2","predictions":["class_0"]}')
    assert ready({"latest_version": "2", "traffic": None}) and not ready({"latest_version": "1", "traffic": None})
    assert ready({"latest_version": "1", "traffic": [{"target": "2", "version": "2", "share": 1.0}]})
    labelled = published.replace("/predict", "/labels/stable/predict")
    _, _, ready = awaited_state(labelled, '{"model":"wine","version":"2"}')
    assert ready({"labels": {"stable": "2"}}) and not ready({"labels": {"stable": "1"}})
    status = "curl -s http://127.0.0.1:8080/models/wine"
    _, _, ready = awaited_state(status, '{"name":"wine",…,"shadow":{"compared":1,…}}')
    assert ready({"shadow": {"compared": 1, "identical": 1}}) and not ready({"shadow": {"compared": 0}})


def test_every_shell_example_that_calls_the_service_is_run():
    """Examples in ```sh blocks are not run, so none of them may call the service: those belong in ```console."""
    for kind, body in FENCE.findall(README):
        if kind != "console":
            assert "curl " not in body, body


def test_every_console_block_that_calls_the_service_names_its_server():
    for _, server, pairs in (step for step in STEPS if step[0] == "console"):
        if any(README_ADDRESS in command for command, _ in pairs):
            assert server, pairs[0][0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_every_example_prints_what_readme_shows(tmp_path):
    session = Session(tmp_path)
    failures = []

    def report(command, expected, printed):
        if not shows(expected, printed):
            failures.append(f"$ {command}\nREADME shows:\n{expected}\nit prints:\n{printed}")

    try:
        for step in STEPS:
            session.play(step, report)
    finally:
        session.stop()
    assert not failures, "\n\n".join(failures)


def test_readme_test_command_is_what_ci_runs():
    ci = read(".ci", "run")
    command = "pip install '.[test]' && python -m pytest"
    assert command in README and command in ci


def test_readme_configuration_table_lists_every_setting():
    import service
    for setting in service.SETTINGS:
        assert f"`{setting.flag} " in README and f"`{setting.env}`" in README, setting.field


if __name__ == "__main__":
    # PYTHONPATH=. python tests/test_readme.py: run every example and print what it prints now, to paste into README.
    import tempfile

    def show(command, expected, printed):
        mark = "" if shows(expected, printed) else "   <-- README shows otherwise"
        print(f"$ {command}{mark}\n{printed}")

    with tempfile.TemporaryDirectory() as scratch:
        session = Session(scratch)
        try:
            for step in STEPS:
                session.play(step, show)
        finally:
            session.stop()
