"""The command line and configuration, without sockets: flags, environment, defaults, errors,
the WSGI entry points, import cost and packaging."""

import configparser
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import bottle
import pytest
import webtest

import service
from support import ROOT, write_artifact

FLAGS = ["--store", "--host", "--port", "--server", "--threads", "--default-model", "--max-body-bytes",
         "--max-rows", "--max-depth", "--load-retry-seconds", "--poll-interval", "--preload", "--max-loaded",
         "--idle-unload", "--safe-pickle", "--trust", "--strict-versions", "--admin-token", "--cors-origins",
         "--allowed-hosts", "--shutdown-timeout", "--log-level", "--workers", "--access-log", "--max-batch-size",
         "--max-latency-ms", "--max-url-bytes", "--max-inflight", "--max-predict-seconds", "--auth-tokens",
         "--payload-log", "--payload-log-sample", "--native", "--log-format", "--connection-timeout",
         "--grpc-port", "--sklearn-threads", "--json-max-nodes", "--json-max-width", "--json-max-categories",
         "--json-max-array-bytes"]


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch):
    for key in list(os.environ):
        if key.startswith(service.ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture
def empty_store(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    return root


class FakeServe:
    """Stands in for service.serve: records what main would serve, serves nothing."""

    def __init__(self, raises=None):
        self.calls = []
        self.raises = raises

    def __call__(self, app, config):
        self.calls.append((app, config))
        if self.raises:
            raise self.raises

    @property
    def config(self):
        assert len(self.calls) == 1
        return self.calls[0][1]


def run_main(argv, serve=None):
    serve = serve or FakeServe()
    code = service.main(argv, serve=serve)
    return code, serve


def exit_code_and_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        service.main(argv, serve=FakeServe())
    return exit_info.value.code, capsys.readouterr().err


###############################################################################
# --help and --version
###############################################################################


def test_help_exits_0_and_mentions_every_flag_and_environment_variable(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_info:
        service.main(["--help"], serve=FakeServe())
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert flag in text, flag
        env = "MODEL_SERVICE_" + flag[2:].replace("-", "_").upper()
        assert env in text, env
    assert "127.0.0.1" in text and "waitress" in text


def test_help_covers_exactly_the_config_fields():
    settings = {setting.flag for setting in service.SETTINGS}
    assert settings == set(FLAGS)
    assert {setting.field for setting in service.SETTINGS} == {f.name for f in
                                                               dataclasses.fields(service.Config)}


def test_python_service_py_version_prints_the_version():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == f"model-service {service.__version__}"


###############################################################################
# main(argv, serve=fake): flags, environment, defaults
###############################################################################


def test_main_with_defaults_serves_waitress_on_127_0_0_1_and_returns_0(empty_store):
    code, serve = run_main(["--store", str(empty_store)])
    assert code == 0
    config = serve.config
    assert config.host == "127.0.0.1" and config.server == "waitress"
    assert config.port == 8080 and config.threads == 4
    assert config == service.Config(store=str(empty_store))


def test_main_hands_serve_an_app_built_on_that_config_with_the_store_scanned(tmp_path, iris_classifier):
    write_artifact(tmp_path / "store" / "iris.joblib", iris_classifier, "joblib")
    code, serve = run_main(["--store", str(tmp_path / "store"), "--max-rows", "7"])
    assert code == 0
    app, config = serve.calls[0]
    assert isinstance(app, service.ServiceApp)
    assert app.config is config and config.max_rows == 7
    registry = app.registry
    assert registry.ready and registry.names() == ["iris"]


def test_every_flag_reaches_the_config(empty_store):
    code, serve = run_main(["--store", str(empty_store), "--host", "localhost", "--port", "9001",
                            "--server", "wsgiref", "--threads", "7", "--default-model", "iris",
                            "--max-body-bytes", "1234", "--max-rows", "55", "--max-depth", "9",
                            "--load-retry-seconds", "2.5", "--poll-interval", "0.5", "--log-level", "debug",
                            "--preload", "iris, diabetes", "--max-loaded", "3", "--idle-unload", "60",
                            "--admin-token", "s3cret", "--shutdown-timeout", "2"])
    assert code == 0
    assert serve.config == service.Config(
        store=str(empty_store), host="localhost", port=9001, server="wsgiref", threads=7, default_model="iris",
        max_body_bytes=1234, max_rows=55, max_depth=9, load_retry_seconds=2.5, poll_interval=0.5,
        log_level="DEBUG", preload=("iris", "diabetes"), max_loaded=3, idle_unload=60.0, admin_token="s3cret",
        shutdown_timeout=2.0)


@pytest.mark.parametrize("argv", [["--preload"], ["--preload", "all"], ["--preload", "ALL"], ["--preload", "*"]])
def test_preload_alone_or_all_means_every_model(argv, empty_store):
    code, serve = run_main(["--store", str(empty_store), *argv])
    assert code == 0 and serve.config.preload == service.ALL_MODELS


def test_bare_preload_before_another_flag_still_means_all(empty_store):
    code, serve = run_main(["--preload", "--store", str(empty_store)])
    assert code == 0 and serve.config.preload == service.ALL_MODELS and serve.config.store == str(empty_store)


def test_the_admin_token_never_shows_in_the_config_repr_or_the_log(empty_store, caplog):
    caplog.set_level(logging.DEBUG)
    code, serve = run_main(["--store", str(empty_store), "--admin-token", "hunter2-secret"])
    assert code == 0 and serve.config.admin_token == "hunter2-secret"
    assert "hunter2-secret" not in repr(serve.config) and "hunter2-secret" not in caplog.text


def test_environment_reaches_the_config_and_a_flag_beats_it(empty_store, monkeypatch):
    monkeypatch.setenv("MODEL_SERVICE_STORE", str(empty_store))
    monkeypatch.setenv("MODEL_SERVICE_PORT", "9000")
    monkeypatch.setenv("MODEL_SERVICE_THREADS", "8")
    monkeypatch.setenv("MODEL_SERVICE_LOG_LEVEL", "warning")
    code, serve = run_main(["--port", "9001"])
    assert code == 0
    config = serve.config
    assert config.port == 9001                     # flag > environment
    assert config.threads == 8 and config.log_level == "WARNING"   # environment > default
    assert config.store == str(empty_store)
    assert config.host == "127.0.0.1" and config.server == "waitress"   # defaults


def test_a_flag_overrides_a_bad_environment_value(empty_store, monkeypatch):
    monkeypatch.setenv("MODEL_SERVICE_PORT", "abc")
    code, serve = run_main(["--store", str(empty_store), "--port", "9002"])
    assert code == 0 and serve.config.port == 9002


def test_keyboard_interrupt_while_serving_returns_0(empty_store):
    code, _ = run_main(["--store", str(empty_store)], serve=FakeServe(raises=KeyboardInterrupt()))
    assert code == 0


def test_an_os_error_while_serving_returns_1_and_logs_why(empty_store, caplog):
    with caplog.at_level(logging.ERROR, logger="service"):
        code, _ = run_main(["--store", str(empty_store), "--port", "9003"],
                           serve=FakeServe(raises=OSError(98, "Address already in use")))
    assert code == 1
    assert "cannot serve on 127.0.0.1:9003" in caplog.text and "Address already in use" in caplog.text


def test_an_address_waitress_cannot_bind_returns_1_and_logs_why_not_a_traceback(empty_store, caplog):
    """waitress refuses an unresolvable --host with a ValueError, which once ended main in a traceback."""
    with caplog.at_level(logging.ERROR, logger="service"):
        code = service.main(["--store", str(empty_store), "--host", "not a host", "--port", "0"])
    assert code == 1
    assert "cannot serve on not a host:0: Invalid host/port specified" in caplog.text


###############################################################################
# Bad values: exit 2 with a message naming the setting
###############################################################################


BAD_FLAGS = [
    (["--port", "70000"], ["--port", "0-65535", "70000"]),
    (["--port", "abc"], ["--port", "must be a whole number, not 'abc'"]),
    (["--port", "-1"], ["--port", "-1"]),
    (["--threads", "0"], ["--threads", "from 1 to 1024", "'0'"]),
    (["--threads", "100000000000000000000"], ["--threads", "from 1 to 1024"]),     # starting them aborted
    (["--workers", "2000"], ["--workers", "from 1 to 1024"]),
    (["--max-body-bytes", "1e3"], ["--max-body-bytes", "'1e3'"]),
    (["--max-rows", "0"], ["--max-rows", "positive integer"]),
    (["--max-depth", "-3"], ["--max-depth", "positive integer"]),
    (["--load-retry-seconds", "-1"], ["--load-retry-seconds", ">= 0"]),
    (["--load-retry-seconds", "inf"], ["--load-retry-seconds", "finite"]),
    (["--load-retry-seconds", "nan"], ["--load-retry-seconds", "finite"]),
    (["--poll-interval", "soon"], ["--poll-interval", "must be a number, not 'soon'"]),
    (["--log-level", "LOUD"], ["--log-level", "DEBUG, INFO, WARNING, ERROR, CRITICAL", "'LOUD'"]),
    (["--server", "nosuch"], ["--server", "unknown server 'nosuch'", "waitress"]),
    (["--default-model", "../x"], ["--default-model", "invalid model name '../x'"]),
    (["--preload", "iris,../x"], ["--preload", "invalid model name '../x'"]),
    (["--preload", " , "], ["--preload", "name the models to preload"]),
    (["--max-loaded", "-1"], ["--max-loaded", ">= 0"]),
    (["--idle-unload", "-5"], ["--idle-unload", ">= 0"]),
    (["--shutdown-timeout", "inf"], ["--shutdown-timeout", "finite"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag", "model-service --help lists the options"]),
]


def assert_one_line(error):
    """A refusal at start is its one line: the usage of every option is for --help alone."""
    assert error.startswith("model-service: error: ") and error.count("\n") == 1, error
    assert "usage:" not in error


@pytest.mark.parametrize("argv, fragments", BAD_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FLAGS])
def test_bad_flag_values_exit_2_with_one_line_naming_the_flag(argv, fragments, empty_store, capsys):
    code, error = exit_code_and_error(["--store", str(empty_store), *argv], capsys)
    assert code == 2
    assert_one_line(error)
    for fragment in fragments:
        assert fragment in error, (fragment, error)


@pytest.mark.parametrize("variable, value", [
    ("MODEL_SERVICE_PORT", "abc"),
    ("MODEL_SERVICE_THREADS", "0"),
    ("MODEL_SERVICE_LOG_LEVEL", "LOUD"),
    ("MODEL_SERVICE_SERVER", "nosuch"),
    ("MODEL_SERVICE_DEFAULT_MODEL", "a/b"),
    ("MODEL_SERVICE_LOAD_RETRY_SECONDS", "soon"),
    ("MODEL_SERVICE_PRELOAD", "a/b"),
    ("MODEL_SERVICE_MAX_LOADED", "many"),
])
def test_a_bad_environment_value_exits_2_naming_the_variable(variable, value, empty_store, monkeypatch,
                                                             capsys):
    monkeypatch.setenv(variable, value)
    code, error = exit_code_and_error(["--store", str(empty_store)], capsys)
    assert code == 2
    assert_one_line(error)
    assert f"model-service: error: {variable}:" in error and repr(value) in error, error


def test_a_store_that_is_not_a_folder_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "file.joblib").write_bytes(b"not a folder")
    for store, what in ((tmp_path / "missing", "no such folder"), (tmp_path / "file.joblib", "not a folder")):
        code, error = exit_code_and_error(["--store", str(store)], capsys)
        assert code == 2
        assert error == f"model-service: error: --store {store}: {what}\n"


def test_a_store_from_the_environment_or_the_default_that_is_not_a_folder_says_where_it_came_from(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_SERVICE_STORE", str(tmp_path / "missing"))
    code, error = exit_code_and_error([], capsys)
    assert code == 2 and error == f"model-service: error: MODEL_SERVICE_STORE {tmp_path / 'missing'}: no such folder\n"
    monkeypatch.delenv("MODEL_SERVICE_STORE")
    monkeypatch.chdir(tmp_path)
    code, error = exit_code_and_error([], capsys)
    assert code == 2
    assert_one_line(error)
    assert "--store model_store (the default): no such folder here" in error and "--store DIR" in error


def test_a_payload_log_folder_that_cannot_be_made_exits_2_with_one_line(empty_store, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"")
    code, error = exit_code_and_error(["--store", str(empty_store), "--payload-log", str(tmp_path / "file" / "log")],
                                      capsys)
    assert code == 2
    assert_one_line(error)
    assert f"--payload-log {tmp_path / 'file' / 'log'}:" in error


def test_the_command_line_exits_2_with_one_line_for_a_missing_store(tmp_path):
    """What a newcomer sees, from a real process: one line on stderr, exit code 2, no usage, naming the command as
    it was run."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "--store", str(tmp_path / "nope")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"python service.py: error: --store {tmp_path / 'nope'}: no such folder\n"


def _missing_bottle_adapter():
    """A --server name bottle knows whose package is not installed (no socket is ever opened)."""
    for name, module in [("gevent", "gevent"), ("eventlet", "eventlet"), ("paste", "paste"),
                         ("tornado", "tornado"), ("twisted", "twisted"), ("bjoern", "bjoern")]:
        if name in bottle.server_names and importlib.util.find_spec(module) is None:
            return name
    return None


def test_a_server_adapter_that_is_not_installed_fails_with_a_message_not_a_traceback(empty_store, capsys,
                                                                                     caplog):
    name = _missing_bottle_adapter()
    if name is None:
        pytest.skip("every candidate adapter is installed; cannot show the missing-adapter case")
    try:
        code = service.main(["--store", str(empty_store), "--server", name, "--port", "0"])
    except SystemExit as exit_error:
        code = exit_error.code
    assert code not in (0, None)
    assert name in capsys.readouterr().err + caplog.text


###############################################################################
# Config.load directly
###############################################################################


def test_config_load_with_nothing_set_gives_the_defaults():
    config = service.Config.load({}, environ={})
    assert config == service.Config()
    assert (config.store, config.host, config.port, config.server) == ("model_store", "127.0.0.1", 8080,
                                                                       "waitress")
    assert config.default_model is None and config.log_level == "INFO"


def test_config_load_precedence_is_flag_then_environment_then_default():
    environ = {"MODEL_SERVICE_PORT": "9000", "MODEL_SERVICE_THREADS": "6"}
    config = service.Config.load({"port": "9001", "threads": None}, environ=environ)
    assert config.port == 9001            # flag
    assert config.threads == 6            # None flag: unset, so the environment
    assert config.max_rows == 100_000     # default


def test_config_load_ignores_empty_environment_variables():
    environ = {"MODEL_SERVICE_HOST": "", "MODEL_SERVICE_PORT": "", "MODEL_SERVICE_LOG_LEVEL": ""}
    assert service.Config.load({}, environ=environ) == service.Config()


def test_config_load_ignores_an_empty_flag_when_nothing_else_is_set():
    assert service.Config.load({"threads": "", "store": ""}, environ={}) == service.Config()


def test_config_load_an_empty_flag_falls_through_to_the_environment():
    config = service.Config.load({"threads": ""}, environ={"MODEL_SERVICE_THREADS": "3"})
    assert config.threads == 3


def test_config_load_converts_every_setting():
    environ = {"MODEL_SERVICE_STORE": "/srv/models", "MODEL_SERVICE_HOST": "localhost",
               "MODEL_SERVICE_PORT": " 0 ", "MODEL_SERVICE_SERVER": "wsgiref", "MODEL_SERVICE_THREADS": "12",
               "MODEL_SERVICE_DEFAULT_MODEL": "iris_v2.final", "MODEL_SERVICE_MAX_BODY_BYTES": "2048",
               "MODEL_SERVICE_MAX_ROWS": "10", "MODEL_SERVICE_MAX_DEPTH": "5",
               "MODEL_SERVICE_LOAD_RETRY_SECONDS": "0", "MODEL_SERVICE_POLL_INTERVAL": "0",
               "MODEL_SERVICE_LOG_LEVEL": "error", "MODEL_SERVICE_PRELOAD": "all", "MODEL_SERVICE_MAX_LOADED": "0",
               "MODEL_SERVICE_IDLE_UNLOAD": "1.5", "MODEL_SERVICE_ADMIN_TOKEN": "t",
               "MODEL_SERVICE_SHUTDOWN_TIMEOUT": "0"}
    config = service.Config.load({}, environ=environ)
    assert config == service.Config(store="/srv/models", host="localhost", port=0, server="wsgiref", threads=12,
                                    default_model="iris_v2.final", max_body_bytes=2048, max_rows=10,
                                    max_depth=5, load_retry_seconds=0.0, poll_interval=0.0, log_level="ERROR",
                                    preload=service.ALL_MODELS, max_loaded=0, idle_unload=1.5, admin_token="t",
                                    shutdown_timeout=0.0)
    assert isinstance(config.port, int) and isinstance(config.load_retry_seconds, float)


def test_config_load_ignores_variables_without_the_prefix_and_unknown_ones():
    environ = {"PORT": "1", "MODEL_PORT": "2", "MODEL_SERVICE_NOSUCH": "3"}
    assert service.Config.load({}, environ=environ) == service.Config()


def test_config_load_error_names_the_flag_or_the_variable():
    with pytest.raises(ValueError, match=r"^MODEL_SERVICE_MAX_ROWS: .*'-5'"):
        service.Config.load({}, environ={"MODEL_SERVICE_MAX_ROWS": "-5"})
    with pytest.raises(ValueError, match=r"^--max-rows: .*'-5'"):
        service.Config.load({"max_rows": "-5"}, environ={})


def test_config_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MODEL_SERVICE_MAX_DEPTH", "17")
    assert service.Config.load({}).max_depth == 17


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.Config().port = 1


###############################################################################
# WSGI entry points and create_app
###############################################################################


def test_app_and_application_are_the_same_service_app():
    assert service.app is service.application
    assert isinstance(service.app, service.ServiceApp)
    assert isinstance(service.app.config, service.Config)


def test_create_app_applies_keyword_options(tmp_path, iris, iris_classifier, make_app):
    write_artifact(tmp_path / "store" / "iris.joblib", iris_classifier, "joblib")
    app = make_app(store=tmp_path / "store", max_rows=5)
    config = app.config
    assert config.max_rows == 5 and config.store == str(tmp_path / "store")
    client = webtest.TestApp(app)
    six = client.post_json("/models/iris/predict", {"instances": iris[0][:6].tolist()}, expect_errors=True)
    assert six.status_int == 400 and six.content_type == "application/json"
    assert "over the limit of 5" in six.json["error"]
    five = client.post_json("/models/iris/predict", {"instances": iris[0][:5].tolist()})
    assert five.json["predictions"] == iris_classifier.predict(iris[0][:5]).tolist()


def test_create_app_options_override_the_environment(tmp_path, monkeypatch, make_app):
    monkeypatch.setenv("MODEL_SERVICE_MAX_ROWS", "3")
    monkeypatch.setenv("MODEL_SERVICE_MAX_DEPTH", "4")
    config = make_app(store=tmp_path, max_depth=8).config
    assert config.max_rows == 3 and config.max_depth == 8 and config.store == str(tmp_path)


def test_create_app_with_an_explicit_config_ignores_the_environment(tmp_path, monkeypatch, make_app):
    monkeypatch.setenv("MODEL_SERVICE_MAX_ROWS", "3")
    app = make_app(config=service.Config(store=str(tmp_path)))
    assert app.config.max_rows == 100_000


def test_creating_the_app_touches_no_disk_the_first_request_does(make_app):
    app = make_app(store="/nonexistent/model/store")
    registry = app.registry
    assert not registry.ready
    client = webtest.TestApp(app)
    assert client.get("/healthz").json == {"status": "alive"}
    ready = client.get("/readyz", expect_errors=True)
    assert ready.status_int == 503 and "not a folder" in ready.json["error"]
    models = client.get("/models", expect_errors=True)
    assert models.status_int == 503 and models.json["code"] == "model_unavailable"


def test_the_store_scan_happens_on_the_first_request_not_at_create_app(tmp_path, iris_classifier, make_app):
    root = tmp_path / "store"
    root.mkdir()
    app = make_app(store=root)
    write_artifact(root / "late.joblib", iris_classifier, "joblib")     # published after create_app
    assert webtest.TestApp(app).get("/").json["models"] == ["late"]


def test_a_symlinked_store_is_resolved_at_the_first_request_not_at_create_app(tmp_path, iris_classifier, make_app):
    old, new = tmp_path / "old", tmp_path / "new"
    write_artifact(old / "old_model.joblib", iris_classifier, "joblib")
    write_artifact(new / "new_model.joblib", iris_classifier, "joblib")
    link = tmp_path / "current"
    link.symlink_to(old, target_is_directory=True)
    app = make_app(store=link)
    link.unlink()
    link.symlink_to(new, target_is_directory=True)                       # the operator switches releases
    assert webtest.TestApp(app).get("/").json["models"] == ["new_model"]


def test_importing_service_loads_no_numeric_stack():
    heavy = ["sklearn", "numpy", "pandas", "scipy", "joblib", "prometheus_client"]
    code = ("import json, sys, service; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    env = {key: value for key, value in os.environ.items() if not key.startswith(service.ENV_PREFIX)}
    env.update(PYTHONPATH=ROOT, MODEL_SERVICE_STORE="/nonexistent/model/store")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    assert result.stderr == ""        # no warnings at import, even with a missing store


###############################################################################
# Packaging
###############################################################################


def test_setup_cfg_declares_the_model_service_console_script():
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(os.path.join(ROOT, "setup.cfg"))
    scripts = [line.strip() for line in parser["options.entry_points"]["console_scripts"].splitlines()
               if line.strip()]
    assert "model-service = service:main" in scripts
    entry = importlib.metadata.EntryPoint(name="model-service", value="service:main", group="console_scripts")
    assert entry.load() is service.main
    assert parser["options"]["py_modules"].strip() == "service"
    assert parser["metadata"]["version"].strip() == "attr: service.__version__"



def test_the_python_readme_names_is_what_setup_cfg_requires_and_what_the_demos_scikit_learn_needs():
    """The quick start works on every Python README names: the demo's pickles answer only under the scikit-learn
    that wrote them, and that release installs only on the Pythons its Requires-Python admits."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        named = re.search(r"\(Python (\d+\.\d+) or newer", handle.read()).group(1)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"))
    assert parser["options"]["python_requires"].strip() == f">={named}"
    with open(os.path.join(ROOT, "model_store", "diabetes.json"), encoding="utf-8") as handle:
        written_by = json.load(handle)["sklearn_version"]
    import sklearn

    if sklearn.__version__ != written_by:
        pytest.skip(f"the demo store was written by scikit-learn {written_by}, this is {sklearn.__version__}")
    assert importlib.metadata.metadata("scikit-learn")["Requires-Python"] == f">={named}"


@pytest.mark.slow
def test_the_demo_store_is_rebuilt_byte_for_byte(tmp_path):
    """scripts/build_demo_store.py writes the same bytes at every run on one machine (README says so)."""
    trees = []
    for run in ("first", "second"):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_demo_store.py"), str(tmp_path / run)],
                       check=True, capture_output=True, timeout=300)
        paths = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path / run) for name in names]
        trees.append({os.path.relpath(path, tmp_path / run): pathlib.Path(path).read_bytes() for path in paths})
    assert sorted(trees[0]) == ["diabetes.json", "iris/1/model.joblib", "iris/2/model.joblib",
                                "iris/model-settings.json", "sentiment.pkl"]
    assert trees[0] == trees[1]

def _source_layout():
    """(banner titles in order, {top-level name: line}, the line of Part II's banner, of the entry points', tree)."""
    import ast
    import re

    with open(os.path.join(ROOT, "service.py"), encoding="utf-8") as handle:
        source = handle.read()
    lines = source.split("\n")
    banners = [(number, match[1]) for number, line in enumerate(lines, 1)
               for match in [re.fullmatch(r"# (.+?) #+", line)] if match and lines[number - 2] == "#" * 79]
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [name for target in getattr(node, "targets", ()) for name in ast.walk(target)]
        for target in targets:
            name = getattr(target, "name", None) or getattr(target, "id", None)
            if name:
                defined.setdefault(name, node.lineno)
    return banners, defined, tree


def test_the_banners_are_the_docstrings_table_of_contents_in_order():
    banners, _, _ = _source_layout()
    listed = [line[4:28].strip() for line in service.__doc__.split("\n")
              if line.startswith("    ") and not line.startswith("     ") and line[4:5].isupper()]
    assert [title for _, title in banners] == listed


def test_part_one_reaches_the_appendices_only_through_their_entry_points_at_run_time():
    """Part I (the request path) names nothing of Part II but the entry points the docstring lists, and only
    inside functions, so it reads, and imports, without them."""
    import ast

    banners, defined, tree = _source_layout()
    part_two = next(number for number, title in banners if title.startswith("Part II"))
    end = next(number for number, title in banners if title == "WSGI entry points")
    entries = service.__doc__.split("Part II: appendices", 1)[1].split("WSGI entry points", 1)[0]
    allowed = set(re.findall(r"\b[A-Za-z_]\w*\b", entries.split("\n", 1)[1].replace(":", " : ")))
    appendix = {name for name, line in defined.items() if part_two < line < end}
    for node in tree.body:
        if node.lineno > part_two:
            break
        at_import = node if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in appendix:
                assert sub.id in allowed, f"line {sub.lineno}: Part I uses {sub.id}, not an appendix's entry point"
                assert at_import is None, f"line {sub.lineno}: {sub.id} is used at import, before it is defined"


###############################################################################
# Mistakes that say what to do
###############################################################################


def test_a_mistyped_flag_names_the_command_as_run_and_the_closest_flag(tmp_path, empty_store, capsys):
    code, error = exit_code_and_error(["--store", str(empty_store), "--prot", "9000"], capsys)
    assert code == 2
    assert_one_line(error)
    assert "unrecognized arguments: --prot 9000; did you mean --port? (model-service --help lists the options)" in error
    result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "--max-rwos=5"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == (
        "python service.py: error: unrecognized arguments: --max-rwos=5; did you mean --max-rows? "
        "(python service.py --help lists the options)\n")


def test_help_lists_every_other_command_and_each_one_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        service.main(["--help"], serve=FakeServe())
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("export", "replay", "drift", "profile"):
        assert f"model-service {name} " in text, name
        with pytest.raises(SystemExit) as exit_info:
            service.main([name, "--help"], serve=FakeServe())
        assert exit_info.value.code == 0 and f"model-service {name}" in capsys.readouterr().out


def test_a_mistyped_variable_is_warned_about_at_start_with_the_closest_setting(empty_store, monkeypatch, caplog):
    monkeypatch.setattr(service, "_warned_variables", set())       # (warned once per process)
    monkeypatch.setenv("MODEL_SERVICE_PROT", "9000")
    monkeypatch.setenv("MODEL_SERVICE_NOTHING_LIKE_ANY", "1")
    with caplog.at_level(logging.WARNING, logger="service"):
        code, _ = run_main(["--store", str(empty_store)])
    assert code == 0
    warned = [record.getMessage() for record in caplog.records]
    assert "environment variable MODEL_SERVICE_PROT is no setting of the service and is ignored; did you mean " \
           "MODEL_SERVICE_PORT?" in warned
    assert "environment variable MODEL_SERVICE_NOTHING_LIKE_ANY is no setting of the service and is ignored " \
           "(settings are MODEL_SERVICE_<OPTION>: see --help)" in warned


def test_embedded_a_mistyped_variable_is_warned_about_at_the_first_request(empty_store, monkeypatch, caplog):
    monkeypatch.setenv("MODEL_SERVICE_STORE", str(empty_store))
    monkeypatch.setenv("MODEL_SERVICE_MAX_ROW", "5")
    monkeypatch.setattr(service, "_warned_variables", set())
    app = service.create_app()
    try:
        with caplog.at_level(logging.WARNING, logger="service"):
            webtest.TestApp(app).get("/healthz")
            webtest.TestApp(app).get("/healthz")
    finally:
        app.registry.stop_watching()
    warned = [record.getMessage() for record in caplog.records if "MODEL_SERVICE_MAX_ROW" in record.getMessage()]
    assert warned == ["environment variable MODEL_SERVICE_MAX_ROW is no setting of the service and is ignored; "
                      "did you mean MODEL_SERVICE_MAX_ROWS?"], "once"


def test_preloading_a_model_the_store_lacks_is_warned_about_at_start(tmp_path, caplog, iris_classifier):
    write_artifact(tmp_path / "iris.joblib", iris_classifier, "joblib")
    with caplog.at_level(logging.WARNING, logger="service"):
        code, _ = run_main(["--store", str(tmp_path), "--preload", "irs,iris"])
    assert code == 0
    warned = [record.getMessage() for record in caplog.records if "--preload" in record.getMessage()]
    assert warned == [f"--preload names 'irs', which is not in the model store {tmp_path}; did you mean 'iris'?"]


def test_a_port_in_use_says_how_to_pick_another(tmp_path, empty_store):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(ROOT, "service.py"), "--store", str(empty_store),
                                 "--port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}: [Errno {__import__('errno').EADDRINUSE}]" in result.stderr
    assert "another process holds the port: stop it, or pick another with --port N (or MODEL_SERVICE_PORT)" \
        in result.stderr
    assert "Traceback" not in result.stderr


###############################################################################
# README as a whole
###############################################################################


def _readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_readmes_python_export_snippet_runs_as_written(tmp_path, monkeypatch):
    """README's ```python block of the export section (the one that exports `fitted_estimator`) defines what it
    uses and runs."""
    snippet, = [block for block in re.findall(r"^```python\n(.*?)^```", _readme(), re.M | re.S)
                if "export_json_model(fitted_estimator" in block]
    assert "fitted_estimator =" in snippet
    (tmp_path / "model_store").mkdir()
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert (tmp_path / "model_store" / "mymodel.json").is_file()
    assert namespace["estimator"].predict([[5.1, 3.5, 1.4, 0.2]]).tolist() == \
        namespace["fitted_estimator"].predict([[5.1, 3.5, 1.4, 0.2]]).tolist()


def test_readmes_links_within_the_page_name_its_headings():
    """Every [text](#anchor) of README names a heading (GitHub's anchors: lower case, punctuation dropped,
    spaces as hyphens), so the path and the checklist lead somewhere."""
    text = _readme()
    headings = {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
                for title in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)}
    anchors = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert anchors and anchors <= headings, sorted(anchors - headings)
