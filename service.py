"""model-service: serve trained scikit-learn models over HTTP from one file.

Quick start::

    python service.py                      # serve ./model_store on 127.0.0.1:8080 (waitress)
    waitress-serve service:app             # embed: configured from MODEL_SERVICE_* variables
    gunicorn service:app                   # any WSGI host; `application` is the same object

Store layout (found automatically, both side by side)::

    model_store/<name>.<ext>                    one version, "1"
    model_store/<name>/<version>/<file>.<ext>   versions are positive integers; the highest serves

``<ext>`` is ``.joblib``, ``.pkl``/``.pickle`` or ``.json`` (models as data, see
"JSON model format").  pickle and joblib artifacts run code when loaded: only put
artifacts you trust in the store, or load them with ``--safe-pickle`` (a restricted
unpickler, see "Restricted unpickling").

Sections (``grep -n '^# .*####' service.py``), in two parts.  Part I is the request
path in the order data flows; each of its sections uses only what is above it::

    Imports and logging     the standard library and bottle only
    Small utilities         clipping, names, strict JSON, output comparison
    Errors                  ServiceError and its statuses: the one error path
    Configuration           one table of settings: flag, variable, default, help
    Model store             find: artifacts and settings (model-settings.json) on disk
    Restricted unpickling   --safe-pickle: only the types a model is made of
    Artifact loaders        load: bytes to an estimator, by format
    Servables               a loaded model, its batcher and its input checks
    Metrics                 what GET /metrics counts
    Agreement               how two versions' answers compare (shadow, replay)
    Model registry          hold: versions, lifecycle, residency
    Request bodies          read and parse a body within its bounds; request ids
    Protocol codecs         native, TF Serving/KServe V1, V2, MLflow, the seed's routes
    Background work         time limits, and the payload log and shadow off the request path
    HTTP application        the route table, the predict core, the error responder
    OpenAPI                 /openapi.json from the route table
    Serving                 waitress (drained on exit) or gunicorn workers
    Replay                  ``python service.py replay``: a payload log scored again
    Command line            ``python service.py``

Part II holds the appendices, which Part I reaches only through the entry points
listed here, and only at run time (tests/test_cli.py checks both rules)::

    Part II: appendices
    Native predictors       plain-numpy answers, proved bit-identical at load: attach_native
    JSON model format       models as data, and export: load_json_model, dump_json_model,
                            save_json_model, export_json_model, export_command
    Web console             the page GET / serves to browsers: CONSOLE_HTML, CONSOLE_CSP

    WSGI entry points       ``service:app``, and ``python service.py`` (after everything it needs)
"""

__version__ = "0.1.0"

__all__ = [
    "Config", "ServiceError", "ArtifactRef", "ModelStore", "LoadedModel",
    "ModelRegistry", "create_app", "serve", "main", "app", "application",
    "dump_json_model", "save_json_model", "load_json_model", "export_json_model", "JsonLimits", "to_jsonable",
]


###############################################################################
# Imports and logging #########################################################
###############################################################################
# Only the standard library and bottle here: numpy, scikit-learn, joblib and
# pandas are imported when the first model is loaded, so `import service` stays
# fast and a bad store can never break it.

import argparse
import ast
import atexit
import base64
import bisect
import collections
import contextlib
import contextvars
import dataclasses
import functools
import gc
import hashlib
import heapq
import hmac
import importlib
import itertools
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref

import bottle

logger = logging.getLogger("service")

SERVICE_NAME = "model-service"

# One line format for the service's lines and, under --workers, gunicorn's (--log-format text|json).
LOG_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
LOG_FIELDS = ("request_id", "model", "version")        # what a line concerns, in its JSON object when known
_log_fields = contextvars.ContextVar("service_log_fields", default={})


@contextlib.contextmanager
def _logging_about(**fields):
    """Lines logged in this block (in this thread) concern these LOG_FIELDS (e.g. the model being loaded)."""
    token = _log_fields.set({**_log_fields.get(), **fields})
    try:
        yield
    finally:
        _log_fields.reset(token)


class JsonLogFormatter(logging.Formatter):
    """--log-format json: one JSON object per line: time (UTC), level, logger, pid, message, then request_id,
    model and version when the line concerns them (the record's `extra`, else the _logging_about of its thread)."""

    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "pid": record.process,
                 "message": record.getMessage()}
        fields = _log_fields.get()
        for field in LOG_FIELDS:
            value = getattr(record, field, None) or fields.get(field)
            if value is not None:
                entry[field] = str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_formatter(log_format="text"):
    return JsonLogFormatter() if log_format == "json" else logging.Formatter(LOG_TEXT_FORMAT)


def log_handler(log_format="text"):
    """A handler writing the service's line format to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_formatter(log_format))
    return handler


def _share_logs(config):
    """Make the service's INFO lines appear under any host, overriding none of its logging configuration.

    Run at the first request, once the host has set up its logging (waitress-serve calls
    logging.basicConfig() only after importing the app).  Only the "service" logger is touched,
    and only what the host left unset: a level (NOTSET) becomes --log-level, as waitress-serve
    does for its own logger, so a handler the host gave the root logger prints the lines; and
    when no handler anywhere would print them (gunicorn and mod_wsgi configure none), the logger
    gets one of its own, writing --log-format lines to stderr.  A host that configures the
    "service" logger's level or handlers, or the root's, keeps control.
    """
    if logger.level == logging.NOTSET:
        logger.setLevel(config.log_level)
    source, handlers = logger, []
    while source is not None:
        handlers += source.handlers
        source = source.parent if source.propagate else None
    if not any(handler.level <= logging.INFO for handler in handlers):
        logger.addHandler(log_handler(config.log_format))


###############################################################################
# Small utilities #############################################################
###############################################################################
# Helpers every later section uses: clipping text for messages, what a model name,
# version and label may be, strict JSON out of numpy values, bit-for-bit output
# comparison, and walking an estimator's parts.


def _clip(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."


def _iso_time(seconds):
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _in_background(function, *args):
    threading.Thread(target=function, args=args, name="model-loader", daemon=True).start()


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")     # used with fullmatch: "$" would let "\n" in
VERSION = re.compile(r"[1-9][0-9]{0,17}")
LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def valid_model_name(name):
    return isinstance(name, str) and MODEL_NAME.fullmatch(name) is not None and not name.endswith(".")


def to_jsonable(value):
    """Plain JSON types for numpy values of every dtype; non-finite floats become None."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    module = type(value).__module__
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            kind = value.dtype.kind
            if kind in "biu":
                return value.tolist()
            if kind == "f":
                if np.isfinite(value).all():
                    return value.tolist()
                return np.where(np.isfinite(value), value, None).tolist()
            if kind == "U":
                return value.tolist()
            return to_jsonable(value.tolist())
        if isinstance(value, np.generic):
            return to_jsonable(value.item())
    if hasattr(value, "toarray"):        # scipy sparse matrices
        return to_jsonable(value.toarray())
    if hasattr(value, "to_numpy"):       # pandas objects
        return to_jsonable(value.to_numpy())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, complex):
        return [to_jsonable(value.real), to_jsonable(value.imag)]
    return str(value)


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value):
    """Strict JSON (no NaN tokens: a value to_jsonable missed fails loudly), compact, from one encoder."""
    return _JSON_ENCODER.encode(value)


def _utf8(text):
    """The answer's bytes; a lone surrogate (a client's "\\ud800" that reached an answer) is escaped."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _same_outputs(expected, actual):
    """Equal in type, dtype, shape and every bit (NaN included); sparse matrices part by part."""
    import numpy as np

    if isinstance(expected, (tuple, list)):     # (distances, indices); a multi-output predict_proba's list
        return type(actual) is type(expected) and len(actual) == len(expected) and \
            all(_same_outputs(e, a) for e, a in zip(expected, actual))
    if hasattr(expected, "tocsr"):
        return hasattr(actual, "tocsr") and expected.format == actual.format and all(
            _same_outputs(getattr(expected.tocsr(), part), getattr(actual.tocsr(), part))
            for part in ("data", "indices", "indptr"))
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.dtype != actual.dtype or expected.shape != actual.shape:
        return False
    if expected.dtype.kind == "O":
        return expected.tolist() == actual.tolist()
    return expected.tobytes() == actual.tobytes()


def _estimator_parts(value, found, seen):
    """`value` and every estimator inside it (steps, members, fitted sub-estimators), each once."""
    if id(value) in seen:
        return found
    seen.add(id(value))
    if isinstance(value, (list, tuple)):
        for item in value:
            _estimator_parts(item, found, seen)
    elif type(value).__module__ == "numpy" and getattr(value, "dtype", None) == object:
        for item in value.ravel():
            _estimator_parts(item, found, seen)
    elif hasattr(value, "get_params") and hasattr(value, "__dict__"):
        found.append(value)
        for item in value.__dict__.values():
            _estimator_parts(item, found, seen)
    return found


def _attribute(estimator, attr):
    try:
        value = getattr(estimator, attr)
    except Exception:  # properties of unfitted or partial pipelines raise anything
        return None
    return int(value) if attr == "n_features_in_" and value is not None else value


###############################################################################
# Errors ######################################################################
###############################################################################
# Every failure the caller should see is a ServiceError carrying its status; the
# HTTP layer turns it into the one JSON error shape in one place.


class ServiceError(Exception):
    """A refusal a client sees: an HTTP status, a stable code, a message safe to show, and fields.

    Every refusal is one of these, raised wherever it is found; the HTTP application's
    one responder turns it into the protocol's JSON with its status and headers.  The
    base class is the service's own fault (500).
    """

    status = 500
    code = "internal_error"

    def __init__(self, message, headers=None, **fields):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.fields = fields

    def to_dict(self):
        return {"error": self.message, "code": self.code, **self.fields}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class NotJSON(BadRequest):
    """A body that is not JSON at all (empty, not UTF-8, no JSON syntax, a multipart form).

    The endpoint of a route that takes a body answers it with that body's example, as a 400,
    or a 415 when the Content-Type names another format or `media_type` says so (see
    `not_json_refusal`); anywhere else it is a plain 400.
    """

    def __init__(self, message, media_type=False, **fields):
        super().__init__(message, **fields)
        self.media_type = media_type        # refused for its Content-Type whatever the body holds: a 415


class Unauthorized(ServiceError):
    """401, with the challenge (WWW-Authenticate) of the realm whose token was missing."""

    status, code = 401, "unauthorized"

    def __init__(self, message, realm, **fields):
        super().__init__(message, {"WWW-Authenticate": f'Bearer realm="{realm}"'}, **fields)


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class URITooLong(ServiceError):
    status, code = 414, "uri_too_long"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class NotImplementedHere(ServiceError):
    status, code = 501, "not_implemented"


class ModelUnavailable(ServiceError):
    """503: the model (or the service) cannot answer now; Retry-After when it is worth trying again."""

    status, code = 503, "model_unavailable"

    def __init__(self, message, retry_after=None, **fields):
        super().__init__(message, {"Retry-After": str(retry_after)} if retry_after else None, **fields)
        self.retry_after = retry_after


class Misconfigured(ServiceError):
    """503 for every request of an app whose MODEL_SERVICE_* settings are invalid (`import service` still works)."""

    status, code = 503, "misconfigured"


class PredictionTimeout(ServiceError):
    """504: the prediction took longer than --max-predict-seconds."""

    status, code = 504, "prediction_timeout"


@functools.lru_cache(maxsize=None)
def error_for_status(status):
    """The ServiceError class of an HTTP status (the generic one for a status no class claims)."""
    for kind in _error_classes(ServiceError):
        if kind.status == status:
            return kind
    return type("HTTPStatusError", (ServiceError,), {"status": status, "code": "http_error"})


def _error_classes(kind):
    yield kind
    for subclass in kind.__subclasses__():
        yield from _error_classes(subclass)


class ArtifactError(Exception):
    """An artifact could not be turned into a model; the message says why."""


###############################################################################
# Configuration ###############################################################
###############################################################################
# One table drives the flags, the environment variables and the defaults, so a
# setting has exactly one source of truth: flag, then environment, then default.

ENV_PREFIX = "MODEL_SERVICE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _integer(text):
    """int(text), refused in words a reader of --help understands (int's own speak of literals and bases)."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be a whole number, not {text!r}") from None


def _number(text):
    """float(text), refused in the same words as _integer."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be a number, not {text!r}") from None


def _positive_int(text):
    value = _integer(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, not {text!r}")
    return value


def _port(text):
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number 0-65535, not {text!r}")
    return value


def _non_negative_int(text):
    value = _integer(text)
    if value < 0:
        raise ValueError(f"must be an integer >= 0, not {text!r}")
    return value


def _non_negative_float(text):
    value = _number(text)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"must be a finite number >= 0, not {text!r}")
    return value


def _fraction(text):
    value = _number(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be a number from 0 to 1, not {text!r}")
    return value


def _log_format(text):
    if str(text).lower() not in ("text", "json"):
        raise ValueError(f"must be text or json, not {text!r}")
    return str(text).lower()


def _log_level(text):
    level = str(text).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


def _server_name(text):
    if text not in bottle.server_names:
        raise ValueError(f"unknown server {text!r}; choose from {', '.join(sorted(bottle.server_names))}")
    return text


def _model_name_setting(text):
    if not valid_model_name(text):
        raise ValueError(f"invalid model name {text!r}")
    return text


def _preload_setting(text):
    """"all" (or "*") for every model, else a comma-separated list of model names."""
    if text.strip().lower() in ("all", "*"):
        return ALL_MODELS
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("name the models to preload, or 'all'")
    return tuple(_model_name_setting(name) for name in names)


ALL_MODELS = ("*",)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
PYTHON_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _boolean(text):
    word = str(text).strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, not {text!r}")


def _origin_list(text):
    """'*', or a comma-separated list of browser origins (scheme://host[:port], no path)."""
    origins = tuple(origin.strip().rstrip("/") for origin in text.split(",") if origin.strip())
    if origins == ("*",):
        return origins
    for origin in origins:
        if not ORIGIN.fullmatch(origin):
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com or http://localhost:3000")
    if not origins:
        raise ValueError("name the origins, or '*'")
    return origins


def _host_list(text):
    """A comma-separated list of host names the Host header may carry (any port)."""
    hosts = tuple(host.strip().lower() for host in text.split(",") if host.strip())
    for host in hosts:
        if not HOST_NAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not hosts:
        raise ValueError("name the hosts: localhost,127.0.0.1,models.internal")
    return hosts


ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
HOST_NAME = re.compile(r"[a-z0-9.-]{1,253}|\[?[0-9a-f:.]+\]?")


def _token_list(text):
    """Comma-separated bearer tokens, or @PATH of a file holding one per line (# comments allowed)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as handle:
                lines = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
        except OSError as error:
            raise ValueError(f"cannot read the token file {text[1:]!r}: {error.strerror}") from None
    else:
        lines = [token.strip() for token in text.split(",") if token.strip()]
    if not lines or any(len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token
                        for token in lines):
        raise ValueError("tokens must be printable ASCII without spaces, at least 16 characters each")
    return tuple(lines)


# Modules --trust never admits, nor suggests: trusting a module admits everything defined in it (and
# its submodules), and these define what runs code (eval, exec, compile, code and function
# constructors, profilers and debuggers that run strings), imports, walks to arbitrary objects
# (getattr, operator's attrgetter, inspect, gc), changes classes every model shares
# (functools.update_wrapper and total_ordering set attributes on a class), or reaches processes,
# files, the network or other deserialisers (os, posix, subprocess, io, pathlib, socket, pickle,
# marshal, numpy.load, joblib.load, pandas.read_pickle).  numpy, scipy, scikit-learn and joblib are
# here too: the restricted unpickler already admits what models need from them, one object at a
# time, and trusting them whole would admit their file readers and test helpers.  Whatever code a
# --trust module defines runs at load: name only your own modules.
_NEVER_TRUSTED = (
    "builtins", "__builtin__", "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "_posixsubprocess",
    "shutil", "importlib", "imp", "pkgutil", "zipimport", "runpy", "code", "codeop", "types", "inspect", "gc",
    "functools", "operator", "_operator", "ctypes", "_ctypes", "cffi", "pickle", "_pickle", "pickletools", "copyreg",
    "marshal", "shelve", "dbm", "io", "_io", "codecs", "pathlib", "tempfile", "glob", "fileinput", "mmap", "zipfile",
    "tarfile", "sqlite3", "linecache", "tokenize", "socket", "_socket", "ssl", "select", "selectors", "asyncio",
    "multiprocessing", "concurrent", "threading", "_thread", "signal", "resource", "pty", "platform", "webbrowser",
    "urllib", "http", "ftplib", "smtplib", "xmlrpc", "socketserver", "timeit", "trace", "profile", "cProfile", "pdb",
    "bdb", "doctest", "pydoc", "unittest", "logging", "site", "sysconfig", "ensurepip", "venv", "distutils",
    "setuptools", "pip", "idlelib", "numpy", "scipy", "sklearn", "joblib", "pandas", "dill", "cloudpickle",
)


def _never_trusted(module):
    """Whether `module` is, or is inside, or contains a module --trust may never admit."""
    return any(module == root or module.startswith(root + ".") or root.startswith(module + ".")
               for root in _NEVER_TRUSTED)


def _module_list(text):
    """A comma-separated list of Python module names (each one also covers its submodules)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("name the modules to trust: MODULE,MODULE")
    for name in names:
        if not PYTHON_MODULE.fullmatch(name):
            raise ValueError(f"{name!r} is not a Python module name")
        if _never_trusted(name):
            raise ValueError(f"{name!r} can never be trusted: it can run code or reach files, processes or the "
                             "network (name only the modules that define your own classes)")
    return names


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of SETTINGS: everything about one setting, its flag and variable derived from its field."""

    field: str
    convert: object        # text (a flag's or a variable's) to the value; ValueError says what is wrong
    default: object
    help: str
    metavar: str = None
    const: str = None      # the value of the bare flag (`--preload` alone means "all")
    secret: bool = False   # kept out of repr, and so out of logs

    @property
    def flag(self):
        return "--" + self.field.replace("_", "-")

    @property
    def env(self):
        return ENV_PREFIX + self.field.upper()


SETTINGS = (
    Setting("store", str, "model_store", "folder holding the models", "DIR"),
    Setting("host", str, "127.0.0.1", "address to bind (0.0.0.0 exposes the service to the network)", "HOST"),
    Setting("port", _port, 8080, "TCP port (0 picks a free one)", "PORT"),
    Setting("server", _server_name, "waitress", "WSGI server: waitress, wsgiref, gunicorn, ...", "NAME"),
    Setting("threads", _positive_int, 4, "worker threads (waitress; per process under --workers)", "N"),
    Setting("workers", _positive_int, 1,
            "server processes; above 1 they run under gunicorn (pip install gunicorn), forked once the --preload "
            "models are loaded, which they share",
            "N"),
    Setting("default_model", _model_name_setting, None,
            "model behind GET /predict/<sen>, POST /predict and POST /invocations (default: the only model)", "NAME"),
    Setting("max_body_bytes", _positive_int, 10 * 1024 * 1024, "largest request body in bytes (413 above)", "N"),
    Setting("max_rows", _positive_int, 100_000, "most rows in one request (400 above)", "N"),
    Setting("max_depth", _positive_int, 64, "deepest JSON nesting in a request (400 above)", "N"),
    Setting("max_url_bytes", _positive_int, 8192, "longest request path and query in bytes (414 above)", "N"),
    Setting("max_inflight", _non_negative_int, 0,
            "most predictions at once; beyond it 503 with Retry-After at once (0: no bound)", "N"),
    Setting("max_predict_seconds", _non_negative_float, 0.0,
            "longest a prediction may take: past it 504, while the computation finishes in the background, "
            "still counted by --max-inflight; a request waiting as long for its model to load gets 503 (0: no bound)",
            "SECONDS"),
    Setting("auth_tokens", _token_list, (),
            "bearer tokens required for predictions and model information (health stays open): TOKEN,TOKEN or "
            "@FILE with one per line (prefer the environment variable or a file: flags show in ps)", "TOKENS",
            secret=True),
    Setting("load_retry_seconds", _non_negative_float, 10.0,
            "seconds before a failed model load is tried again", "SECONDS"),
    Setting("poll_interval", _non_negative_float, 2.0,
            "seconds between looks at the store for new, changed and removed models (0: never)", "SECONDS"),
    Setting("preload", _preload_setting, (),
            "load these models at start and keep them loaded; readiness waits for them: 'all' (the bare flag) or "
            "NAME,NAME", "all|NAMES", const="all"),
    Setting("max_loaded", _non_negative_int, 0,
            "most model versions in memory; evicts the least recently used idle one (0: no bound)", "N"),
    Setting("idle_unload", _non_negative_float, 0.0, "unload versions unused this long (0: never)", "SECONDS"),
    Setting("safe_pickle", _boolean, False,
            "load .pkl/.pickle/.joblib artifacts through a restricted unpickler that admits only "
            "scikit-learn, numpy and scipy types (and --trust modules); models may also ask for it", "yes|no",
            const="yes"),
    Setting("trust", _module_list, (),
            "modules (and their submodules) the restricted unpickler also admits, for your own classes: "
            "MODULE,MODULE", "MODULES"),
    Setting("strict_versions", _boolean, False,
            "refuse artifacts written by another scikit-learn version (else they load, flagged in their status)",
            "yes|no", const="yes"),
    Setting("json_max_nodes", _positive_int, 10_000_000,
            "most tree nodes a JSON model may hold, over all its trees (refused at load above)", "N"),
    Setting("json_max_width", _positive_int, 1_000_000,
            "most features any part of a JSON model may take or give (refused at load above)", "N"),
    Setting("json_max_categories", _positive_int, 1_000_000,
            "most classes, encoder categories and vocabulary terms a JSON model may hold, over all its parts "
            "(refused at load above)", "N"),
    Setting("json_max_array_bytes", _positive_int, 1 << 30,
            "most bytes of arrays a JSON model may hold, counted before each is allocated (refused at load above)",
            "N"),
    Setting("admin_token", str, None,
            "bearer token that enables POST /models/<name>/reload, /admin/rescan and the V2 repository's "
            "load/unload (prefer the environment variable: flags show in ps)", "TOKEN", secret=True),
    Setting("cors_origins", _origin_list, (),
            "browser origins whose pages may call the API (CORS): '*' or https://app.example,http://localhost:3000",
            "ORIGINS"),
    Setting("allowed_hosts", _host_list, (),
            "Host header names to accept, refusing others (DNS rebinding defence): localhost,127.0.0.1", "HOSTS"),
    Setting("shutdown_timeout", _non_negative_float, 10.0,
            "seconds requests in flight get to finish after SIGTERM/SIGINT", "SECONDS"),
    Setting("log_level", _log_level, "INFO",
            "logging level (embedded: of the \"service\" logger, unless the host set one): " + ", ".join(LOG_LEVELS),
            "LEVEL"),
    Setting("log_format", _log_format, "text",
            "log lines as text, or json: one object per line with time, level, logger, message and, when the line "
            "concerns them, request_id, model and version (gunicorn's lines too under --workers)", "text|json"),
    Setting("access_log", _boolean, False,
            "log one line per request, with its X-Request-ID (the bare flag: yes); off by default, as it costs "
            "about a tenth of a small model's request", "yes|no", const="yes"),
    Setting("max_batch_size", _positive_int, 1,
            "stack up to N concurrent requests of a tabular model into one predict call (1: no batching)", "N"),
    Setting("max_latency_ms", _non_negative_float, 2.0,
            "longest a batch waits for its next request to join (it closes when full or after such a lull)", "MS"),
    Setting("payload_log", str, None,
            "folder of the payload log: one JSON line per sampled prediction request (inputs, outputs, status, "
            "latency), written off the request path (default: off)",
            "DIR"),
    Setting("payload_log_sample", _fraction, 1.0, "share of prediction requests the payload log records, 0-1",
            "FRACTION"),
    Setting("native", _boolean, True,
            "answer with plain-numpy predictors compiled at load, each proved bit-identical to scikit-learn on "
            "probe rows (other methods and inputs: scikit-learn); a model's settings may turn them off",
            "yes|no", const="yes"),
)


def _load_config(cls, flags=None, environ=None):
    """Merge flags (a mapping; None values are unset) over the environment over defaults."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values = {}
    for setting in SETTINGS:
        raw, source = flags.get(setting.field), setting.flag
        if raw is None or raw == "":
            raw, source = environ.get(setting.env), setting.env
        if raw is None or raw == "":
            continue
        try:
            values[setting.field] = setting.convert(raw)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    return cls(**values)


# Everything the service can be told: a frozen dataclass with one field per row of SETTINGS.
Config = dataclasses.make_dataclass(
    "Config", [(s.field, type(s.default), dataclasses.field(default=s.default, repr=not s.secret)) for s in SETTINGS],
    frozen=True, namespace={"load": classmethod(_load_config), "__module__": __name__,
                            "__doc__": "Everything the service can be told; built by `Config.load` or `create_app`."})


###############################################################################
# Model store #################################################################
###############################################################################
# Finds artifacts on disk.  It knows nothing of loading or HTTP: a scan returns
# the catalogue {name: {version: ArtifactRef}} and logs what it skipped.

SETTINGS_FILE = "model-settings.json"
SHA256SUMS_FILE = "SHA256SUMS"                                    # at the store root, as `sha256sum` writes it
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_SHA256SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")      # "<hex>  <path>", or "<hex> *<path>" (binary)
# An artifact's format comes from its file's extension, decided by the operator who put it in the
# store, never from a request or from the artifact's own contents.
ARTIFACT_FORMATS = {".joblib": "joblib", ".pkl": "pickle", ".pickle": "pickle", ".json": "json"}
_TEMPORARY_SUFFIXES = ("~", ".tmp", ".temp", ".part", ".partial", ".swp", ".crdownload")


def _is_dir(entry):
    """DirEntry.is_dir, treating a link loop or an unreadable entry as "not a folder" (warned later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entries(path, where, warn):
    """A folder's entries in name order; an unreadable folder is skipped with a warning."""
    try:
        return sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError as error:
        warn("skipping %s: %s", where, error.strerror)
        return []


@dataclasses.dataclass(frozen=True)
class ArtifactRef:
    """One artifact on disk: which model and version it is, and its file's identity."""

    name: str
    version: int
    path: str
    file: str          # path relative to the store, for messages and status
    extension: str
    size: int
    mtime_ns: int

    @property
    def format(self):
        return ARTIFACT_FORMATS[self.extension]

    @property
    def fingerprint(self):
        return (self.path, self.size, self.mtime_ns)


class ModelStore:
    """The folder of artifacts; every path it returns resolves strictly inside it.

    A scan also notes each model folder's settings file in `settings_files`
    ({name: ArtifactRef}); the registry reads and checks it.  It reads the
    optional SHA256SUMS file at the root into `sha256sums` ({artifact's path
    relative to the store: sha256 hex}).  A warning about a skipped entry is
    logged once, not again at every rescan while it stays.
    """

    MAX_SUMS_BYTES = 4 * 1024 * 1024

    def __init__(self, root):
        self.path = os.fspath(root)
        self.root = None      # resolved at each scan, so a symlinked store may be re-pointed
        self.settings_files = {}
        self.sha256sums = {}  # replaced whole at the end of a scan: loads read it without a lock
        self._warned = set()
        self._warnings = set()

    def _warn(self, message, *args, level=logging.WARNING):
        """Log a problem with the store once, not at every scan while it lasts."""
        message = message % args
        self._warnings.add(message)
        if message not in self._warned:
            logger.log(level, "%s", message)

    def scan(self):
        """Return {name: {version: ArtifactRef}} for everything valid; warn about the rest."""
        self._warnings, self.settings_files = set(), {}
        try:
            return self._scan()
        finally:
            self._warned = self._warnings

    def _scan(self):
        self.root = os.path.realpath(self.path)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"model store {self.root} is not a folder")
        found, sums = {}, {}
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.name == SHA256SUMS_FILE and not _is_dir(entry):
                sums = self._read_sums(entry)
                continue
            if self._skipped(entry.name, entry.name):
                continue
            if _is_dir(entry):
                name = entry.name
                versions = self._scan_versions(entry)
            else:
                name, extension = os.path.splitext(entry.name)
                ref = self._artifact(name, 1, entry, extension)
                versions = {1: ref} if ref else {}
            if not versions:
                continue
            if not valid_model_name(name):
                self._warn("skipping %s: %r is not a valid model name", entry.name, name)
            elif name in found:
                self._warn("skipping model %r: more than one artifact or folder has that name", name)
                found[name] = None
            else:
                found[name] = versions
        self.settings_files = {name: ref for name, ref in self.settings_files.items() if found.get(name)}
        self.sha256sums = sums
        return {name: versions for name, versions in found.items() if versions}

    def _read_sums(self, entry):
        """{relative path: sha256 hex} from SHA256SUMS; lines not as `sha256sum` writes them are warned about."""
        import posixpath

        ref = self._file(SHA256SUMS_FILE, 0, entry, "")
        if ref is None:
            return {}
        try:
            with open(ref.path, "rb") as handle:
                data = handle.read(self.MAX_SUMS_BYTES + 1)
            if len(data) > self.MAX_SUMS_BYTES:
                raise ValueError(f"it is larger than {self.MAX_SUMS_BYTES} bytes")
            text = data.decode("utf-8")
        except (OSError, ValueError) as error:              # UnicodeDecodeError is a ValueError
            self._warn("ignoring %s: %s", SHA256SUMS_FILE, getattr(error, "strerror", None) or error)
            return {}
        sums = {}
        for number, line in enumerate(text.splitlines(), 1):
            match = _SHA256SUMS_LINE.fullmatch(line)
            if match:
                sums[posixpath.normpath(match[2])] = match[1].lower()
            elif line.strip():
                self._warn("ignoring %s line %d: not \"<sha256 hex>  <path in the store>\"", SHA256SUMS_FILE, number)
        return sums

    def _scan_versions(self, folder):
        versions = {}
        for entry in _entries(folder.path, folder.name, self._warn):
            where = f"{folder.name}/{entry.name}"
            if self._skipped(entry.name, where):
                continue
            if entry.name == SETTINGS_FILE and not _is_dir(entry):
                settings = self._file(folder.name, 0, entry, ".json")
                if settings:
                    self.settings_files[folder.name] = settings
                continue
            if not _is_dir(entry) or not VERSION.fullmatch(entry.name):
                self._warn("skipping %s: versions are folders named by a positive integer, "
                           "beside an optional %s", where, SETTINGS_FILE)
                continue
            artifacts, pending = [], False
            for item in _entries(entry.path, where, self._warn):
                if self._skipped(item.name, f"{where}/{item.name}"):
                    pending = True
                    continue
                _, extension = os.path.splitext(item.name)
                ref = self._artifact(folder.name, int(entry.name), item, extension)
                if ref:
                    artifacts.append(ref)
            if len(artifacts) == 1:
                versions[int(entry.name)] = artifacts[0]
            elif artifacts:
                self._warn("skipping %s: it holds %d artifacts, a version holds exactly one",
                           where, len(artifacts))
            elif pending:
                self._warn("skipping %s: no artifact in it yet", where, level=logging.INFO)
            else:
                self._warn("skipping %s: no artifact in it", where)
        return versions

    def _skipped(self, basename, where):
        if basename.startswith(".") or basename.endswith(_TEMPORARY_SUFFIXES) or basename.startswith("~"):
            self._warn("skipping %s: hidden or temporary file", where, level=logging.INFO)   # how one publishes
            return True
        return False

    def _artifact(self, name, version, entry, extension):
        if extension not in ARTIFACT_FORMATS:
            self._warn("skipping %s: unknown extension (use %s)", os.path.relpath(entry.path, self.root),
                       ", ".join(ARTIFACT_FORMATS))
            return None
        return self._file(name, version, entry, extension)

    def _file(self, name, version, entry, extension):
        """An ArtifactRef for a regular file that resolves inside the store, else None (warned)."""
        relative = os.path.relpath(entry.path, self.root)
        real = os.path.realpath(entry.path)
        if os.path.commonpath([self.root, real]) != self.root:
            self._warn("skipping %s: it resolves outside the model store", relative)
            return None
        try:
            stat = os.stat(real)
        except OSError as error:
            self._warn("skipping %s: %s", relative, error.strerror)
            return None
        if not os.path.isfile(real):
            self._warn("skipping %s: not a regular file", relative)
            return None
        return ArtifactRef(name, version, real, relative.replace(os.sep, "/"), extension,
                           stat.st_size, stat.st_mtime_ns)


class ModelSettings:
    """A model's optional `<name>/model-settings.json`: which versions serve, what labels name.

        {"version_policy": "latest" | "all" | {"latest": N} | {"specific": [1, 3]},
         "labels": {"stable": 1, "canary": 2},
         "safe_pickle": true,                   load pickle/joblib through the restricted unpickler
         "sha256": {"1": "<64 hex digits>"},    what each version's artifact must hash to
         "batching": {"max_batch_size": 32, "max_latency_ms": 2} | false,   (else the flags decide)
         "traffic": {"stable": 90, "canary": 10},   requests naming no version split by weight
         "redact": ["ssn", "income"],              features the payload log never writes
         "shadow": "canary",                    each request also runs, in the background, on this label or version
         "native": false,                       scikit-learn answers everything (see "Native predictors")
         "warmup": [[5.1, 3.5, 1.4, 0.2]]}      rows (lists, records or texts) every method runs once at load

    Every key is optional ("latest": only the highest version serves).  Labels must
    name served versions.  Unknown keys are refused, so a typo never passes silently.
    A traffic split names defined labels or served versions with weights >= 0, not all
    zero: a split that cannot be honoured refuses the file rather than route elsewhere.
    The shadow, like a traffic target, names a defined label or a served version.
    """

    MAX_BYTES = 64 * 1024
    KEYS = ("version_policy", "labels", "safe_pickle", "sha256", "batching", "traffic", "redact", "shadow",
            "native", "warmup")
    MAX_WARMUP_ROWS = 100

    def __init__(self, policy="latest", count=1, versions=(), labels=None, safe_pickle=False, sha256=None,
                 batching=None, native=True):
        self.batching = batching                # None: the flags decide; False: never; (size, latency_ms)
        self.traffic = {}                       # {label (str) or version (int): weight}
        self.redact = frozenset()               # feature names kept out of the payload log
        self.shadow = None                      # label (str) or version (int) shadowing every request
        self.native = native                    # False: no native predictor, whatever --native says
        self.warmup = None                      # rows to warm a loaded version on; None: derived (see _warm)
        self.policy, self.count, self.versions = policy, count, tuple(versions)
        self.labels = dict(labels or {})
        self.safe_pickle = safe_pickle
        self.sha256 = dict(sha256 or {})       # {version: lower-case hex digest}

    @classmethod
    def read(cls, ref):
        """Parse the settings file behind `ref`; ValueError says what is wrong with it."""
        try:
            with open(ref.path, "rb") as handle:
                data = handle.read(cls.MAX_BYTES + 1)
        except OSError as error:
            raise ValueError(f"cannot read it: {error.strerror}") from None
        if len(data) > cls.MAX_BYTES:
            raise ValueError(f"it is larger than {cls.MAX_BYTES} bytes")
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"not valid JSON: {error}") from None
        return cls.parse(document)

    @classmethod
    def parse(cls, document):
        if not isinstance(document, dict):
            raise ValueError("it must hold a JSON object")
        unknown = sorted(set(document) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(cls.KEYS)}")
        settings = cls(**cls._policy(document.get("version_policy", "latest")))
        labels = document.get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError('"labels" must map label names to versions')
        for label, version in labels.items():
            if not LABEL.fullmatch(label):
                raise ValueError(f"invalid label {label!r}: labels match ^{LABEL.pattern}$")
            settings.labels[label] = cls._version(version, f"label {label!r}")
        settings.safe_pickle = document.get("safe_pickle", False)
        if type(settings.safe_pickle) is not bool:
            raise ValueError('"safe_pickle" must be true or false')
        digests = document.get("sha256", {})
        if not isinstance(digests, dict):
            raise ValueError('"sha256" must map versions to sha256 hex digests')
        for version, digest in digests.items():
            number = cls._version(version, "sha256")
            if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
                raise ValueError(f'"sha256" of version {number}: {_clip(repr(digest), 80)} is not 64 hex digits')
            settings.sha256[number] = digest.lower()
        batching = document.get("batching")
        if batching is not None and batching is not False:
            size, latency = (batching.get("max_batch_size"), batching.get("max_latency_ms", 2)) \
                if isinstance(batching, dict) and set(batching) <= {"max_batch_size", "max_latency_ms"} \
                else (None, None)
            if type(size) is not int or size < 1 or type(latency) not in (int, float) or not 0 <= latency <= 1000:
                raise ValueError('"batching" must be false or {"max_batch_size": N >= 1, "max_latency_ms": 0-1000}')
            batching = (size, float(latency))
        settings.batching = batching
        settings.traffic = settings._traffic(document.get("traffic", {}))
        redact = document.get("redact", [])
        if not isinstance(redact, list) or not all(isinstance(name, str) and name for name in redact):
            raise ValueError('"redact" must list feature names, e.g. ["ssn", "income"]')
        settings.redact = frozenset(redact)
        shadow = document.get("shadow")
        if shadow is not None and not isinstance(shadow, str):
            raise ValueError('"shadow" must name a label or a version, e.g. "canary" or "2"')
        settings.shadow = None if shadow is None else settings._target(shadow, '"shadow"')
        settings.native = document.get("native", True)
        if type(settings.native) is not bool:
            raise ValueError('"native" must be true or false')
        settings.warmup = cls._warmup(document.get("warmup"))
        return settings

    @classmethod
    def _warmup(cls, rows):
        """The "warmup" rows: a request's "instances", 1 to MAX_WARMUP_ROWS rows, each a list, an object
        (a record by feature name) or a text; or false, for a model whose calls are too costly to spend
        at load."""
        if rows is None or rows is False:
            return rows
        if not isinstance(rows, list) or not 1 <= len(rows) <= cls.MAX_WARMUP_ROWS or \
                not all(isinstance(row, (list, dict, str)) and row for row in rows):
            raise ValueError(f'"warmup" must list 1 to {cls.MAX_WARMUP_ROWS} rows as a request\'s "instances" '
                             'would: [[5.1, 3.5, 1.4, 0.2]], [{"feature": value}] or ["a text"]; or false')
        return rows

    def _traffic(self, traffic):
        """{label or version number: weight} from the "traffic" object, checked against the labels and policy."""
        if not isinstance(traffic, dict):
            raise ValueError('"traffic" must map labels or versions to weights, e.g. {"stable": 90, "canary": 10}')
        split = {}
        for target, weight in traffic.items():
            target = self._target(target, '"traffic"')
            if type(weight) not in (int, float) or not 0 <= weight < math.inf:
                raise ValueError(f'"traffic": the weight of {target!r} must be a number >= 0, '
                                 f'not {_clip(repr(weight), 40)}')
            split[target] = weight
        if split and not sum(split.values()) > 0:
            raise ValueError('"traffic": every weight is 0; give at least one target a positive weight')
        return split

    def _target(self, target, where):
        """A traffic or shadow target: a version number (int) the policy admits, or a defined label (str)."""
        if VERSION.fullmatch(target):
            if self.policy == "specific" and int(target) not in self.versions:
                raise ValueError(f'{where}: version {target} is not in the version policy')
            return int(target)
        if target not in self.labels:
            raise ValueError(f'{where}: {_clip(repr(target), 80)} is neither a version nor a defined label')
        return target

    def check_served(self, numbers):
        """Refuse a traffic split or shadow naming a version the policy does not serve among `numbers` (those
        on disk)."""
        served = self.select(numbers)
        shadow = {} if self.shadow is None else {self.shadow: '"shadow"'}
        for target, where in {**{target: '"traffic"' for target in self.traffic}, **shadow}.items():
            number = self.labels[target] if isinstance(target, str) else target
            if number not in served:
                what = f"label {target!r} names version {number}" if isinstance(target, str) else f"version {number}"
                raise ValueError(f'{where}: {what}, which is not served (the version policy serves '
                                 f"{', '.join(map(str, served)) or 'none'})")

    @classmethod
    def _policy(cls, policy):
        if policy in ("latest", "all"):
            return {"policy": policy}
        if isinstance(policy, dict) and len(policy) == 1:
            (kind, value), = policy.items()
            if kind == "latest" and type(value) is int and value >= 1:
                return {"policy": "latest", "count": value}
            if kind == "specific" and isinstance(value, list) and value:
                return {"policy": "specific", "versions": sorted({cls._version(v, "specific") for v in value})}
        raise ValueError('"version_policy" must be "latest", "all", {"latest": N} or {"specific": [versions]}')

    @staticmethod
    def _version(value, where):
        if type(value) is int and value >= 1:
            return value
        if isinstance(value, str) and VERSION.fullmatch(value):
            return int(value)
        raise ValueError(f"{where}: {value!r} is not a version (a positive integer)")

    def select(self, numbers):
        """The served versions among `numbers` (the versions on disk), highest first."""
        numbers = sorted(numbers, reverse=True)
        if self.policy == "all":
            return tuple(numbers)
        if self.policy == "latest":
            return tuple(numbers[:self.count])
        return tuple(n for n in numbers if n in self.versions)

    def describe(self):
        policy = ({"specific": list(self.versions)} if self.policy == "specific" else
                  {"latest": self.count} if self.policy == "latest" and self.count > 1 else self.policy)
        return {"version_policy": policy, "labels": {k: str(v) for k, v in sorted(self.labels.items())},
                "safe_pickle": self.safe_pickle, "sha256": {str(v): d for v, d in sorted(self.sha256.items())},
                "batching": (False if self.batching is False else None if self.batching is None else
                             {"max_batch_size": self.batching[0], "max_latency_ms": self.batching[1]}),
                "traffic": {str(target): weight for target, weight in self.traffic.items()},
                "redact": sorted(self.redact),
                "shadow": None if self.shadow is None else str(self.shadow),
                "native": self.native, "warmup": self.warmup}


DEFAULT_SETTINGS = ModelSettings()


###############################################################################
# Restricted unpickling #######################################################
###############################################################################
# --safe-pickle (or "safe_pickle" in a model's settings) reads pickle and joblib
# files with a restricted unpickler.  A global the file names is imported only from
# scikit-learn, numpy, scipy, joblib or a --trust module, and then admitted only for
# what the object it resolves to *is* (its identity, or its class and the module that
# defined it), never for the name the file used: modules re-export functions such as
# os.remove or subprocess.check_output under their own names.  State is applied only
# to instances of admitted classes, never to a class, which every model shares.

_PICKLE_PACKAGES = ("sklearn", "numpy", "scipy", "joblib")            # restricted loads import from these,
_PICKLE_MODULES = ("builtins", "copyreg", "collections", "_codecs")   # these modules, and --trust ones

# Functions that rebuild admitted objects, admitted by identity.
_PICKLE_FUNCTIONS = (
    "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar", "numpy._core.numeric._frombuffer",
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__generator_ctor",
    "numpy.random._pickle.__bit_generator_ctor", "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
    "sklearn.neighbors._kd_tree.newObj", "sklearn.neighbors._ball_tree.newObj",
    "sklearn.metrics._dist_metrics.newObj",
    "copyreg._reconstructor",         # protocols 0 and 1 rebuild objects with it
    "_codecs.encode",                 # protocol 2 stores bytes as _codecs.encode(text, "latin1")
    # feature selection's score functions, which SelectKBest and its kin hold as parameters
    "sklearn.feature_selection._univariate_selection.f_classif",
    "sklearn.feature_selection._univariate_selection.f_regression",
    "sklearn.feature_selection._univariate_selection.r_regression",
    "sklearn.feature_selection._univariate_selection.chi2",
    "sklearn.feature_selection._mutual_info.mutual_info_classif",
    "sklearn.feature_selection._mutual_info.mutual_info_regression",
)

# The types scikit-learn's estimators hold besides estimators, admitted with their
# subclasses defined in scikit-learn (a name this version lacks is skipped).
_SKLEARN_INTERNAL_TYPES = (
    "sklearn.tree._tree.Tree", "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.neighbors._kd_tree.KDTree64", "sklearn.neighbors._kd_tree.KDTree32", "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree64", "sklearn.neighbors._ball_tree.BallTree32",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.DistanceMetric64", "sklearn.metrics._dist_metrics.DistanceMetric32",
    "sklearn._loss._loss.CyLossFunction", "sklearn._loss._loss.CyHalfMultinomialLoss",     # and SGD's losses
    "sklearn.linear_model._sgd_fast.LossFunction",                                          # SGD's, before 1.6
    "sklearn._loss.loss.BaseLoss", "sklearn._loss.link.BaseLink", "sklearn._loss.link.Interval",
    "sklearn.utils._bunch.Bunch",
    "sklearn.neural_network._stochastic_optimizers.BaseOptimizer",                        # MLP's optimiser
    "sklearn.gaussian_process.kernels.Kernel", "sklearn.gaussian_process.kernels.Hyperparameter",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.cluster._birch._CFNode", "sklearn.cluster._birch._CFSubcluster",
)


def _within(module, roots):
    """Whether `module` is one of `roots` or a submodule of one."""
    return any(module == root or module.startswith(root + ".") for root in roots)


@functools.lru_cache(maxsize=256)
def _numpy_core(module):
    """numpy 2 renamed numpy.core to numpy._core (the old name warns); both name the same objects."""
    if module == "numpy.core" or module.startswith("numpy.core."):
        import importlib.util

        if importlib.util.find_spec("numpy._core") is not None:
            return "numpy._core" + module[len("numpy.core"):]
    return module


def _lookup(path):
    """The object `module.name` names, or None where this numpy or scikit-learn has no such thing."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(_numpy_core(module)), name)
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _default_admitted():
    """(helper functions by id, scikit-learn internal types, numpy random types, builtin types), found once."""
    import collections

    import numpy as np

    functions = {id(function): function for function in map(_lookup, _PICKLE_FUNCTIONS) if function is not None}
    internal = tuple(kind for kind in map(_lookup, _SKLEARN_INTERNAL_TYPES) if isinstance(kind, type))
    random = (np.random.RandomState, np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)
    builtin = (slice, set, frozenset, complex, bytes, bytearray, object, collections.OrderedDict)
    return functions, internal, random, builtin


def _admitted_by_default(value):
    """Whether a restricted load admits `value` (what a global resolved to) without --trust."""
    import numpy as np

    functions, internal, random, builtin = _default_admitted()
    module = getattr(value, "__module__", None)
    if not isinstance(module, str):
        return False
    if not isinstance(value, type):
        name = getattr(value, "__name__", None)
        return functions.get(id(value)) is value or (     # or Cython's unpickling helper of a scikit-learn type
            _within(module, ("sklearn",)) and callable(value) and isinstance(name, str)
            and name.startswith("__pyx_unpickle_"))
    if _within(module, ("sklearn",)):
        from sklearn.base import BaseEstimator

        return issubclass(value, (BaseEstimator, *internal))
    if _within(module, ("numpy",)):                   # not ndarray subclasses such as memmap (it opens files)
        return (value is np.ndarray or value is np.dtype or issubclass(value, (np.generic, *random))
                or (module == "numpy.dtypes" and issubclass(value, np.dtype)))
    if _within(module, ("scipy.sparse",)):
        import scipy.sparse

        return issubclass(value, (scipy.sparse.spmatrix, getattr(scipy.sparse, "sparray", scipy.sparse.spmatrix)))
    return any(value is kind for kind in builtin)


def _pickle_name(value):
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(name, str):
        return f"{module}.{name}"
    return f"a {type(value).__name__} object"


def _refusal(where, why, module):
    """The message of a refused global: what was refused, why, and the --trust that would admit it."""
    hint = (f"if you trust it, start the service with --trust {module}"
            if isinstance(module, str) and PYTHON_MODULE.fullmatch(module) and not _never_trusted(module)
            else "no --trust can admit it")
    return f"refused global {where!r}: {why}; {hint}"


class _Allowlist:
    """What one restricted load admits: the defaults, the --trust modules and a loader's extras."""

    def __init__(self, trust=(), extra=()):
        self.trust = (trust,) if isinstance(trust, str) else tuple(trust)
        self.extra = tuple(extra)
        refused = [module for module in self.trust if _never_trusted(module)]
        if refused:             # --trust refuses these already; this holds for every other caller too
            raise ArtifactError(f"module {refused[0]!r} can never be trusted by --safe-pickle")

    def importable(self, module):
        return module in _PICKLE_MODULES or _within(module, _PICKLE_PACKAGES + self.trust)

    def admits(self, value):
        defined = getattr(value, "__module__", None)
        return (any(value is extra for extra in self.extra)
                or (isinstance(defined, str) and _within(defined, self.trust))
                or _admitted_by_default(value))

    def admits_state(self, target):
        """Whether state may be applied to `target`: a plain container, or an instance of an admitted class."""
        return type(target) in (list, dict, set) or (not isinstance(target, type) and self.admits(type(target)))


def _checked(load, target, opcode):
    """An opcode's handler that first checks the object it would change."""
    def checked(unpickler):
        unpickler.check_target(target(unpickler), opcode)
        load(unpickler)
    return checked


class _RestrictedUnpickling:
    """find_class and the opcode checks of the restricted unpicklers (built on pickle's pure-Python one)."""

    allowlist = _Allowlist()

    def find_class(self, module, name):
        import _compat_pickle

        sys.audit("pickle.find_class", module, name)
        if self.proto < 3 and self.fix_imports:        # Python 2 names, mapped as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        where = _clip(f"{module}.{name}", 200)
        if not (PYTHON_MODULE.fullmatch(module) and PYTHON_MODULE.fullmatch(name)) \
                or any(part.startswith("__") for part in module.split(".") + name.split(".")[1:]):
            raise ArtifactError(_refusal(where, "not a plain module and name", None))   # e.g. x.__main__
        if not self.allowlist.importable(module):
            raise ArtifactError(_refusal(where, f"--safe-pickle imports nothing from module {module!r}", module))
        value = importlib.import_module(_numpy_core(module))
        for depth, part in enumerate(name.split(".")):   # pickle's dotted names are nested classes: never
            if depth and not isinstance(value, type):      # walk through what a module imported
                raise ArtifactError(_refusal(where, "a dotted name may only walk through classes", None))
            value = getattr(value, part)
        if not self.allowlist.admits(value):
            raise ArtifactError(_refusal(where, f"{_pickle_name(value)} is not on the --safe-pickle allow-list",
                                         getattr(value, "__module__", None)))
        return value

    def check_target(self, target, opcode):
        if not self.allowlist.admits_state(target):
            raise ArtifactError(f"refused: the file applies {opcode} to {_pickle_name(target)}, which is not an "
                                "instance of an admitted class")

    def refuse_extension(self):
        raise ArtifactError("refused: the file uses the copyreg extension registry (EXT opcodes)")

    @staticmethod
    def restricted_dispatch(dispatch, load_build):
        """`dispatch` with BUILD replaced, the opcodes that change an object checked, EXT refused."""
        def below_mark(unpickler):             # APPENDS, SETITEMS and ADDITEMS change the object under their MARK
            return unpickler.metastack[-1][-1]

        dispatch = dict(dispatch)
        dispatch[pickle.BUILD[0]] = load_build
        for opcode, name, target in ((pickle.APPEND, "APPEND", lambda unpickler: unpickler.stack[-2]),
                                     (pickle.SETITEM, "SETITEM", lambda unpickler: unpickler.stack[-3]),
                                     (pickle.APPENDS, "APPENDS", below_mark),
                                     (pickle.SETITEMS, "SETITEMS", below_mark),
                                     (pickle.ADDITEMS, "ADDITEMS", below_mark)):
            dispatch[opcode[0]] = _checked(dispatch[opcode[0]], target, name)
        for opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
            dispatch[opcode[0]] = _RestrictedUnpickling.refuse_extension
        return dispatch


class _RestrictedUnpickler(_RestrictedUnpickling, pickle._Unpickler):
    """pickle's pure-Python unpickler, restricted (the C one has no hook for BUILD)."""

    def __init__(self, file, trust=()):
        pickle._Unpickler.__init__(self, file)
        self.allowlist = _Allowlist(trust)

    def load_build(self):
        self.check_target(self.stack[-2], "BUILD")
        pickle._Unpickler.load_build(self)

    dispatch = _RestrictedUnpickling.restricted_dispatch(pickle._Unpickler.dispatch, load_build)


@functools.lru_cache(maxsize=None)
def _restricted_joblib_unpickler():
    """joblib's NumpyUnpickler, restricted; made on first use, as joblib imports numpy."""
    import numpy as np
    from joblib.numpy_pickle import NumpyArrayWrapper, NumpyUnpickler

    class RestrictedNumpyUnpickler(_RestrictedUnpickling, NumpyUnpickler):
        def __init__(self, file, trust=()):
            NumpyUnpickler.__init__(self, "", file, ensure_native_byte_order=True)
            self.allowlist = _Allowlist(trust, extra=(NumpyArrayWrapper,))

        def load_build(self):
            """BUILD, then joblib's swap of an array wrapper for the array that follows it in the file.

            An object array is a nested pickle: it is read by the restricted unpickler too,
            not by the plain one joblib's read_array would use.
            """
            self.check_target(self.stack[-2], "BUILD")
            pickle._Unpickler.load_build(self)
            wrapper = self.stack[-1]
            if type(wrapper) is not NumpyArrayWrapper:
                return
            if not isinstance(wrapper.dtype, np.dtype) or wrapper.subclass is not np.ndarray:
                raise ArtifactError("refused: a joblib array wrapper that is not for a plain numpy array")
            if wrapper.dtype.hasobject:
                array = _RestrictedUnpickler(self.file_handle, self.allowlist.trust).load()
                if not isinstance(array, np.ndarray):
                    raise ArtifactError("refused: a joblib object array that holds no array")
            else:
                array = wrapper.read(self, self.ensure_native_byte_order)
            self.stack[-1] = array

        dispatch = _RestrictedUnpickling.restricted_dispatch(NumpyUnpickler.dispatch, load_build)

    return RestrictedNumpyUnpickler


def _load_joblib_restricted(data, trust):
    """What joblib.load does (decompress, unpickle, read arrays), through the restricted unpickler.

    joblib offers no hook for another unpickler: its own (private) compressor detection is used.
    """
    import io

    from joblib.numpy_pickle_utils import _detect_compressor, _validate_fileobject_and_memmap

    stream = io.BytesIO(data)
    if _detect_compressor(stream) == "compat":
        raise ArtifactError("a joblib file written by joblib < 0.10 keeps its arrays in side files: "
                            "--safe-pickle cannot load it")
    with _validate_fileobject_and_memmap(stream, "", None) as (fileobj, _):
        return _restricted_joblib_unpickler()(fileobj, trust).load()


###############################################################################
# Artifact loaders ############################################################
###############################################################################
# Turning an artifact's bytes into an estimator, by its format: the standard
# unpicklers, the restricted one (above) or the JSON model format (near the
# end of the file: only this loader and the export command use it).


def _setting_default(field):
    return next(setting.default for setting in SETTINGS if setting.field == field)


@dataclasses.dataclass(frozen=True)
class JsonLimits:
    """How much one JSON model may make its loader allocate (the --json-max-* settings, the defaults here):
    tree nodes over all its trees, features in any one part's input or output, categories (classes,
    encoder categories, vocabulary terms) over all its parts, and bytes of arrays.  Each is counted as
    the document is decoded, before the part is allocated; a model past one is refused, naming it."""

    nodes: int = _setting_default("json_max_nodes")
    width: int = _setting_default("json_max_width")
    categories: int = _setting_default("json_max_categories")
    array_bytes: int = _setting_default("json_max_array_bytes")

    @classmethod
    def of(cls, config):
        return cls(**{field.name: getattr(config, "json_max_" + field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What the operator trusts and expects of one artifact; the registry builds it for each load.

    The defaults load pickle and joblib with their standard unpicklers, which run
    whatever code the file names: that trusts whoever could write the file.
    """

    #: pickle and joblib through the restricted unpickler (see "Restricted unpickling" above)
    safe_pickle: bool = False
    #: modules (and their submodules) the restricted unpickler also admits
    trust: tuple = ()
    #: (sha256 hex digest, where it is listed) pairs the artifact's content must all match
    sha256: tuple = ()
    #: refuse an artifact written by another scikit-learn version
    strict_versions: bool = False
    #: what a JSON model may hold
    json_limits: JsonLimits = JsonLimits()


def _load_pickle(data, options):
    import io

    if options.safe_pickle:
        return _RestrictedUnpickler(io.BytesIO(data), options.trust).load()
    return pickle.loads(data)


def _load_joblib(data, options):
    import io

    import joblib

    if options.safe_pickle:
        return _load_joblib_restricted(data, options.trust)
    return joblib.load(io.BytesIO(data))


def _load_json(data, options):
    """A JSON model; the scikit-learn version its document records is reported as a pickle's would be."""
    import sklearn
    from sklearn.exceptions import InconsistentVersionWarning

    estimator = load_json_model(data, options.json_limits)
    written = json.loads(data).get("sklearn_version")
    if isinstance(written, str) and written != sklearn.__version__:
        warnings.warn(InconsistentVersionWarning(estimator_name="JSON model", original_sklearn_version=written,
                                                 current_sklearn_version=sklearn.__version__))
    return estimator


ARTIFACT_LOADERS = {"joblib": _load_joblib, "pickle": _load_pickle, "json": _load_json}   # by ArtifactRef.format

PREDICT_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function",
                   "transform", "score_samples")


def load_artifact(ref, options=None):
    """Read, check, hash and deserialise one artifact; every failure becomes ArtifactError.

    Returns (estimator, sha256, size, version_skew): version_skew says which scikit-learn
    wrote the artifact when that is not the one running, else it is None.  A digest
    listed for the artifact is checked before anything is deserialised.
    """
    options = options or LoadOptions()
    loader = ARTIFACT_LOADERS[ref.format]
    try:
        with open(ref.path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ArtifactError(f"cannot read {ref.file}: {error.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    for expected, where in options.sha256:
        if digest != expected:
            raise ArtifactError(f"{ref.file} does not match the sha256 listed in {where}: expected {expected}, "
                                f"actual {digest}; not loaded")
    try:
        estimator, written = _deserialise(loader, data, options)
    except ArtifactError:
        raise
    except (Exception, SystemExit) as error:  # a pickle may raise anything, even SystemExit
        logger.debug("loading %s failed", ref.file, exc_info=True)
        raise ArtifactError(f"cannot load {ref.file} as {ref.format}: {type(error).__name__}: "
                            f"{_clip(str(error))}") from None
    skew = _version_skew(written)
    if skew and options.strict_versions:
        raise ArtifactError(f"{ref.file}: {skew}; refused (--strict-versions)")
    if not any(callable(getattr(estimator, method, None)) for method in PREDICT_METHODS):
        raise ArtifactError(f"{ref.file} holds a {type(estimator).__name__}, which has none of the methods "
                            f"{', '.join(PREDICT_METHODS)}")
    _refuse_file_readers(estimator, ref)
    return estimator, digest, len(data), skew


def _refuse_file_readers(estimator, ref):
    """Refuse a model with any part that would open what a request names, in every artifact format.

    scikit-learn's text vectorizers (CountVectorizer, TfidfVectorizer, HashingVectorizer and their
    subclasses) read each "document" as a path with input="filename" and call .read() on it with
    input="file": a client's text "/etc/passwd" would come back as word counts.  A request's text
    must only ever be text, so only input="content" is served.  (No other scikit-learn estimator
    opens anything at predict time: `memory=` caches are used only by fit.)
    """
    for part in _estimator_parts(estimator, [], set()):
        mode = part.__dict__.get("input", "content")
        if callable(getattr(part, "build_analyzer", None)) and mode != "content":
            raise ArtifactError(f"{ref.file}: its {type(part).__name__} has input={_clip(repr(mode), 40)}, which "
                                "reads the files or file objects a request names; only input=\"content\" can "
                                "be served (set it and save the model again)")


_VERSION_CAPTURE = threading.Lock()


def _deserialise(loader, data, options):
    """Run a loader; return (estimator, the scikit-learn versions that wrote what it unpickled).

    scikit-learn tells of a pickle from another version only by an InconsistentVersionWarning
    (from BaseEstimator.__setstate__).  Catching warnings swaps process-wide state and is
    not thread-safe, so captures run one at a time and span only the deserialisation;
    any other warning caught meanwhile (from any thread) is issued again afterwards.
    """
    from sklearn.exceptions import InconsistentVersionWarning

    written, caught = set(), []
    with _VERSION_CAPTURE:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", InconsistentVersionWarning)
                estimator = loader(data, options)
        finally:
            for item in caught:
                if issubclass(item.category, InconsistentVersionWarning):
                    written.add(_clip(str(getattr(item.message, "original_sklearn_version", "unknown")), 40))
                else:
                    warnings.warn_explicit(item.message, item.category, item.filename, item.lineno,
                                           source=item.source)
    return estimator, written


def _version_skew(written):
    """"trained with scikit-learn 1.8.0, running 1.9.1", or None when every version is the running one."""
    import sklearn

    others = sorted(version for version in written if version != sklearn.__version__)
    if not others:
        return None
    return f"trained with scikit-learn {' and '.join(others)}, running {sklearn.__version__}"


###############################################################################
# Servables ###################################################################
###############################################################################


# Which predictor answered a call: the status and the predict_calls metric name it.
NATIVE, SKLEARN = "native", "scikit-learn"


class LoadedModel:
    """A deserialised estimator with the facts about it computed once, at load."""

    def __init__(self, ref, estimator, sha256, size, load_seconds, version_skew=None):
        self.ref = ref
        self.name = ref.name
        self.version = str(ref.version)
        self.estimator = estimator
        self.sha256 = sha256
        self.size = size
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.version_skew = version_skew    # "trained with scikit-learn X, running Y", or None
        self.methods = tuple(m for m in PREDICT_METHODS if callable(getattr(estimator, m, None)))
        self.n_features = _attribute(estimator, "n_features_in_")
        names = _attribute(estimator, "feature_names_in_")
        self.feature_names = None if names is None else [str(n) for n in names]
        self.feature_index = None if names is None else {n: i for i, n in enumerate(self.feature_names)}
        classes = _attribute(estimator, "classes_")
        self.classes = None if classes is None else to_jsonable(classes)
        #: one list of classes per output (a multi-output classifier: its probabilities are one array each)
        self.output_classes = self.classes if isinstance(classes, list) else None
        self.n_outputs = len(classes) if self.output_classes else _attribute(estimator, "n_outputs_") or 1
        self.estimator_class = f"{type(estimator).__module__}.{type(estimator).__qualname__}"
        self.make_frame = _frame_maker() if names is not None else None
        self.inflight = 0               # requests using it now (under the registry's Residency lock)
        self.last_used = 0.0            # registry clock at the last request, for LRU and idle unloads
        self.retired = False            # out of service; freed when its last request ends
        self.batcher = None             # a Batcher when concurrent requests are stacked (tabular models only)
        self.checked_call = _finite_checked_call(estimator) if self.n_features is not None else None
        self.metrics = None             # the registry's Metrics, which count calls by predictor
        self.native = None              # a NativePredictor: the methods proved at load to answer as scikit-learn
        self.predictors = {}            # method -> (NATIVE or SKLEARN, why), for the status
        self.warmup = "not warmed"      # what warming did, for the load's log line (see _warm)

    def predict(self, method, inputs):
        """Answer one method for a request: through the batcher when the model has one, else `call`."""
        if self.batcher is not None:
            return self.batcher.join(method, inputs)
        return self.call(method, inputs)

    def call(self, method, inputs):
        """Call one method now: natively where it is proved and takes these inputs, else through scikit-learn."""
        native = self.native.methods.get(method) if self.native is not None else None
        prepared = None if native is None else self.native.prepare(inputs)
        if prepared is not None:
            outputs, predictor = native(prepared), NATIVE
        else:
            outputs, predictor = self._sklearn_call(method, inputs), SKLEARN
        if self.metrics is not None:
            self.metrics.count("model_service_predict_calls_total", (("model", self.name), ("version", self.version),
                                                                     ("method", method), ("predictor", predictor)))
        return outputs

    def _sklearn_call(self, method, inputs):
        """The estimator's own answer; its complaints about the input are the caller's 400."""
        try:
            if self.checked_call is not None:
                return self.checked_call(getattr(self.estimator, method), inputs)
            return getattr(self.estimator, method)(inputs)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            # e.g. a text pipeline given numbers: 'int' object has no attribute 'lower'
            raise BadRequest(f"{method} failed: {_clip(str(error))}", model=self.name) from None

    def describe(self):
        return {"estimator": self.estimator_class, "methods": list(self.methods),
                "n_features_in_": self.n_features, "feature_names_in_": self.feature_names,
                "classes_": self.classes, "sklearn_version_skew": self.version_skew,
                "predictors": {method: {"predictor": predictor, "reason": why}
                               for method, (predictor, why) in self.predictors.items()}}


class Batcher:
    """Stacks concurrent calls of one method on one model into one call, and splits the answer back.

    scikit-learn pays a large fixed cost per call (a 100-tree forest: 4 to 16 ms for 1 row or
    for 32), and threads predicting at once fight over the GIL; one call for many rows serves
    them all for the price of one.  No thread of its own: the first request of a batch leads it
    and waits for others only while other requests of this model are in flight (alone, it runs
    at once), until the batch is full or `max_latency` passes with no one joining.  One stacked
    call per model runs at a time, and the next batch gathers meanwhile: two at once would only
    take turns on the GIL.  Rows are stacked in order and each request gets its own slice back.
    If the stacked call fails, each request is run alone, so a bad one fails alone.  Only tabular
    models get a batcher: their rows are independent (a sequence model's are not, and a model's
    settings can turn batching off).
    """

    def __init__(self, model, max_size, max_latency, metrics):
        self.model, self.max_size, self.max_latency, self.metrics = model, max_size, max_latency, metrics
        self._lock = threading.Lock()
        self._waiting = {}                  # method -> list of _Pending, the first one leading
        self._turn = threading.Lock()       # held by the batch being computed: one at a time per model

    def join(self, method, inputs):
        """This request's slice of the stacked call it joins (or leads)."""
        mine = _Pending(inputs)
        with self._lock:
            queue = self._waiting.setdefault(method, [])
            queue.append(mine)
            mine.leads = len(queue) == 1
            if len(queue) >= self.max_size:
                queue[0].full.set()
        if not mine.leads:
            mine.done.wait()                 # until answered, or made the leader of what waits behind
            if not mine.leads:
                return mine.answer()
        if self.model.inflight > 1:          # someone may join: wait while they keep coming
            queue, joined = self._waiting[method], 1
            while not mine.full.wait(self.max_latency) and len(queue) > joined:
                joined = len(queue)
        with self._turn:                     # while a stacked call runs, the next batch gathers
            with self._lock:
                queue = self._waiting[method]
                batch, rest = queue[:self.max_size], queue[self.max_size:]
                self._waiting[method] = rest
                if rest:                     # more than a batch waits: the next one leads them
                    rest[0].leads = True
                    if len(rest) >= self.max_size:
                        rest[0].full.set()
                    rest[0].done.set()
            self._execute(method, batch)
        return mine.answer()

    def _execute(self, method, batch):
        self.metrics.observe("model_service_batch_size", (("model", self.model.name),), len(batch))
        if len(batch) == 1:
            self._alone(method, batch[0])
            return
        try:
            stacked = _stack([item.inputs for item in batch])
            outputs = self.model.call(method, stacked)
            start = 0
            for item in batch:       # a multi-output predict_proba is a list: each output's rows
                count = len(item.inputs)
                item.result = [output[start:start + count] for output in outputs] if isinstance(outputs, list) \
                    else outputs[start:start + count]
                start += count
        except Exception:
            for item in batch:               # one bad request must not fail its batch-mates
                if item.result is None:
                    self._alone(method, item)
        finally:
            for item in batch[1:]:
                item.done.set()

    def _alone(self, method, item):
        try:
            item.result = self.model.call(method, item.inputs)
        except BaseException as error:  # handed to the request that owns it
            item.error = error


class _Pending:
    __slots__ = ("inputs", "result", "error", "done", "full", "leads")

    def __init__(self, inputs):
        self.inputs, self.result, self.error, self.leads = inputs, None, None, False
        self.done, self.full = threading.Event(), threading.Event()

    def answer(self):
        if self.error is not None:
            raise self.error
        return self.result


def _stack(inputs):
    """Rows of several requests as one input: arrays stacked, DataFrames concatenated."""
    if hasattr(inputs[0], "iloc"):
        import pandas

        return pandas.concat(inputs, ignore_index=True)
    import numpy as np

    return np.concatenate(inputs)


# Estimators whose every prediction method checks X with scikit-learn's check_array on the rows it
# was given, keeping float64, refusing infinity always and NaN unless the allow_nan tag admits it, and
# which hold no estimator: a NaN/infinity check done by the service before the call is then exactly
# the one scikit-learn would make.  Exact classes only (a subclass may check otherwise), and only ones
# tests/test_prechecks.py compares with scikit-learn.  Not here, on purpose: trees, forests and
# gradient boosting check in float32 (1e300 becomes infinity there, not in float64); histogram
# boosting and the dummies check nothing; every meta-estimator, pipeline or wrapper, whose tag does
# not say what its parts accept, and whose parts see data the service never checked.
FINITE_CHECKED = (
    "sklearn.linear_model.LinearRegression", "sklearn.linear_model.Ridge", "sklearn.linear_model.RidgeClassifier",
    "sklearn.linear_model.Lasso", "sklearn.linear_model.ElasticNet", "sklearn.linear_model.LogisticRegression",
    "sklearn.linear_model.SGDClassifier", "sklearn.linear_model.SGDRegressor",
    "sklearn.linear_model.PoissonRegressor", "sklearn.linear_model.TweedieRegressor",
    "sklearn.linear_model.GammaRegressor",
    "sklearn.svm.SVC", "sklearn.svm.SVR", "sklearn.svm.LinearSVC", "sklearn.svm.LinearSVR",
    "sklearn.naive_bayes.GaussianNB", "sklearn.naive_bayes.MultinomialNB", "sklearn.naive_bayes.BernoulliNB",
    "sklearn.naive_bayes.ComplementNB",
    "sklearn.neighbors.KNeighborsClassifier", "sklearn.neighbors.KNeighborsRegressor",
    "sklearn.cluster.KMeans", "sklearn.decomposition.PCA", "sklearn.decomposition.TruncatedSVD",
    "sklearn.preprocessing.StandardScaler", "sklearn.preprocessing.MinMaxScaler",
    "sklearn.preprocessing.MaxAbsScaler", "sklearn.preprocessing.RobustScaler",
    "sklearn.preprocessing.Normalizer", "sklearn.preprocessing.Binarizer",
    "sklearn.preprocessing.PolynomialFeatures", "sklearn.preprocessing.KBinsDiscretizer",
)


@functools.lru_cache(maxsize=None)
def _finite_checked_classes():
    """FINITE_CHECKED as classes, found once (a name this scikit-learn lacks is skipped)."""
    return frozenset(kind for kind in map(_lookup, FINITE_CHECKED) if isinstance(kind, type))


def _finite_checked_call(estimator):
    """A caller that checks float inputs for NaN and infinity itself, then lets scikit-learn skip it.

    scikit-learn's own check (assume_finite=False) costs about a tenth of a small model's
    request (measured: 40 of 400 µs for the iris LogisticRegression); numpy does the same check
    in about 4 µs.  A shortcut may never change an answer or a refusal, so it applies only where
    it is the same check: to the classes of FINITE_CHECKED, holding no other estimator
    (assume_finite, set around the call, would switch off every check inside it too).  NaN
    passes where the allow_nan tag admits it, infinity never, as check_array does for these.
    Other inputs (objects, DataFrames) and other models are left to scikit-learn.  None when it
    does not apply.
    """
    if type(estimator) not in _finite_checked_classes() or _estimator_parts(estimator, [], set()) != [estimator]:
        return None
    allow_nan = _allows_nan(estimator)
    if allow_nan is None:
        return None
    import numpy as np
    from sklearn import get_config, set_config

    ndarray, isfinite, isinf = np.ndarray, np.isfinite, np.isinf

    def call(function, inputs):
        if type(inputs) is not ndarray or inputs.dtype != np.float64:
            return function(inputs)
        if isinf(inputs).any() if allow_nan else not isfinite(inputs).all():
            raise ValueError(f"Input X contains {'infinity' if allow_nan else 'NaN or infinity'}: "
                             f"{type(estimator).__name__} does not accept "
                             f"{'infinity' if allow_nan else 'missing or infinite values'}")
        previous = get_config()["assume_finite"]     # set_config, not config_context: 1 µs, not 10
        set_config(assume_finite=True)                  # (scikit-learn's config is per thread)
        try:
            return function(inputs)
        finally:
            set_config(assume_finite=previous)

    return call


def _allows_nan(estimator):
    """The estimator's allow_nan tag (scikit-learn's own promise), or None when it has no tags."""
    try:
        from sklearn.utils import get_tags
    except ImportError:                                  # scikit-learn before 1.6
        get_tags = None
    try:
        if get_tags is not None:
            return bool(get_tags(estimator).input_tags.allow_nan)
        return bool(estimator._get_tags()["allow_nan"])
    except Exception:   # not a scikit-learn estimator, or tags that fail on this one
        return None


def _frame_maker():
    """pandas.DataFrame if pandas is installed: a model fitted on named columns wants them back.

    Without pandas the rows go in as an array, already in `feature_names_in_` order, so
    scikit-learn's warning that the array has no column names says nothing: silence it.
    """
    try:
        import pandas
    except ImportError:
        warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)
        return None
    return pandas.DataFrame


def _serve_arrays(estimator, model):
    """Let a model fitted on named columns take plain arrays, when that changes none of its answers.

    Rows already come in `feature_names_in_` order, and a DataFrame costs about a millisecond
    per request to build and for scikit-learn to check (most of a small model's request).  So
    the names are taken off this freshly loaded estimator (and its parts) if, on a probe row, the
    array answers exactly as the DataFrame did; a model that selects columns by name (a
    ColumnTransformer) fails the probe, gets its names back and keeps receiving DataFrames.
    """
    import numpy as np

    method = model.methods[0]
    probe = np.zeros((1, model.n_features))
    try:
        expected = getattr(estimator, method)(model.make_frame(probe, columns=model.feature_names))
    except Exception:
        return False
    named = _named_parts(estimator)
    for part, names in named:
        del part.feature_names_in_
    try:
        if _same_outputs(expected, getattr(estimator, method)(probe)):
            return True
    except Exception:  # fall through: this model needs its columns named
        pass
    for part, names in named:
        part.feature_names_in_ = names
    return False


def _named_parts(estimator):
    """Every estimator inside `estimator` (itself included) that holds feature_names_in_, with them."""
    return [(part, part.__dict__["feature_names_in_"]) for part in _estimator_parts(estimator, [], set())
            if "feature_names_in_" in part.__dict__]


def _build_model(ref, options=None, native=True):
    """Load one artifact into a LoadedModel, with its native predictor unless `native` is false.

    An unexpected failure is logged with its traceback.
    """
    started = time.perf_counter()
    try:
        estimator, digest, size, skew = load_artifact(ref, options)
    except ArtifactError:
        raise
    except Exception:
        logger.exception("unexpected error loading %s", ref.file)
        raise
    if skew:
        logger.warning("model %r version %s was %s: its predictions may differ (--strict-versions refuses "
                       "such artifacts)", ref.name, ref.version, skew)
    model = LoadedModel(ref, estimator, digest, size, time.perf_counter() - started, version_skew=skew)
    if model.make_frame is not None and _serve_arrays(estimator, model):
        model.make_frame = None
    attach_native(model, native)        # after _serve_arrays: the names it takes off would refuse it
    return model


###############################################################################
# Metrics #####################################################################
###############################################################################
# What GET /metrics reports, through prometheus_client (imported at the first count, not with the
# module).  One process keeps its counts in memory, in a registry of its own (several apps in one
# process do not mix).  Under --workers, or any pre-fork host with PROMETHEUS_MULTIPROC_DIR set,
# every process writes its counts to files there and a scrape of any process sums them (README,
# "Metrics").

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_VERSION = ("model", "version")

METRICS = {   # name: (type, help, label names, histogram buckets)
    "model_service_requests_total": ("counter", "Prediction requests by model, version, method and status.",
                                     MODEL_VERSION + ("method", "status"), None),
    "model_service_request_duration_seconds": ("histogram", "Time to answer a prediction request.",
                                               ("model", "method"), LATENCY_BUCKETS),
    "model_service_model_loads_total": ("counter", "Model version loads by outcome (success, failure).",
                                        MODEL_VERSION + ("outcome",), None),
    "model_service_model_load_duration_seconds": ("histogram", "Time to load a model version.", MODEL_VERSION,
                                                  LOAD_BUCKETS),
    "model_service_batch_size": ("histogram", "Requests stacked into one predict call.", ("model",), BATCH_BUCKETS),
    "model_service_payload_log_records_total": ("counter", "Prediction requests written to the payload log.", (),
                                                None),
    "model_service_payload_log_dropped_total": ("counter", "Payload log records dropped: its queue was full or "
                                                "a write failed.", (), None),
    "model_service_predict_calls_total": ("counter", "Predict calls (a stacked batch is one) by model, version, "
                                          "method and the predictor that answered (native, scikit-learn).",
                                          MODEL_VERSION + ("method", "predictor"), None),
    "model_service_shadow_compared_total": ("counter", "Requests compared with the model's shadow version, by "
                                            "model and shadow version.", MODEL_VERSION, None),
    "model_service_shadow_identical_total": ("counter", "Requests whose shadow predictions were identical.",
                                             MODEL_VERSION, None),
    "model_service_shadow_abs_difference_total": ("counter", "Sum of the absolute differences of numeric shadow "
                                                  "outputs (divide by numeric_values_total for the mean).",
                                                  MODEL_VERSION, None),
    "model_service_shadow_numeric_values_total": ("counter", "Numeric output values compared with the shadow's "
                                                  "(in requests that were not identical).", MODEL_VERSION, None),
    "model_service_shadow_errors_total": ("counter", "Requests the shadow version failed on.", MODEL_VERSION, None),
    "model_service_shadow_dropped_total": ("counter", "Requests not shadowed: the shadow queue was full.",
                                           MODEL_VERSION, None),
    "model_service_models_loaded": ("gauge", "Model versions in memory.", (), None),
    "model_service_requests_in_flight": ("gauge", "Prediction requests being answered now.", (), None),
}
GAUGES = [name for name, (kind, *_) in METRICS.items() if kind == "gauge"]
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"     # prometheus_client's: where processes share their counts


class Metrics:
    """The service's metrics: prometheus_client families, and the labelled child of each series cached by
    its (name, label pairs), so a count costs one dict lookup before prometheus_client's own increment
    (its labels() lookup costs several µs).  The cache stays bounded because label values do: they are
    only models, versions and methods that exist (UNRESOLVED for the rest) and forget() drops a version's.

    The gauges are read from `gauges` ({name: () -> value}) at scrape time in one process.  Shared
    between processes, a scrape can only read files, so each process writes its own gauges whenever
    they change (`changed`, called by the registry's Residency) and the scrape sums the live processes'
    (multiprocess_mode "livesum": versions in memory over the workers, i.e. copies of models, and requests
    being answered by any of them; a dead worker's are removed by mark_process_dead).
    """

    def __init__(self, gauges):
        self._gauges = gauges
        self._lock = threading.Lock()
        self._children = {}         # (name, label pairs) -> the series' prometheus_client child
        self._families = None       # name -> prometheus_client metric, made at the first count
        self._registry = None       # what a scrape collects
        self._shared = False        # counts live in files under $PROMETHEUS_MULTIPROC_DIR
        self._forgotten = set()     # shared: (model, version) whose series a scrape leaves out
        self._written = (None, {})  # shared: (pid, {gauge: the value it last wrote})

    def count(self, name, labels, amount=1):
        child = self._children.get((name, labels))
        (child if child is not None else self._child(name, labels)).inc(amount)

    def observe(self, name, labels, value):
        child = self._children.get((name, labels))
        (child if child is not None else self._child(name, labels)).observe(value)

    def changed(self):
        """Models in memory or requests in flight changed: shared, this process writes the gauges that did
        (each write is a file update; called under the Residency's lock, so in order).

        (A worker forked with models already in memory writes them at its first request.)"""
        if not self._shared and self._families is not None:
            return                  # one process: read at scrape time
        families = self._ready()
        if self._shared:
            if self._written[0] != os.getpid():     # forked: this process's file has none of them yet
                self._written = (os.getpid(), {})
            for name in GAUGES:
                value = self._gauges[name]()
                if self._written[1].get(name) != value:
                    self._written[1][name] = value
                    families[name].set(value)

    def forget(self, model, version):
        """Drop every series of one model version.  Shared, the files keep its counts (prometheus_client
        cannot remove them there), so a scrape leaves them out until the version is counted again."""
        pairs = {("model", model), ("version", version)}
        with self._lock:
            for key in [key for key in self._children if pairs <= set(key[1])]:
                del self._children[key]
                if not self._shared:
                    self._families[key[0]].remove(*(value for _, value in key[1]))
            if self._shared:
                self._forgotten.add((model, version))

    def render(self):
        """The text exposition format, version 0.0.4."""
        self._ready()
        return importlib.import_module("prometheus_client").generate_latest(self._registry).decode()

    def _ready(self):
        if self._families is None:
            with self._lock:
                if self._families is None:
                    self._start()
        return self._families

    def _child(self, name, labels):
        family = self._ready()[name]
        with self._lock:
            child = self._children.get((name, labels))
            if child is None:
                child = self._children[name, labels] = family.labels(*(v for _, v in labels)) if labels else family
                pairs = dict(labels)
                self._forgotten.discard((pairs.get("model"), pairs.get("version")))
            return child

    def _start(self):
        """Import prometheus_client and make the families: in files if $PROMETHEUS_MULTIPROC_DIR is set now
        (prometheus_client reads it when first imported), else in this app's own registry."""
        prometheus = importlib.import_module("prometheus_client")
        prometheus.disable_created_metrics()     # no *_created series: the output stays the counts alone
        self._shared = bool(os.environ.get(MULTIPROCESS_DIR))
        own = None if self._shared else prometheus.CollectorRegistry()
        kinds = {"counter": prometheus.Counter, "histogram": prometheus.Histogram, "gauge": prometheus.Gauge}
        families = {}
        for name, (kind, help_text, label_names, buckets) in METRICS.items():
            if kind == "gauge" and not self._shared:
                continue                         # read at scrape time (_ScrapeGauges)
            options = {"buckets": buckets} if buckets else {"multiprocess_mode": "livesum"} if kind == "gauge" else {}
            families[name] = kinds[kind](name, help_text, label_names, registry=own, **options)
        if self._shared:
            from prometheus_client.multiprocess import MultiProcessCollector
            self._registry = prometheus.CollectorRegistry()
            self._registry.register(_Unforgotten(MultiProcessCollector(None), self._forgotten))
        else:
            gauge_family = importlib.import_module("prometheus_client.core").GaugeMetricFamily
            own.register(_ScrapeGauges(gauge_family, self._gauges))
            self._registry = own
        self._families = families


class _ScrapeGauges:
    """A collector: the gauges read when scraped (one process)."""

    def __init__(self, family, gauges):
        self.family, self.gauges = family, gauges

    def collect(self):
        return [self.family(name, METRICS[name][1], value=self.gauges[name]()) for name in GAUGES]


class _Unforgotten:
    """A collector: another's series, less those of forgotten model versions."""

    def __init__(self, collector, forgotten):
        self.collector, self.forgotten = collector, forgotten

    def collect(self):
        for family in self.collector.collect():
            family.samples = [item for item in family.samples
                              if (item.labels.get("model"), item.labels.get("version")) not in self.forgotten]
            yield family


###############################################################################
# Agreement ###################################################################
###############################################################################
# How two versions' answers compare: a shadow's running counts (registry, HTTP application) and a
# replay's report (Replay).

REPLAY_WORST = 5        # examples kept, the most different first


class Agreement:
    """How two versions' answers to the same requests compare, request by request: a replay's report, and
    a shadow's running counts.  Its memory stays bounded however many requests it sees (sums, not lists;
    only the REPLAY_WORST most different examples), so a shadow can count for the life of the process."""

    def __init__(self):
        self.skipped = collections.Counter()    # reason -> lines not replayed
        self.replayed = self.identical = 0
        self.classes = collections.Counter()    # (logged, replayed) -> rows whose class changed
        self.gap_sum, self.gap_count, self.gap_max = 0.0, 0, 0.0   # absolute differences of numeric outputs
        self.errors = collections.Counter()     # message -> requests the version failed on
        self.dropped = 0                        # shadow requests dropped: its queue was full
        self._worst = []                        # heap of (rows differing, max abs difference, request id, methods)

    def compare(self, model, request_id, logged, replayed):
        """Count one request: `logged` and `replayed` map each method to its JSON outputs; returns the
        numeric differences seen."""
        self.replayed += 1
        if logged == replayed:
            self.identical += 1
            return []
        changed, largest, differences = 0, 0.0, []
        for method, before in logged.items():
            after = replayed[method]
            if method == "predict" and model.classes is not None and len(before) == len(after):
                pairs = [(old, new) for old, new in zip(before, after) if old != new]
                self.classes.update((_comparable_text(old), _comparable_text(new)) for old, new in pairs)
                changed += len(pairs)
                continue
            numbers = _comparable_numbers(before), _comparable_numbers(after)
            if None in numbers or len(numbers[0]) != len(numbers[1]):
                changed += 1                    # not comparable number by number: differs as a whole
                continue
            differences += [abs(old - new) for old, new in zip(*numbers)]
        if differences:
            self.gap_sum, self.gap_count = self.gap_sum + sum(differences), self.gap_count + len(differences)
            largest = max(differences)
            self.gap_max = max(self.gap_max, largest)
        self.example(changed, largest, request_id, logged)
        return differences

    def fail(self, request_id, methods, message):
        """Count a request the version failed on; it ranks above every difference among the examples."""
        self.errors[message] += 1
        self.example(math.inf, math.inf, request_id, methods)

    def example(self, changed, largest, request_id, methods):
        entry = (changed, largest, request_id, sorted(methods))
        (heapq.heappush if len(self._worst) < REPLAY_WORST else heapq.heappushpop)(self._worst, entry)

    def share(self):
        return self.identical / self.replayed if self.replayed else 1.0

    def lines(self, name, version):
        """The printed report."""
        out = [f"replayed {self.replayed} request(s) on model {name!r} version {version}"]
        if self.skipped:
            out.append("skipped " + ", ".join(f"{count} {why}" for why, count in sorted(self.skipped.items())))
        out.append(f"identical predictions: {self.identical} of {self.replayed} ({self.share():.1%})")
        for (old, new), count in self.classes.most_common():
            out.append(f"class {old} -> {new}: {count} row(s)")
        if self.gap_count:
            out.append(f"numeric outputs: mean abs difference {self.gap_sum / self.gap_count:.6g}, "
                       f"max {self.gap_max:.6g} over {self.gap_count} value(s)")
        out.append(f"errors: {sum(self.errors.values())}")
        out += [f"  {count} x {message}" for message, count in self.errors.most_common(REPLAY_WORST)]
        worst = sorted(self._worst, reverse=True)
        if worst:
            out.append("worst examples:")
            out += [f"  {request_id} ({','.join(methods)}): {changed} row(s) differ, max abs difference {gap:.6g}"
                    for changed, gap, request_id, methods in worst]
        return out


def _comparable_text(value):
    return value if isinstance(value, str) else dumps(value)


def _comparable_numbers(outputs):
    """Every number in nested JSON outputs, in order; None if any value is not a number."""
    if isinstance(outputs, list):
        flat = []
        for item in outputs:
            numbers = _comparable_numbers(item)
            if numbers is None:
                return None
            flat += numbers
        return flat
    return [outputs] if type(outputs) in (int, float) else None


###############################################################################
# Model registry ##############################################################
###############################################################################
# Holds the catalogue: for each model name a CatalogueEntry, for each of its versions a
# VersionSlot with its state and its LoadedModel.  Loads are lazy and single-flight per
# version; a failed load is retried only after a pause.  A request keeps the LoadedModel
# it got, so later swaps never disturb it.  Residency keeps the count of what is in memory.

UNLOADED, LOADING, AVAILABLE, UNLOADING, FAILED = "UNLOADED", "LOADING", "AVAILABLE", "UNLOADING", "FAILED"


class VersionSlot:
    """One version of a model in the registry: its artifact, state, loaded model and load history.

    `model` (a LoadedModel, or None) is what serves; a request that got it keeps it, so a
    swap or an unload never disturbs a request in flight.  `model` changes only under the
    registry's Residency lock.
    """

    def __init__(self, ref):
        self.ref = ref
        self.state, self.since = UNLOADED, time.time()
        self.model = None
        self.error = None
        self.error_at = None
        self.retry_at = 0.0
        self.loads = 0
        self.lock = threading.Lock()   # one load at a time
        self.loading = None            # the load requests wait on for at most a time (ModelRegistry._load_within)
        self.replacing = None          # ArtifactRef of a changed artifact loading beside the model that serves
        self.rejected = None           # fingerprint of a changed artifact that failed to load (not retried)
        self.pinned = False            # preloaded: loaded eagerly, never evicted or unloaded for idleness
        self.gone = False              # left the store or the version policy; never loaded again
        self.leaving = None            # the model UNLOADING: out of service, requests still use it

    def set(self, state, error=None):
        self.state, self.since = state, time.time()
        if error:
            self.error, self.error_at = error, self.since

    def describe(self, clock):
        model = self.model
        info = {"version": str(self.ref.version), "state": self.state, "since": _iso_time(self.since),
                "format": self.ref.format,
                "artifact": {"file": self.ref.file, "size": self.ref.size,
                             "modified": _iso_time(self.ref.mtime_ns / 1e9),
                             "sha256": model.sha256 if model else None},
                "preloaded": self.pinned,
                "loaded_at": _iso_time(model.loaded_at) if model else None,
                "load_seconds": round(model.load_seconds, 6) if model else None,
                "idle_seconds": round(clock() - model.last_used, 3) if model else None,
                "in_flight": (model or self.leaving).inflight if (model or self.leaving) else 0,
                "loads": self.loads, "last_error": self.error, "last_error_at": _iso_time(self.error_at)}
        info.update(model.describe() if model else
                    {"estimator": None, "methods": None, "n_features_in_": None,
                     "feature_names_in_": None, "classes_": None, "sklearn_version_skew": None})
        return info


class CatalogueEntry:
    """One name of the catalogue, as a scan left it: its versions' slots, those served, and where requests go.

    `routes` maps None (no version named) and each label to the VersionSlot that
    answers; `wanted` maps them to the version number the settings ask for.  The two
    differ while a new target loads: the old one keeps answering until it is ready.
    `split`, when the settings name a traffic split, is (cumulative shares, targets): a
    request naming no version goes to the target whose share covers its point in [0, 1).
    """

    def __init__(self, name, versions, served, settings, settings_error, wanted, routes, split=None):
        self.name, self.versions, self.served = name, versions, served
        self.settings, self.settings_error = settings, settings_error
        self.wanted, self.routes, self.split = wanted, routes, split

    def with_route(self, key, slot):
        return CatalogueEntry(self.name, self.versions, self.served, self.settings, self.settings_error,
                              self.wanted, {**self.routes, key: slot}, self.split)

    def routed(self, routing_key):
        """The slot a request naming no version goes to under the split: sticky for a routing key (its
        hash, a stable point in [0, 1), so keys spread by the weights), else at random by weight."""
        bounds, targets = self.split
        point = random.random() if routing_key is None else \
            int.from_bytes(hashlib.blake2b(routing_key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                           "big") / 2.0 ** 64
        target = targets[min(bisect.bisect_right(bounds, point), len(targets) - 1)]
        return self.routes[target] if isinstance(target, str) else self.versions[target]

    def targets(self):
        return set(map(id, self.routes.values()))

    def shadow(self):
        """The slot of the settings' shadow version, or None (none named, or not served while refused settings
        keep older ones in force)."""
        target = self.settings.shadow if self.settings is not None else None
        slot = self.routes.get(target) if isinstance(target, str) else self.versions.get(target)
        return slot if slot is not None and slot.ref.version in self.served else None

    def served_versions(self):
        return [str(number) for number in self.served]

    def describe(self, clock, agreements):
        default = self.routes.get(None)
        labels = {label: str(slot.ref.version) for label, slot in self.routes.items() if label is not None}
        info = {"name": self.name, "latest_version": str(default.ref.version) if default else None,
                "served_versions": self.served_versions(), "labels": labels,
                "version_policy": self.settings.describe()["version_policy"] if self.settings else None,
                "traffic": self._describe_split(), "shadow": self._describe_shadow(agreements),
                "settings_error": self.settings_error, "versions": []}
        for number in sorted(self.versions, reverse=True):
            slot = self.versions[number]
            info["versions"].append({**slot.describe(clock), "served": number in self.served,
                                     "labels": sorted(k for k, v in labels.items() if v == str(number))})
        return info

    def _describe_shadow(self, agreements):
        """The shadow in force and how its answers agree with the served ones so far, or None."""
        slot = self.shadow()
        if slot is None:
            return None
        agreement = agreements.get((self.name, str(slot.ref.version))) or Agreement()
        return {"target": str(self.settings.shadow), "version": str(slot.ref.version),
                "compared": agreement.replayed, "identical": agreement.identical,
                "identical_share": round(agreement.share(), 6) if agreement.replayed else None,
                "mean_abs_diff": agreement.gap_sum / agreement.gap_count if agreement.gap_count else None,
                "max_abs_diff": agreement.gap_max if agreement.gap_count else None,
                "errors": sum(agreement.errors.values()), "dropped": agreement.dropped}

    def _describe_split(self):
        """[{target, version, share}] of the split in force (the version a label answers with now), or None."""
        if self.split is None:
            return None
        bounds, targets = self.split
        slots = [self.routes[target] if isinstance(target, str) else self.versions[target] for target in targets]
        return [{"target": str(target), "version": str(slot.ref.version), "share": round(high - low, 6)}
                for low, high, target, slot in zip((0.0,) + bounds, bounds, targets, slots)]


class Residency:
    """Which models are in memory, and what bounds them: --max-loaded, --idle-unload, requests in flight.

    A load under way counts against --max-loaded, and the least recently used idle model is
    evicted to make room.  A model taken out of service while requests still use it is
    `retired`: it stays resident, counted, until its last request ends.  `lock` guards this,
    every slot's `model` and every model's `inflight`: the registry holds it while it points a
    slot at a new model.
    """

    def __init__(self, limit, clock, changed):
        self.limit, self.clock = limit, clock
        self.changed = changed          # called after what is in memory or in flight changed (Metrics.changed)
        self.lock = threading.Lock()
        self._resident = {}             # LoadedModel -> its VersionSlot, for every model still in memory
        self._reserved = 0              # loads under way

    def reserve(self):
        """Count a load against --max-loaded, evicting the least recently used idle versions for room."""
        with self.lock:
            while self.limit and len(self._resident) + self._reserved >= self.limit:
                idle = [(model.last_used, id(model), model) for model, slot in self._resident.items()
                        if slot.model is model and model.inflight == 0 and not slot.pinned]
                if not idle:
                    raise ModelUnavailable(f"memory bound reached: {self.limit} model version(s) in memory "
                                           "(--max-loaded), all busy or preloaded", retry_after=1)
                victim = min(idle)[2]
                logger.info("model %r version %s evicted (least recently used; --max-loaded %d)",
                            victim.name, victim.version, self.limit)
                self.retire(victim, self._resident[victim])
            self._reserved += 1

    def cancel(self):
        """A reserved load failed."""
        with self.lock:
            self._reserved -= 1

    def admit(self, model, slot):
        """A reserved load succeeded: `model`, of `slot`, is in memory (under `lock`)."""
        self._reserved -= 1
        self._resident[model] = slot
        model.last_used = self.clock()
        self.changed()

    def retire(self, model, slot):
        """Take a model out of service (under `lock`); memory is freed when its last request ends."""
        if slot.model is model:
            slot.model, slot.leaving = None, model if model.inflight else None
            slot.set(UNLOADING if model.inflight else UNLOADED)
        if model.inflight:
            model.retired = True
        else:
            self._resident.pop(model, None)
            self.changed()

    def use(self, slot):
        """The model in `slot`, counted in flight until release(); None if it holds none."""
        with self.lock:
            model = slot.model
            if model is not None:
                model.inflight += 1
                model.last_used = self.clock()
                self.changed()
            return model

    def release(self, model):
        with self.lock:
            model.inflight -= 1
            if model.retired and not model.inflight:
                slot = self._resident.pop(model, None)
                if slot is not None and slot.leaving is model:
                    slot.leaving = None
                    if slot.model is None and slot.state == UNLOADING:
                        slot.set(UNLOADED)
            self.changed()

    def unload_idle(self, seconds):
        """Retire the models nobody used for `seconds`, but preloaded ones."""
        now = self.clock()
        with self.lock:
            for model, slot in list(self._resident.items()):
                if slot.model is model and not slot.pinned and model.inflight == 0 \
                        and now - model.last_used >= seconds:
                    logger.info("model %r version %s unused for %.0f s: unloaded",
                                slot.ref.name, slot.ref.version, now - model.last_used)
                    self.retire(model, slot)

    def count(self):
        return len(self._resident)

    def in_flight(self):
        return sum(model.inflight for model in list(self._resident))


# What a request naming no model, or any model, is told when the store holds none (the log names the folder,
# which clients are not shown).
EMPTY_STORE = "the model store has no models: add one as NAME.joblib or NAME/1/model.joblib"


def _warm(model, rows):
    """Run every method of a freshly loaded model once, before it serves, so no client pays a first call's cost.

    The rows take the requests' own path (model_inputs, then LoadedModel.call: the native
    predictor where it answers).  They are the model's "warmup" rows when its settings give
    some; a failure then fails the load, as a bad warm-up record does in TF Serving: the operator
    said this model takes those rows, so a model that refuses them is not the one they meant.
    Without them a tabular model is warmed on one row of zeros, and a failure there is only
    logged (the guess may not suit it: categories, a log transform); a model without a fixed
    width (text, sequences) is not warmed, nor one whose settings say "warmup": false.  What was
    done, and how long it took, goes in `model.warmup` for the load's log line.
    """
    if rows is False:
        model.warmup = f'not warmed: its {SETTINGS_FILE} says "warmup": false'
        return
    if rows is None and model.n_features is None:
        model.warmup = f'not warmed: no fixed-width rows to derive; give "warmup" rows in its {SETTINGS_FILE}'
        return
    given = rows is not None
    rows = rows if given else [[0.0] * model.n_features]
    started = time.perf_counter()
    try:
        inputs = model_inputs(model, rows, len(rows))
        for method in model.methods:
            model.call(method, inputs)
    except Exception as error:
        if given:
            raise ArtifactError(f'the "warmup" rows of its {SETTINGS_FILE} failed: {error}') from None
        model.warmup = f"not warmed: a row of zeros failed: {_clip(str(error), 200)}"
        logger.warning("model %r version %s %s; its first request pays the first call's cost", model.name,
                       model.version, model.warmup)
        return
    model.warmup = (f"warmed {', '.join(model.methods)} on {len(rows)} row{'s' if len(rows) > 1 else ''} "
                    f"{'from its settings' if given else 'of zeros'} in {(time.perf_counter() - started) * 1000:.1f} ms")


class ModelRegistry:
    """Every model in the store, the state of each of its versions, and their lifecycle.

    The catalogue ({name: CatalogueEntry}) is replaced whole by each rescan, so a
    request reads a consistent view without a lock.  Housekeeping (rescans every
    `poll_interval`, idle unloads, preloads) runs in `refresh()`, which both requests
    and a watcher thread call.  The watcher is started lazily, in the process that
    serves: one started before a pre-fork host forks would not survive the fork.
    Loads run in background threads beside the requests, except a first load on
    demand, which its requests wait for.
    """

    def __init__(self, config, clock=time.monotonic, watch=True):
        self.config = config
        self.store = ModelStore(config.store)
        self.clock = clock
        self.watch = watch
        self.draining = False           # set at shutdown: readiness turns false first
        self._catalogue = {}
        self._scanned = False
        self._scan_error = None
        self._scan_lock = threading.Lock()
        self._last_scan = None
        self._next_tick = 0.0
        self._unsettled = {}            # (name, version) -> fingerprint seen once, waiting to be seen again
        self._settings = {}             # name -> (fingerprint, ModelSettings or None, error)
        self.metrics = Metrics({"model_service_models_loaded": self.loaded_count,
                                "model_service_requests_in_flight": self.in_flight})
        self.residency = Residency(config.max_loaded, clock, self.metrics.changed)
        self.agreements = {}            # (name, shadow version) -> Agreement, filled by the app's Shadow
        self._preloading = False
        self._watcher_pid = None
        tick = min(config.poll_interval or math.inf,
                   1.0 if config.idle_unload or config.preload else math.inf)
        self._tick_seconds = tick

    # -- housekeeping ---------------------------------------------------------
    def refresh(self):
        """Scan at the first call; then, at most every tick, rescan, unload idle versions and preload."""
        if not self._scanned:
            with self._scan_lock:
                if not self._scanned:
                    self._scan(settle=False)
                    self._housekeep()
            return
        if self.clock() < self._next_tick:
            return
        if self._scan_lock.acquire(blocking=False):
            try:
                if self.clock() >= self._next_tick:
                    if self.config.poll_interval and self.clock() - self._last_scan >= self.config.poll_interval:
                        self._scan(settle=True)
                    self._housekeep()
            finally:
                self._scan_lock.release()

    def _housekeep(self):
        self._next_tick = self.clock() + self._tick_seconds
        if self.config.idle_unload:
            self.residency.unload_idle(self.config.idle_unload)
        if self.config.preload:
            self._preload()
        if self.watch and self._tick_seconds < math.inf and self._watcher_pid != os.getpid():
            self._watcher_pid = os.getpid()
            threading.Thread(target=self._watch, args=(weakref.ref(self), os.getpid(), self._tick_seconds),
                             name="model-watcher", daemon=True).start()

    def stop_watching(self):
        """End this process's watcher thread (requests still refresh); for tests and embedders."""
        self._watcher_pid = None

    @staticmethod
    def _watch(registry_ref, pid, tick):
        """Keep housekeeping going while no request comes (idle unloads, new versions preloaded).

        It holds the registry weakly, so a registry nobody uses any more ends its watcher.
        """
        while True:
            time.sleep(tick)
            registry = registry_ref()
            if registry is None or registry._watcher_pid != pid:
                return
            try:
                registry.refresh()
            except Exception:  # never let the watcher die silently
                logger.exception("model store housekeeping failed")
            del registry

    def _scan(self, settle):
        self._last_scan = self.clock()
        try:
            found = self.store.scan()
        except OSError as error:
            self._scan_error = str(error)
            logger.error("cannot scan the model store: %s", error)
            return
        first = not self._scanned
        self._apply(found, settle and not first)
        self._scan_error, self._scanned = None, True
        if first and not found:
            logger.warning("model store %s: %s", self.store.root, EMPTY_STORE)
        elif first:
            logger.info("model store %s: %d model(s): %s", self.store.root, len(found), ", ".join(sorted(found)))

    def _apply(self, found, settle):
        """Make the catalogue match the store: add new versions, replace changed ones, drop removed ones.

        With `settle`, a new or changed artifact is used only once two scans in a row
        saw the same size and mtime (a file still being written changes between them).
        A version in use is replaced only after its new artifact has loaded, and a model
        whose versions all left the store stays while a new one settles (`mv m/1 m/2`).
        """
        old_catalogue, catalogue, unsettled = self._catalogue, {}, {}
        for name, refs in found.items():
            self._read_settings(name, refs)    # first: a replacement started below loads with these settings
            previous = old_catalogue.get(name)
            old, slots = previous.versions if previous else {}, {}
            for number, ref in refs.items():
                slot = old.get(number)
                if slot is not None and slot.ref.fingerprint == ref.fingerprint:
                    slots[number] = slot
                elif settle and self._unsettled.get((name, number)) != ref.fingerprint:
                    unsettled[(name, number)] = ref.fingerprint
                    if slot is not None:
                        slots[number] = slot        # the old artifact serves until the new one settles
                elif slot is None or slot.model is None:
                    slots[number] = VersionSlot(ref)
                else:
                    slots[number] = slot
                    if slot.replacing is None and slot.rejected != ref.fingerprint:
                        slot.replacing = ref
                        _in_background(self._replace, slot, ref)
            pending = {number for (model, number) in unsettled if model == name and number not in slots}
            if slots or (previous and pending):
                catalogue[name] = self._build_entry(name, slots, previous, pending)
        self._unsettled = unsettled
        self._catalogue = catalogue
        self._unload_unserved(old_catalogue, catalogue)

    def _build_entry(self, name, slots, previous, pending=()):
        """Apply the model's settings to its versions: what is served, and where each route points.

        `pending` are the version numbers whose new artifacts have not settled yet.
        """
        _, settings, error = self._settings[name]           # read by _apply just before
        if settings is None:
            return CatalogueEntry(name, slots, (), None, error, {}, {})
        served = settings.select(slots)
        wanted = {None: served[0]} if served else {}
        wanted.update({label: n for label, n in settings.labels.items() if n in served})
        routes = {}
        for key, current in (previous.routes.items() if previous else ()):
            if key not in wanted and self._holds(current, slots, pending):
                routes[key] = current
        for key, number in wanted.items():
            current = previous.routes.get(key) if previous else None
            routes[key] = self._route(name, key, current, slots[number], slots, pending)
        pinned = self._preloaded(name)
        for number, slot in slots.items():
            slot.pinned = pinned and number in served
        return CatalogueEntry(name, slots, served, settings, error, wanted, routes, self._split(settings, served))

    @staticmethod
    def _split(settings, served):
        """The traffic split, resolved once per scan: (cumulative shares, targets), over the targets served now.

        A target can stop being served only while previous settings stay in force (the file
        that would serve it was refused): its share then goes to the others, never to a 404.
        """
        split = [(target, weight) for target, weight in settings.traffic.items() if weight > 0 and
                 (settings.labels[target] if isinstance(target, str) else target) in served]
        total = sum(weight for _, weight in split)
        if not total:
            return None
        return tuple(itertools.accumulate(weight / total for _, weight in split)), tuple(t for t, _ in split)

    def _read_settings(self, name, numbers):
        """(settings, error) for a model with versions `numbers` on disk; a broken file keeps the last good
        settings and shows why.  Read again when the file or the versions change: a traffic split is valid
        only while the versions it names are served."""
        ref = self.store.settings_files.get(name)
        fingerprint = (ref.fingerprint if ref else None, tuple(sorted(numbers)))
        cached = self._settings.get(name)
        if cached and cached[0] == fingerprint:
            return cached[1], cached[2]
        if ref is None:
            settings, error = DEFAULT_SETTINGS, None
        else:
            try:
                settings, error = ModelSettings.read(ref), None
                settings.check_served(numbers)
            except ValueError as problem:
                error = f"{ref.file}: {problem}"
                settings = cached[1] if cached else None
                logger.error("model %r: %s%s", name, error,
                             "; the previous settings stay" if settings else "; the model is not served")
        self._settings[name] = (fingerprint, settings, error)
        return settings, error

    def _load_options(self, ref):
        """How to load `ref` now: the service's flags, its model's settings and the digests listed for it."""
        cached = self._settings.get(ref.name)
        settings = cached[1] if cached and cached[1] is not None else DEFAULT_SETTINGS
        digests = []
        if ref.version in settings.sha256:
            digests.append((settings.sha256[ref.version], f"{ref.name}/{SETTINGS_FILE}"))
        if ref.file in self.store.sha256sums:
            digests.append((self.store.sha256sums[ref.file], SHA256SUMS_FILE))
        return LoadOptions(safe_pickle=self.config.safe_pickle or settings.safe_pickle, trust=self.config.trust,
                           sha256=tuple(digests), strict_versions=self.config.strict_versions,
                           json_limits=JsonLimits.of(self.config))

    def _route(self, name, key, current, wanted, slots, pending):
        """The version a route should answer with now: `wanted`, unless it must load first.

        TF Serving's availability-preserving rule: what answers keeps answering until its
        successor has loaded, even after its artifact left the store (its model is still in
        memory), and a route never falls back to an older version because its own version's
        successor has not settled yet.
        """
        if wanted is current or current is None:
            return wanted
        if self._holds(current, slots, pending):
            return current
        if wanted.model is not None:
            return wanted
        departed = slots.get(current.ref.version) is not current
        if current.model is None and (departed or wanted.state != FAILED):
            return wanted              # nothing in memory to protect: its next request loads the new one
        if wanted.state != LOADING:
            _in_background(self._promote, name, key, wanted)
        return current

    @staticmethod
    def _holds(current, slots, pending):
        """Whether a route stays on `current`, which left the store, while a version as high is settling.

        Renaming the serving version's folder to a higher number (`mv m/5 m/6`) is, for one
        scan, a removal of 5 and an unsettled 6: the route keeps answering with 5 from memory
        (or 503 with Retry-After if 5 is not loaded), never with 4.
        """
        return current is not None and slots.get(current.ref.version) is not current and \
            any(number >= current.ref.version for number in pending)

    def _promote(self, name, key, slot):
        """Load a route's new target in the background, then point the route at it."""
        try:
            self._load(slot, warm=True)
        except ServiceError:
            return                     # recorded in the slot's status; the previous version keeps answering
        with self._scan_lock:
            entry = self._catalogue.get(name)
            if entry is None or entry.wanted.get(key) != slot.ref.version or \
                    entry.versions.get(slot.ref.version) is not slot:
                return
            previous = self._catalogue
            self._catalogue = {**previous, name: entry.with_route(key, slot)}
            self._unload_unserved(previous, self._catalogue)
        logger.info("model %r %s now answers with version %s", name,
                    f"label {key!r}" if key else "(latest)", slot.ref.version)

    def _unload_unserved(self, old_catalogue, catalogue):
        """Unload what left the store, left the policy or stopped being a route's target.

        A version that left the store while a route still answers with it (see _holds) is
        marked gone but stays in memory until no route points at it.
        """
        keep = set()
        for entry in catalogue.values():
            keep |= entry.targets()
            keep.update(id(entry.versions[n]) for n in entry.served)
        departed = []
        with self.residency.lock:
            for name, entry in old_catalogue.items():
                current = catalogue.get(name)
                slots = {id(slot): (slot.ref.version, slot) for slot in entry.routes.values()}
                slots.update((id(slot), (number, slot)) for number, slot in entry.versions.items())
                for number, slot in slots.values():
                    removed = current is None or current.versions.get(number) is not slot
                    if removed:
                        slot.gone = True
                        if id(slot) not in keep and (current is None or number not in current.versions):
                            departed.append((name, str(number)))
                    if slot.model is not None and id(slot) not in keep:
                        logger.info("model %r version %s %s: unloaded", name, number,
                                    "left the store" if removed else "is no longer served")
                        self.residency.retire(slot.model, slot)
        for name, version in departed:       # its series end, so a store that keeps publishing stays bounded
            self.metrics.forget(name, version)
            self.agreements.pop((name, version), None)

    def _replace(self, slot, ref):
        """Load a changed artifact beside the model that serves, then swap; a failure keeps the old one.

        Returns what happened: "RELOADED", "FAILED" or "DEFERRED" (no room under --max-loaded now;
        the next rescan tries again).
        """
        try:
            self.residency.reserve()
        except ModelUnavailable:
            slot.replacing = None
            return "DEFERRED"
        try:
            model = self._build(ref, warm=True)
        except Exception as error:
            self.residency.cancel()
            slot.rejected = ref.fingerprint
            slot.error = f"changed artifact not loaded, the previous one still serves: {error}"
            slot.error_at = time.time()
            logger.error("model %r version %s: %s", ref.name, ref.version, slot.error)
            return FAILED
        else:
            with self.residency.lock:
                self.residency.admit(model, slot)
                old, slot.ref, slot.model = slot.model, ref, model
                slot.error, slot.rejected = None, None
                slot.loads += 1
                if old is not None:
                    self.residency.retire(old, slot)
                if slot.state != AVAILABLE:       # --max-loaded may have evicted the old one to make room
                    slot.set(AVAILABLE)
                if slot.gone:
                    self.residency.retire(model, slot)
            logger.info("model %r version %s reloaded from its artifact (%s)", ref.name, ref.version, model.warmup,
                        extra={"model": ref.name, "version": ref.version})
            return "RELOADED"
        finally:
            slot.replacing = None

    def _preloaded(self, name):
        return self.config.preload == ALL_MODELS or name in self.config.preload

    def _preload(self):
        """Load, one after another in the background, the preloaded versions not in memory yet."""
        if self._preloading:
            return
        pending = self._unloaded_preloads()
        if pending:
            self._preloading = True
            _in_background(self._preload_all, pending)

    def _unloaded_preloads(self):
        now = self.clock()
        return [slot for entry in self._catalogue.values() for slot in entry.versions.values()
                if slot.pinned and slot.model is None and slot.state != LOADING
                and not (slot.state == FAILED and slot.retry_at > now)]

    def _preload_all(self, slots):
        try:
            for slot in slots:
                if not slot.gone:
                    try:
                        self._load(slot, warm=True)
                    except ServiceError:
                        pass                       # shown in the status and in readiness; retried later
        finally:
            self._preloading = False

    def load_before_fork(self):
        """In a pre-fork host's parent: scan and load the preloaded versions now, in this thread.

        The workers forked next share these models' memory (copy on write) instead of each
        loading its own.  No thread is started, and none runs at the fork: threads do not
        survive it, and a lock one of them held would stay held in every worker.  Each worker's
        first refresh() starts its own watcher, which loads what the store publishes later.
        """
        for module in ("numpy", "sklearn", "joblib"):      # imported once, shared by every worker
            importlib.import_module(module)
        with self._scan_lock:
            self._scan(settle=False)
        if self.config.preload:
            self._preload_all(self._unloaded_preloads())

    # -- requests -----------------------------------------------------------------
    def acquire(self, name, version=None, label=None, slot=None, routing_key=None, wait=None):
        """The model that answers a request (in `slot` when the caller resolved it), loaded if need be, waiting
        at most `wait` seconds for a load when given; pair with release()."""
        for _ in range(3):
            slot = slot or self.slot(name, version, label, routing_key)
            model = self.residency.use(slot)
            if model is not None:
                return model
            if not slot.gone:
                self._load(slot) if wait is None else self._load_within(slot, wait)
            last = slot
            if slot.gone:       # a rescan replaced it: look the request up again (a split may pick anew)
                slot = None
        if last.gone:          # held by _holds while its successor settles: never an older version instead
            raise ModelUnavailable(f"model {name!r} version {last.ref.version} left the store and the version "
                                   "that follows it is not ready yet", retry_after=1, model=name)
        raise ModelUnavailable(f"model {name!r} version {last.ref.version} was unloaded as soon as it loaded; "
                               "is --max-loaded too small for the traffic?", retry_after=1, model=name)

    def release(self, model):
        self.residency.release(model)

    def get(self, name, version=None, label=None):
        """The loaded model, loading (and warming) it on first use (one load however many callers wait)."""
        slot = self.slot(name, version, label)
        model = slot.model
        return model if model is not None else self._load(slot, warm=True)

    def _build(self, ref, warm):
        """_build_model with this registry's load options, counted in the metrics; warmed (_warm) when no
        request waits for it: a request that loads a model is its first call, and would only pay for
        every other method's too."""
        labels = (("model", ref.name), ("version", str(ref.version)))
        started = time.perf_counter()
        try:
            settings = self._settings.get(ref.name, (None, None))[1] or DEFAULT_SETTINGS
            with _logging_about(model=ref.name, version=ref.version):
                model = _build_model(ref, self._load_options(ref), native=self.config.native and settings.native)
                if warm:
                    _warm(model, settings.warmup)
                else:
                    model.warmup = "not warmed: loaded for a request, which is its first call"
        except Exception:
            self.metrics.count("model_service_model_loads_total", labels + (("outcome", "failure"),))
            raise
        self.metrics.count("model_service_model_loads_total", labels + (("outcome", "success"),))
        self.metrics.observe("model_service_model_load_duration_seconds", labels, time.perf_counter() - started)
        model.metrics = self.metrics        # from now on: the warm-up's calls were no client's
        cached = self._settings.get(ref.name)
        batching = cached[1].batching if cached and cached[1] is not None else None
        size, latency = batching if batching else (self.config.max_batch_size, self.config.max_latency_ms)
        if batching is not False and size > 1 and model.n_features is not None:
            model.batcher = Batcher(model, size, latency / 1000, self.metrics)
        return model

    _loading = threading.Lock()         # guards VersionSlot.loading

    def _load_within(self, slot, seconds):
        """_load for a request that may wait at most `seconds` (--max-predict-seconds): the load runs in the
        background, one per version however many requests wait on it, and goes on past their wait, which
        ends in a 503 with Retry-After (a load is not a prediction: its successors find the model loaded)."""
        import concurrent.futures

        with self._loading:
            if slot.loading is None or slot.loading.done():
                slot.loading = concurrent.futures.Future()
                _in_background(self._load_into, slot, slot.loading)
            loading = slot.loading
        try:
            loading.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            raise ModelUnavailable(f"model {slot.ref.name!r} version {slot.ref.version} is still loading after "
                                   f"{seconds:g} s (--max-predict-seconds); try again", retry_after=1,
                                   model=slot.ref.name, version=str(slot.ref.version)) from None

    def _load_into(self, slot, future):
        try:
            future.set_result(self._load(slot))
        except BaseException as error:      # handed to the requests that wait on it
            future.set_exception(error)

    def _load(self, slot, warm=False):
        with slot.lock:
            if slot.model is not None:
                return slot.model
            ref = slot.ref
            wait = slot.retry_at - self.clock()
            if slot.state == FAILED and wait > 0:
                raise ModelUnavailable(f"model {ref.name!r} version {ref.version} failed to load: {slot.error}",
                                       retry_after=math.ceil(wait), model=ref.name, version=str(ref.version))
            self.residency.reserve()
            slot.set(LOADING)
            slot.loads += 1
            try:
                model = self._build(ref, warm)
            except Exception as error:
                self.residency.cancel()
                slot.set(FAILED, str(error) or type(error).__name__)
                slot.retry_at = self.clock() + self.config.load_retry_seconds
                logger.error("model %r version %s failed to load: %s", ref.name, ref.version, slot.error,
                             extra={"model": ref.name, "version": ref.version})
                raise ModelUnavailable(f"model {ref.name!r} version {ref.version} failed to load: {slot.error}",
                                       retry_after=math.ceil(self.config.load_retry_seconds) or None,
                                       model=ref.name, version=str(ref.version)) from None
            with self.residency.lock:
                self.residency.admit(model, slot)
                slot.model, slot.error = model, None
                slot.set(AVAILABLE)
                if slot.gone:
                    self.residency.retire(model, slot)
            logger.info("loaded model %r version %s (%s, %.3f s; %s)", ref.name, ref.version, ref.format,
                        model.load_seconds, model.warmup, extra={"model": ref.name, "version": ref.version})
            return model

    # -- lookups ------------------------------------------------------------------
    def names(self):
        return sorted(self._catalogue)

    def default_model_name(self):
        if self.config.default_model:
            return self.config.default_model
        catalogue = self._catalogue
        if len(catalogue) == 1:
            return next(iter(catalogue))
        if not catalogue:
            self.require_store()
            raise NotFound(EMPTY_STORE, models=[])
        raise NotFound(f"no default model: the store holds {len(catalogue)} models "
                       f"({', '.join(sorted(catalogue)) or 'none'}); start the service with --default-model NAME")

    def entry(self, name):
        """The CatalogueEntry called `name`; 400 for an invalid name, 404 if there is none."""
        entry = self._catalogue.get(name)
        if entry is None:
            self.require_store()
            if not valid_model_name(name):
                raise BadRequest(f"invalid model name {_clip(repr(name), 80)}: names match ^{MODEL_NAME.pattern}$")
            raise NotFound(f"model {name!r} not found" + (f": {EMPTY_STORE}" if not self._catalogue else ""),
                           model=name, models=self.names())
        return entry

    def shadow_slot(self, name):
        """The VersionSlot of model `name`'s shadow version; None when it has none (or is gone: a request
        answered before a rescan removed the model is not a 404 for its shadow)."""
        entry = self._catalogue.get(name)
        return entry.shadow() if entry is not None else None

    def slot(self, name, version=None, label=None, routing_key=None):
        """The VersionSlot that answers for a name and a version string or label; 4xx/503 if none.

        Naming neither, the model's traffic split decides, by `routing_key` when there is one."""
        entry = self.entry(name)
        if entry.settings is None:
            raise ModelUnavailable(f"model {name!r} is not served: {entry.settings_error}", model=name)
        if label is not None:
            slot = entry.routes.get(label)
            if slot is None:
                known = label in entry.settings.labels
                raise NotFound(f"label {_clip(repr(label), 80)} of model {name!r} "
                               + (f"names version {entry.settings.labels[label]}, which is not served"
                                  if known else "is not defined"),
                               model=name, labels={k: str(v) for k, v in entry.wanted.items() if k},
                               served_versions=entry.served_versions())
            return slot
        if version is None:
            if entry.split is not None:
                return entry.routed(routing_key)
            slot = entry.routes.get(None)
            if slot is None:
                raise NotFound(f"model {name!r} serves no version: none of "
                               f"{', '.join(map(str, sorted(entry.versions)))} is in its version policy",
                               model=name, served_versions=entry.served_versions())
            return slot
        if not VERSION.fullmatch(version):
            raise BadRequest(f"invalid version {_clip(repr(version), 40)}: versions are positive integers",
                             model=name)
        slot = entry.versions.get(int(version))
        if slot is None or int(version) not in entry.served:
            raise NotFound(f"model {name!r} " + (f"has no version {version}" if slot is None else
                                                 f"does not serve version {version} (see its version policy)"),
                           model=name, served_versions=entry.served_versions())
        return slot

    def require_store(self):
        """503 unless the store has been scanned (it may be missing or unreadable)."""
        if not self._scanned:
            raise ModelUnavailable("model store unavailable: "
                                   + (self._scan_error or "it has not been scanned yet"))

    @property
    def ready(self):
        return self.not_ready_reason() is None

    def not_ready_reason(self):
        """None when ready: store scanned and every preloaded model's routes loaded; else why not."""
        if self.draining:
            return "shutting down"
        if not self._scanned:
            return "model store unavailable: " + (self._scan_error or "it has not been scanned yet")
        catalogue, reasons = self._catalogue, []
        if self.config.preload != ALL_MODELS:
            reasons += [f"preloaded model {name!r} is not in the store" for name in self.config.preload
                        if name not in catalogue]
        for name in sorted(catalogue):
            entry = catalogue[name]
            if not self._preloaded(name):
                continue
            if entry.settings is None:
                reasons.append(f"model {name!r}: {entry.settings_error}")
            for slot in {id(s): s for s in entry.routes.values()}.values():
                if slot.model is None:
                    reasons.append(f"model {name!r} version {slot.ref.version} is {slot.state}"
                                   + (f": {slot.error}" if slot.state == FAILED else ""))
        return "; ".join(reasons) or None

    def describe(self, name):
        return self.entry(name).describe(self.clock, self.agreements)

    def agreement(self, name, version):
        """The Agreement of model `name`'s shadow version `version` with the versions that answer (made once)."""
        key = (name, version)
        agreement = self.agreements.get(key)
        if agreement is None:
            agreement = self.agreements.setdefault(key, Agreement())
        return agreement

    def model_settings(self, name):
        """The settings in force for `name` (the defaults when it has none, or left the store)."""
        entry = self._catalogue.get(name)
        return entry.settings if entry is not None and entry.settings is not None else DEFAULT_SETTINGS

    def describe_all(self):
        catalogue = self._catalogue
        return [catalogue[name].describe(self.clock, self.agreements) for name in sorted(catalogue)]

    def known_features(self):
        """{name: feature names} for the models whose default version is loaded and names its features."""
        features = {}
        for name, entry in sorted(self._catalogue.items()):
            slot = entry.routes.get(None)
            model = slot.model if slot is not None else None
            if model is not None and model.feature_names:
                features[name] = list(model.feature_names)
        return features

    def loaded_count(self):
        return self.residency.count()

    def in_flight(self):
        return self.residency.in_flight()

    # -- administration -------------------------------------------------------------
    def unload(self, name):
        """Take every loaded version of `name` out of memory (requests in flight finish); loaded again on use."""
        entry = self.entry(name)
        with self.residency.lock:
            for slot in entry.versions.values():
                if slot.model is not None:
                    self.residency.retire(slot.model, slot)

    def rescan(self):
        """Scan now, using new artifacts at once: the operator who asks says they are complete."""
        with self._scan_lock:
            self._scan(settle=False)
            self._housekeep()
        if self._scan_error:
            raise ModelUnavailable(f"model store unavailable: {self._scan_error}")
        return self.names()

    def reload(self, name):
        """Rescan, then load every loaded served version of `name` again, swapping each once loaded.

        Returns {version: outcome}; a version not in memory is left to load on its next
        use, and a failed one is tried again then, without waiting for its pause.
        """
        self.rescan()
        entry = self.entry(name)
        results = {}
        for number in entry.served:
            slot = entry.versions[number]
            if slot.replacing is not None:         # the rescan found it changed and is loading it already
                while slot.replacing is not None:
                    time.sleep(0.01)
                results[str(number)] = FAILED if slot.rejected else "RELOADED"
            elif slot.model is None:
                slot.retry_at = 0.0
                results[str(number)] = slot.state
            else:
                slot.replacing, slot.rejected = slot.ref, None
                results[str(number)] = self._replace(slot, slot.ref)
        return results


###############################################################################
# Request bodies ##############################################################
###############################################################################
# Reading a request body within its bounds (size, nesting) and parsing it as JSON.
# Nothing here chooses a decoder from what the client claims: JSON is the only
# body format, whatever the Content-Type says.  That includes curl -d's default,
# application/x-www-form-urlencoded (TF Serving's own examples send JSON that
# way); forms are never decoded, and multipart bodies are refused.  A body that is
# not JSON is answered with an example of the one its route takes.


CHUNK_SIZE_LINE = re.compile(rb"[0-9A-Fa-f]{1,8}(;[^\r\n]*)?\r?\n")


def read_body(environ, limit):
    """The request body as bytes, at most `limit` of them (413 above, decided before reading)."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            length = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if length > limit:
            raise _too_large(limit)
        return environ["wsgi.input"].read(length) if length > 0 else b""
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    stream, chunks = environ["wsgi.input"], []
    if not environ.get("wsgi.input_terminated"):
        # waitress and gunicorn decode the chunks and say so; wsgiref hands them over still framed;
        # some hosts decode them without saying so.  A chunk-size line tells the two last apart.
        first = stream.readline(1026)
        if CHUNK_SIZE_LINE.fullmatch(first):
            return _dechunk(stream, int(first.split(b";", 1)[0], 16), limit)
        chunks.append(first)
    total = sum(map(len, chunks))
    while total <= limit:                   # a decoded body: read to its end
        chunk = stream.read(min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise _too_large(limit)


def _too_large(limit):
    return PayloadTooLarge(f"the request body is over the limit of {limit} bytes (--max-body-bytes)")


def _dechunk(stream, size, limit):
    """The rest of a body still in chunked framing, its first chunk `size` bytes long."""
    chunks, total = [], 0
    while size:
        total += size
        if total > limit:
            raise _too_large(limit)
        chunk = stream.read(size)
        if len(chunk) != size or stream.readline(3).strip():       # each chunk ends with CRLF
            raise BadRequest("malformed chunked request body")
        chunks.append(chunk)
        line = stream.readline(1026)
        if not CHUNK_SIZE_LINE.fullmatch(line):
            raise BadRequest("malformed chunked request body")
        size = int(line.split(b";", 1)[0], 16)
    for _ in range(64):                                             # trailer fields, up to the blank line
        if not stream.readline(8192).strip():
            break
    return b"".join(chunks)


def check_content_type(environ):
    """Refuse the body types that cannot be JSON (multipart) or are not UTF-8."""
    content_type = environ.get("CONTENT_TYPE", "").lower()
    if content_type.startswith("multipart/"):
        raise NotJSON(f"a {content_type.split(';')[0]} body is not JSON", media_type=True)
    if "charset=" in content_type:
        charset = content_type.split("charset=", 1)[1].split(";")[0].strip().strip('"')
        if charset not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"JSON must be UTF-8, not {charset}")
    if environ.get("HTTP_CONTENT_ENCODING", "identity").lower() not in ("identity", ""):
        raise UnsupportedMediaType("compressed request bodies are not accepted")


def json_body(environ, config, required=True):
    """The request's JSON body within --max-body-bytes and --max-depth; {} for an empty optional one."""
    check_content_type(environ)
    body = read_body(environ, config.max_body_bytes)
    if not required and not body.strip():
        return {}
    return parse_json(body, config.max_depth)


def not_json_refusal(error, environ, example):
    """The answer to a NotJSON on a route that takes a body: a 415 or a 400 showing `example`.

    A body that parses as JSON is read whatever its Content-Type says, so this is reached
    only by a body that does not: curl -d's application/x-www-form-urlencoded around JSON
    still works, and a real form (``a=1&b=2``), XML or CSV is refused.  It is a 415 when the
    Content-Type names another format (or the error is one of media type, multipart); a 400
    when the client claimed JSON or named no format (none, text/plain, octet-stream), as the
    body is then malformed JSON.  Either way the message shows JSON the route takes.
    """
    media_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    message, refusal = error.message, BadRequest
    if error.media_type:
        refusal = UnsupportedMediaType
    elif not _claims_json(media_type):
        message, refusal = f"Content-Type {media_type}: {error.message}", UnsupportedMediaType
    if example is not None:
        message += f"; send JSON with Content-Type: application/json, for example {json.dumps(example)}"
    return refusal(message, **error.fields)


def _claims_json(media_type):
    """Whether a Content-Type says JSON, or names no format at all (the body decides)."""
    return media_type in ("", "text/plain", "application/octet-stream") or media_type.endswith(("/json", "+json"))


def parse_json(data, max_depth, what="request body"):
    """Parse JSON text (bytes or str) with a nesting bound; every failure is a 400.

    Strict RFC 8259, in every protocol: Python's json module also reads NaN, Infinity and
    -Infinity, which are not JSON, and turns numbers beyond a float's range (1e400) into
    infinity; both are refused, so no value reaches a model that the client could not have
    written in JSON.  A missing value is null.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
        except UnicodeDecodeError:
            raise NotJSON(f"{what} is not valid UTF-8") from None
    if not data.strip():
        raise NotJSON(f"{what} is empty: send JSON")
    try:
        value = _strict_json(data)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise NotJSON(f"{what} is not valid JSON: {error}") from None
    except ValueError as error:                 # JSON's syntax, with NaN or a number beyond a float
        raise BadRequest(f"{what} is not valid JSON: {error}") from None
    if _nested_deeper_than(max_depth, raw):
        raise BadRequest(f"{what} is nested deeper than {max_depth} levels")
    return value


def _strict_json(text):
    """json.loads as RFC 8259 reads JSON: ValueError for NaN and Infinity, and for a number beyond a float."""
    if _MAYBE_OUT_OF_RANGE.search(text):        # rare: pay for a hook on every float only then
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    return json.loads(text, parse_constant=_not_json)


_MAYBE_OUT_OF_RANGE = re.compile(r"[eE]\+?0*[1-9][0-9]{2}|[0-9]{300}")     # an exponent >= 100, or 300 digits


def _not_json(token):
    """parse_constant: NaN, Infinity and -Infinity are JavaScript, not JSON."""
    raise ValueError(f"{token} is not a JSON value (RFC 8259); send null for a missing value")


def _finite_float(text):
    """parse_float: a number beyond a float's range would silently become infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_clip(text, 40)} is out of a float's range")
    return value


JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
PYTHON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
JSON_PAIRS, PYTHON_PAIRS = (b"[]", b"{}"), (b"[]", b"{}", b"()")


def _nested_deeper_than(limit, text, strings=JSON_STRING, pairs=JSON_PAIRS):
    """Whether text nests its brackets (JSON's, or a Python literal's with `PYTHON_*`) more than `limit` deep.

    Read from the text, before or instead of walking a parsed value: walking costs one check
    per number (100 µs for 64 rows), and a Python literal must be measured before
    `ast.literal_eval` recurses into it.  Strings are dropped, then all but the brackets, and
    each round removes the innermost pairs (marked first, so a pair they uncover waits for the
    next round): the rounds needed are the depth.  Brackets that never pair up count as deep.
    """
    opened = 0
    for pair in pairs:                          # the common case, a shallow body, ends here
        opened += text.count(pair[:1])
    if opened <= limit:
        return False
    keep = b"".join(pairs)
    brackets = strings.sub(b"", text).translate(None, bytes(c for c in range(256) if c not in keep))
    for _ in range(limit):
        for pair in pairs:
            brackets = brackets.replace(pair, b"\0")
        brackets = brackets.replace(b"\0", b"")
        if not brackets:
            return False
    return True


def parse_literal(text, max_depth, max_length=100_000):
    """A JSON value or Python literal from a URL (the seed's GET /predict/<sen>), parsed safely."""
    if len(text) > max_length:
        raise BadRequest(f"input is longer than {max_length} characters")
    raw = text.encode("utf-8", "surrogatepass")
    try:
        value = _strict_json(text)
    except (json.JSONDecodeError, RecursionError):
        return _parse_python_literal(text, raw, max_depth)
    except ValueError as error:                 # JSON, but NaN or a number beyond a float: as parse_json says
        raise BadRequest(f"input is not valid JSON: {error}") from None
    if _nested_deeper_than(max_depth, raw):
        raise BadRequest(f"input is nested deeper than {max_depth} levels")
    return value


def _parse_python_literal(text, raw, max_depth):
    """A Python literal, measured before ast.literal_eval recurses into it; its numbers as JSON's must be."""
    if _nested_deeper_than(max_depth, raw, PYTHON_STRING, PYTHON_PAIRS):
        raise BadRequest(f"input is nested deeper than {max_depth} levels")
    try:
        value = _tuples_to_lists(ast.literal_eval(text))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise BadRequest("input is neither JSON nor a Python literal") from None
    if not all(map(math.isfinite, _floats(value))):
        raise BadRequest("input holds a number beyond a float's range; send null for a missing value")
    return value


def _floats(value):
    """Every float inside nested lists and dicts."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            yield item
        elif isinstance(item, (list, dict)):
            stack.extend(item.values() if isinstance(item, dict) else item)


def _tuples_to_lists(value):
    """Python literals may use tuples where JSON has lists; the model sees lists either way."""
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _request_id(environ):
    """The client's X-Request-ID if it is a plain token, else a new one; kept in the environ."""
    request_id = environ.get("service.request_id")
    if request_id is None:
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(16).hex()       # uuid4's randomness, without building a UUID
        environ["service.request_id"] = request_id
    return request_id


###############################################################################
# Protocol codecs #############################################################
###############################################################################
# Turning parsed bodies into estimator inputs and estimator outputs into each
# protocol's JSON: the native API, TF Serving REST (KServe V1), the Open Inference
# Protocol (V2) and MLflow scoring.


def choose_method(model, requested, unknown=NotFound):
    """The method to call: `unknown` (404) for a name that is no prediction method, 400 for one the model lacks."""
    method = requested or "predict"
    if method not in model.methods:
        error = unknown if method not in PREDICT_METHODS else BadRequest
        raise error(f"model {model.name!r} has no method {_clip(repr(method), 60)}; it has: "
                    f"{', '.join(model.methods)}", model=model.name, methods=list(model.methods))
    return method


def _instances_or_inputs(payload):
    """(rows, columnar?) from a body holding exactly one of "instances" (rows) or "inputs" (TF's wording)."""
    has_instances, has_inputs = "instances" in payload, "inputs" in payload
    if has_instances and has_inputs:
        raise BadRequest("expecting only one of 'inputs' or 'instances' keys")
    if not has_instances and not has_inputs:
        raise BadRequest("Missing 'inputs' or 'instances' key")
    return (payload["inputs"], True) if has_inputs else (payload["instances"], False)


def decode_payload(payload, query_method):
    """Split a predict body into (instances or columns, method) per the native API."""
    if isinstance(payload, list):
        rows, method = payload, None
    elif isinstance(payload, dict):
        rows, _ = _instances_or_inputs(payload)
        method = payload.get("method")
        if method is not None and not isinstance(method, str):
            raise BadRequest("'method' must be a string")
    else:
        raise BadRequest("expected a JSON object with 'instances' or 'inputs', or a list of instances")
    if query_method and method and query_method != method:
        raise BadRequest(f"method {method!r} in the body disagrees with ?method={query_method}")
    return rows, method or query_method


def model_inputs(model, rows, max_rows):
    """Turn decoded JSON into what the estimator takes.

    Tabular models (those that know `n_features_in_`) get a 2-D array, or a
    DataFrame when fitted on named columns; rows may be lists or objects keyed by
    feature name, and columns may come as {feature: [values]}.  Every other model
    (text pipelines, sequence models) gets the JSON value unchanged.

    A tabular value is a JSON number, null (a missing value: NaN) or a string that is
    no number's spelling (a category such as "red": the rows then go to the model as
    objects, and a model that takes only numbers refuses them).  The service never
    turns text or booleans into numbers, as numpy would ("5.1" -> 5.1, true -> 1.0):
    those are a 400 naming the feature.
    """
    if isinstance(rows, dict):
        rows = _columns_to_rows(model, rows)
    if not isinstance(rows, list):
        raise BadRequest("instances must be a list")
    if not rows:
        raise BadRequest("No values in 'instances' array")
    if len(rows) > max_rows:
        raise BadRequest(f"{len(rows)} instances is over the limit of {max_rows}")
    if model.n_features is None:
        return rows
    if isinstance(rows[0], dict):
        rows = _named_rows(model, rows)
    _refuse_coercions(model, rows)
    import numpy as np

    try:
        matrix = np.asarray(rows, dtype=float)
    except OverflowError:                # an integer literal beyond any float, e.g. 10**400
        raise BadRequest("a feature value is too large for a float", model=model.name) from None
    except (ValueError, TypeError):
        try:
            matrix = np.asarray(rows, dtype=object)
        except ValueError:
            matrix = None
    if matrix is None or matrix.ndim != 2:
        raise BadRequest(f"each instance must be a list of {model.n_features} feature values", model=model.name)
    if matrix.shape[1] != model.n_features:
        raise BadRequest(f"expected {model.n_features} features, got {matrix.shape[1]}", model=model.name)
    if model.make_frame is not None:
        return model.make_frame(matrix, columns=model.feature_names)
    return matrix


def _refuse_coercions(model, rows):
    """400 for a cell numpy would turn into a number without the client asking: text or a boolean.

    The common case (numbers and nulls only) costs one pass over the cells' types.
    """
    try:
        kinds = set(map(type, itertools.chain.from_iterable(rows)))
    except TypeError:
        return                          # a row that is no list: the shape check refuses it
    if not kinds & {str, bool}:
        return
    for number, row in enumerate(rows):
        if not isinstance(row, list):
            continue
        for position, value in enumerate(row):
            if value is True or value is False or isinstance(value, str) and _spells_number(value):
                feature = (repr(model.feature_names[position])
                           if model.feature_names and position < len(model.feature_names) else position)
                raise BadRequest(f"instance {number}, feature {feature}: {_clip(json.dumps(value), 40)} is "
                                 f"{'a boolean' if isinstance(value, bool) else 'a string'}, not a number: "
                                 "send numbers as JSON numbers (null for a missing value)", model=model.name)


def _spells_number(text):
    """Whether numpy's float conversion would read `text` as a number ("5.1", " 1e3", "nan", "inf")."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _named_rows(model, rows):
    if model.feature_index is None:
        raise BadRequest(f"model {model.name!r} does not know its feature names: send each instance as a list "
                         f"of {model.n_features} values", model=model.name)
    names, index = model.feature_names, model.feature_index
    ordered = []
    for row in rows:
        if not isinstance(row, dict):
            raise BadRequest("mix of objects and lists in instances: use one form")
        if len(row) != len(names) or any(key not in index for key in row):
            unknown = [key for key in row if key not in index]
            if unknown:
                raise BadRequest(f"unknown feature {unknown[0]!r}; the model's features are: {', '.join(names)}",
                                 model=model.name)
            missing = [name for name in names if name not in row]
            raise BadRequest(f"missing feature {missing[0]!r}", model=model.name)
        ordered.append([row[name] for name in names])
    return ordered


def _columns_to_rows(model, columns):
    """{feature: [values]} (TF's columnar "inputs") into rows."""
    lengths = {len(values) if isinstance(values, list) else -1 for values in columns.values()}
    if len(lengths) != 1 or -1 in lengths:
        raise BadRequest("columnar inputs must map each feature to a list of the same length")
    keys = list(columns)
    return [dict(zip(keys, values)) for values in zip(*columns.values())]


def encode_prediction(model, method, outputs):
    answer = {"model": model.name, "version": model.version, "method": method,
              "predictions": to_jsonable(outputs)}
    if method in ("predict_proba", "predict_log_proba") and model.classes is not None:
        answer["classes"] = model.classes
    return answer


# -- TensorFlow Serving REST and KServe V1 ------------------------------------------------

TF_STATES = {UNLOADED: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE", UNLOADING: "UNLOADING", FAILED: "END"}


def tf_version_status(slot):
    """One entry of TF Serving's model_version_status (a status request never loads anything)."""
    failed = slot.state == FAILED
    return {"version": str(slot.ref.version), "state": TF_STATES[slot.state],
            "status": {"error_code": "UNKNOWN" if failed else "OK",
                       "error_message": _clip(slot.error or "", 300) if failed else ""}}


def tf_method(signature_name):
    """TF's signature_name picks the method: none or serving_default is predict."""
    if signature_name in (None, "", "serving_default"):
        return "predict"
    if not isinstance(signature_name, str):
        raise BadRequest("'signature_name' must be a string")
    return signature_name


def tf_predict_request(payload):
    """(rows, columnar?, method) from a TF/KServe V1 predict body; TF's own error wording."""
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    rows, columnar = _instances_or_inputs(payload)
    return rows, columnar, tf_method(payload.get("signature_name"))


def tf_examples(payload):
    """Rows from a TF classify/regress body: each example merged with the shared context."""
    if not isinstance(payload, dict) or not isinstance(payload.get("examples"), list) or not payload["examples"]:
        raise BadRequest("expected {\"examples\": [{feature: value, ...}, ...]} with at least one example")
    context = payload.get("context") or {}
    if not isinstance(context, dict) or not all(isinstance(e, dict) for e in payload["examples"]):
        raise BadRequest("'context' and each example must be objects of feature values")
    rows = []
    for example in payload["examples"]:
        repeated = sorted(set(context) & set(example))
        if repeated:
            raise BadRequest(f"feature(s) {', '.join(map(repr, repeated))} are in both the context and an example")
        rows.append({**context, **example})
    return rows


def tf_signatures(model):
    """TF's SignatureDefMap for a model: one signature per method, built from what the estimator knows."""
    def tensor(name, dtype, *dims):
        return {"name": name, "dtype": dtype,
                "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}}

    width = model.n_features
    inputs = ({name: tensor(name, "DT_DOUBLE", -1) for name in model.feature_names} if model.feature_names
              else {"inputs": tensor("inputs", "DT_STRING", -1)} if model.n_features is None
              else {"inputs": tensor("inputs", "DT_DOUBLE", -1, width)})
    signatures = {}
    for method in model.methods:
        name = "serving_default" if method == "predict" else method
        outputs = {}
        for spec in v2_output_specs(model, method):
            dtype = {"BYTES": "DT_STRING", "INT64": "DT_INT64", "BOOL": "DT_BOOL"}.get(spec["datatype"], "DT_DOUBLE")
            outputs[spec["name"]] = tensor(spec["name"], dtype, *spec["shape"])
        signatures[name] = {"inputs": inputs, "outputs": outputs,
                            "method_name": "tensorflow/serving/predict"}
    return signatures


# -- Open Inference Protocol (V2) ------------------------------------------------------------

V2_DTYPES = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "|i1",
             "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def v2_datatype(array):
    """The V2 datatype of a numpy array: strings and objects are BYTES."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return f"{'U' if kind == 'u' else ''}INT{8 * size}"
    if kind == "f":
        return f"FP{8 * size}"
    return "BYTES"


def v2_output_specs(model, method):
    """[{"name", "datatype", "shape"}] of a method's output tensors, as far as the estimator says without running.

    One tensor per method, except the probabilities of a multi-output classifier: one array per
    output, each its own tensor named "<method>_<output>" (see v2_outputs)."""
    classes, outputs = model.classes, [] if model.n_outputs == 1 else [model.n_outputs]
    if method in ("predict_proba", "predict_log_proba") and model.output_classes:
        return [{"name": f"{method}_{number}", "datatype": "FP64", "shape": [-1, len(output)]}
                for number, output in enumerate(model.output_classes)]
    if method == "predict":
        labels = [c for output in model.output_classes for c in output] if model.output_classes else classes
        datatype = ("FP64" if labels is None else "BOOL" if all(isinstance(c, bool) for c in labels)
                    else "INT64" if all(isinstance(c, int) for c in labels) else "BYTES")
        return [{"name": method, "datatype": datatype, "shape": [-1] + outputs}]
    if method in ("predict_proba", "predict_log_proba") and classes is not None:
        return [{"name": method, "datatype": "FP64", "shape": [-1, len(classes)]}]
    if method == "decision_function" and classes is not None and not model.output_classes:
        return [{"name": method, "datatype": "FP64", "shape": [-1] if len(classes) == 2 else [-1, len(classes)]}]
    if method == "score_samples":
        return [{"name": method, "datatype": "FP64", "shape": [-1]}]
    return [{"name": method, "datatype": "FP64", "shape": [-1, -1]}]


def v2_metadata(model, versions):
    if model.feature_names:
        inputs = [{"name": name, "datatype": "FP64", "shape": [-1]} for name in model.feature_names]
    elif model.n_features is not None:
        inputs = [{"name": "input-0", "datatype": "FP64", "shape": [-1, model.n_features]}]
    else:
        inputs = [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    return {"name": model.name, "versions": versions, "platform": "sklearn", "inputs": inputs,
            "outputs": [spec for method in model.methods for spec in v2_output_specs(model, method)]}


def v2_split_body(environ, body):
    """(JSON header, binary tail) of an infer body; binary only with Inference-Header-Content-Length."""
    header = environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH")
    if header is None:
        return body, b""
    try:
        length = int(header)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {length} is not within the {len(body)}-byte body")
    return body[:length], body[length:]


def v2_request(request, binary, max_rows):
    """Decode V2 infer inputs into ([(name, array)], requested outputs, binary-output names)."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise BadRequest("an infer request needs \"inputs\": [{\"name\", \"shape\", \"datatype\", \"data\"}, ...]")
    arrays, offset = [], 0
    for number, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{number}] must be an object")
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        where = f"input {_clip(repr(name), 60)}"
        if not isinstance(name, str) or not isinstance(shape, list) or \
                not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequest(f"inputs[{number}] needs a \"name\" and a \"shape\" of sizes")
        count = math.prod(shape)
        if shape and shape[0] > max_rows:
            raise BadRequest(f"{where}: {shape[0]} rows is over the limit of {max_rows}")
        size = _v2_parameters(tensor, where).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise BadRequest(f"{where}: binary_data_size {size!r} does not fit the binary data")
            array = _v2_from_bytes(binary[offset:offset + size], datatype, count, where)
            offset += size
        else:
            if "data" not in tensor:
                raise BadRequest(f"{where} has no \"data\"")
            array = _v2_from_json(tensor["data"], datatype, count, where)
        arrays.append((name, array.reshape(shape)))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    if not isinstance(request.get("id", ""), str):
        raise BadRequest("\"id\" must be a string")
    wanted, binary_outputs = {}, set()      # an output named twice is computed and answered once
    everything_binary = bool(_v2_parameters(request, "the request").get("binary_data_output"))
    outputs = request.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest("\"outputs\" must be a list of {\"name\": method}")
    for number, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{number}] needs a \"name\" (a prediction method)")
        wanted[output["name"]] = True
        if _v2_parameters(output, f"outputs[{number}]").get("binary_data", everything_binary):
            binary_outputs.add(output["name"])
    if not wanted:
        wanted = {"predict": True}
        if everything_binary:
            binary_outputs.add("predict")
    return arrays, list(wanted), binary_outputs


def _v2_parameters(holder, where):
    """A V2 object's "parameters": an object of strings, numbers and booleans (absent: empty)."""
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where}: \"parameters\" must be an object")
    return parameters


def _v2_dtype(datatype, where):
    import numpy as np

    if datatype == "BF16":
        raise BadRequest(f"{where}: BF16 is not supported; send FP32")
    if datatype not in V2_DTYPES:
        raise BadRequest(f"{where}: unknown datatype {_clip(repr(datatype), 40)}")
    return np.dtype(V2_DTYPES[datatype])


def _v2_from_json(data, datatype, count, where):
    import numpy as np

    flat = _flatten(data)
    if len(flat) != count:
        raise BadRequest(f"{where}: {len(flat)} values do not fill its shape ({count} expected)")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in flat):
            raise BadRequest(f"{where}: BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = flat
        return array
    dtype = _v2_dtype(datatype, where)
    try:
        if dtype.kind == "f":
            if not all(item is None or type(item) in (int, float) for item in flat):
                raise TypeError
            return np.array([np.nan if item is None else item for item in flat], dtype=dtype)
        if not all(type(item) in (int, bool) for item in flat):
            raise TypeError
        return np.array(flat, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"{where}: data does not fit datatype {datatype}") from None


def _v2_from_bytes(raw, datatype, count, where):
    import numpy as np

    if datatype == "BYTES":
        items, position = [], 0
        while position < len(raw):
            if position + 4 > len(raw):
                raise BadRequest(f"{where}: truncated BYTES element")
            length = int.from_bytes(raw[position:position + 4], "little")
            item = raw[position + 4:position + 4 + length]
            if len(item) != length:
                raise BadRequest(f"{where}: truncated BYTES element")
            try:
                items.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"{where}: BYTES elements must be UTF-8 text") from None
            position += 4 + length
        if len(items) != count:
            raise BadRequest(f"{where}: {len(items)} BYTES elements do not fill its shape ({count} expected)")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array
    dtype = _v2_dtype(datatype, where)
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(f"{where}: {len(raw)} bytes do not hold {count} values of {datatype}")
    return np.frombuffer(raw, dtype=dtype).copy()


def _flatten(data):
    if not isinstance(data, list):
        return [data]
    flat = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def v2_inputs(model, arrays, max_rows):
    """What the estimator takes, from V2 tensors: one [rows, features] tensor, or one [rows] tensor per feature
    (as v2_metadata advertises for a model that names its features, one feature included)."""
    import numpy as np

    name, array = arrays[0]
    if len(arrays) > 1 or (model.feature_index and name in model.feature_index and array.ndim == 1):
        return model_inputs(model, {name: array.reshape(-1).tolist() for name, array in arrays}, max_rows)
    if model.n_features is None:
        return array.tolist()
    if array.dtype == object:                   # BYTES: text cells, under the same rules as JSON rows
        return model_inputs(model, array.tolist(), max_rows)
    if array.ndim != 2 or array.shape[1] != model.n_features:
        raise BadRequest(f"the input tensor must have shape [rows, {model.n_features}], not {list(array.shape)}",
                         model=model.name)
    matrix = array.astype(np.float64)
    return model.make_frame(matrix, columns=model.feature_names) if model.make_frame is not None else matrix


def v2_outputs(model, results, binary_outputs):
    """(JSON outputs, binary tail) for {method: result}; binary for the outputs asked that way."""
    import numpy as np

    outputs, chunks = [], []
    tensors = ((f"{method}_{number}" if isinstance(result, list) else method, method, part)
               for method, result in results.items()
               for number, part in enumerate(result if isinstance(result, list) else [result]))
    for name, method, result in tensors:      # a list: a multi-output classifier's arrays, one per output
        array = np.asarray(result.toarray() if hasattr(result, "toarray") else result)
        datatype = v2_datatype(array)
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if method in binary_outputs:
            if datatype == "BYTES":
                data = b"".join(len(b).to_bytes(4, "little") + b
                                for b in (str(item).encode("utf-8") for item in array.reshape(-1).tolist()))
            else:
                data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = to_jsonable(array.reshape(-1))
        outputs.append(entry)
    return outputs, b"".join(chunks)


V2_REPOSITORY_STATES = {UNLOADED: "UNAVAILABLE", LOADING: "LOADING", AVAILABLE: "READY", UNLOADING: "UNLOADING",
                        FAILED: "UNAVAILABLE"}


# -- MLflow scoring ------------------------------------------------------------------------------

MLFLOW_ERROR_CODES = {400: "BAD_REQUEST", 404: "RESOURCE_DOES_NOT_EXIST", 413: "BAD_REQUEST",
                      415: "BAD_REQUEST", 500: "INTERNAL_ERROR", 503: "INTERNAL_ERROR", 504: "INTERNAL_ERROR"}
MLFLOW_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")

# A table MLflow would make a pandas DataFrame of (CSV, dataframe_split with columns, dataframe_records):
# its column names in order, and its rows as lists (CSV, split) or {column: value} objects (records).
# How a model takes it depends on the model (mlflow_inputs), known only after the body is read.
MLflowTable = collections.namedtuple("MLflowTable", "columns rows")


def mlflow_rows(environ, body, max_depth):
    """Rows or an MLflowTable from an /invocations body: MLflow's JSON formats or CSV, chosen by Content-Type."""
    content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    check_content_type(environ)
    if content_type == "text/csv":
        return _csv_rows(body)
    if content_type != "application/json":
        raise NotJSON(f"/invocations takes application/json or text/csv, not {content_type or 'no Content-Type'}",
                      media_type=True)
    payload = parse_json(body, max_depth)
    keys = [key for key in MLFLOW_KEYS if isinstance(payload, dict) and key in payload]
    if not isinstance(payload, dict) or len(keys) != 1 or set(payload) - {keys[0], "params"}:
        raise BadRequest(f"the body must hold exactly one of {', '.join(MLFLOW_KEYS)} (and optionally params)")
    if payload.get("params"):
        logger.warning("/invocations: params %s are ignored: scikit-learn's predict takes none",
                       _clip(str(sorted(payload["params"]) if isinstance(payload["params"], dict) else "?"), 200))
    value = payload[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise BadRequest("dataframe_split needs {\"columns\": [...], \"data\": [[...], ...]}")
        columns = value.get("columns")
        if columns is None:
            return value["data"]
        if not isinstance(columns, list) or not all(isinstance(row, list) and len(row) == len(columns)
                                                    for row in value["data"]):
            raise BadRequest("dataframe_split: every row of data needs one value per column")
        if not (all(isinstance(column, str) for column in columns) or all(type(column) is int for column in columns)):
            raise BadRequest("dataframe_split: columns are all names (strings) or all positions (integers)")
        return MLflowTable(columns, value["data"])
    if keys[0] == "dataframe_records":
        if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
            raise BadRequest("dataframe_records must be a list of {column: value} objects")
        return MLflowTable(list(dict.fromkeys(key for row in value for key in row)), value)   # pandas' columns
    return value


def _csv_rows(body):
    import csv
    import io

    try:
        text = body.decode("utf-8-sig")          # Excel writes a byte-order mark
    except UnicodeDecodeError:
        raise BadRequest("CSV must be UTF-8") from None
    table = [row for row in csv.reader(io.StringIO(text)) if row]      # blank lines are no rows
    if len(table) < 2:
        raise BadRequest("CSV needs a header line and at least one row")
    header, rows = table[0], table[1:]
    if any(len(row) != len(header) for row in rows):
        raise BadRequest("every CSV row needs one value per header column")
    columns = [_csv_column([row[i] for row in rows]) for i in range(len(header))]
    return MLflowTable(header, [list(values) for values in zip(*columns)])


def mlflow_inputs(model, rows, max_rows):
    """What the estimator takes from /invocations: rows as the native API takes them, a table as MLflow's does.

    MLflow makes a table a pandas DataFrame and hands it to scikit-learn, which matches its
    columns to a model fitted on named features by name, and gives a model fitted without
    names (a numpy array) the columns by position, the header only counting them; columns
    that are numbers (pandas' own, 0, 1, ...) are no names, so every model takes them by
    position.  So here: a model that knows its feature names takes named columns by name (in
    any order, as in the other protocols); other tabular models take the columns by position
    (their number must be the model's number of features); a text model takes the values of
    a one-column table.  A record without a column has a missing value there, as in pandas.
    """
    if not isinstance(rows, MLflowTable):
        return model_inputs(model, rows, max_rows)
    columns, rows = rows
    text_column = model.n_features is None and len(columns) == 1
    by_position = model.n_features is not None and (model.feature_index is None or
                                                     not all(isinstance(column, str) for column in columns))
    if text_column or by_position:
        rows = [row if isinstance(row, list) else [row.get(column) for column in columns] for row in rows]
        return model_inputs(model, [row[0] for row in rows] if text_column else rows, max_rows)
    if rows and isinstance(rows[0], list):
        repeated = [column for column, count in collections.Counter(columns).items() if count > 1]
        if repeated:
            raise BadRequest(f"column {_clip(repr(repeated[0]), 80)} appears twice", model=model.name)
        rows = [dict(zip(columns, row)) for row in rows]
    return model_inputs(model, rows, max_rows)


def _csv_column(cells):
    """A column is numbers (empty cells: missing) if every cell reads as one, else text, as pandas reads it."""
    try:
        return [None if cell == "" else float(cell) for cell in cells]
    except ValueError:
        return cells


# -- Codecs: one per protocol ---------------------------------------------------------------------


class Codec:
    """One protocol's side of a prediction: what a request asks for, how answers and refusals look.

    The HTTP application's predict core calls `read` (what can be checked before the model is
    known: the body, the URL), then `inputs` (what needs the model: its methods, its
    features), then `encode`; resolving the model, admission, batching, the time limit and
    the metrics are done there once for every protocol.  `asked` is whatever `read` returned.
    """

    def read(self, request, config, **route):
        raise NotImplementedError

    def inputs(self, model, asked, config):
        """(methods to call, estimator inputs)."""
        raise NotImplementedError

    def encode(self, model, asked, results):
        """The answer for {method: outputs}: a JSON value, or a bottle.HTTPResponse for other bodies."""
        raise NotImplementedError

    def error(self, error):
        """The JSON body of a refusal in this protocol."""
        return error.to_dict()


class NativeCodec(Codec):
    """The native API: {"instances" | "inputs": rows, "method": name}, or ?instances=<JSON> on a GET."""

    def read(self, request, config):
        environ = request.environ
        if environ["REQUEST_METHOD"] != "GET":
            return json_body(environ, config), _query_method(request)
        text = request.query.get("instances")
        if text is None:
            raise BadRequest("GET predict needs ?instances=<JSON list of instances>")
        return {"instances": parse_json(text, config.max_depth, "?instances")}, _query_method(request)

    def inputs(self, model, asked, config):
        rows, method = decode_payload(*asked)
        return [choose_method(model, method)], model_inputs(model, rows, config.max_rows)

    def encode(self, model, asked, results):
        (method, outputs), = results.items()
        return encode_prediction(model, method, outputs)


def _query_method(request):
    """?method=NAME, read only when there is a query string (parsing one costs a few microseconds)."""
    return request.query.get("method") if request.environ.get("QUERY_STRING") else None


class SeedCodec(NativeCodec):
    """The seed course's routes on the default model: GET /predict/<sentence> and POST /predict."""

    def read(self, request, config, sentence=None):
        if sentence is None:
            return super().read(request, config)
        return {"instances": parse_literal(sentence, config.max_depth)}, _query_method(request)


class TFCodec(Codec):
    """TF Serving REST and KServe V1: :predict (rows or columns), :classify and :regress (examples)."""

    def read(self, request, config, verb):
        if verb == "explain":
            raise NotImplementedHere("explanations are not implemented")
        payload = json_body(request.environ, config)
        if verb == "predict":
            return (verb,) + tf_predict_request(payload)
        return verb, tf_examples(payload), False, "predict_proba" if verb == "classify" else "predict"

    def inputs(self, model, asked, config):
        verb, rows, _, method = asked
        method = choose_method(model, method, unknown=BadRequest)
        if verb == "classify" and model.classes is None:
            raise BadRequest(f"model {model.name!r} does not name its classes, so it cannot classify",
                             model=model.name)
        if verb == "regress" and model.classes is not None:
            raise BadRequest(f"model {model.name!r} is a classifier: use :classify or :predict, not :regress",
                             model=model.name)
        return [method], model_inputs(model, rows, config.max_rows)

    def encode(self, model, asked, results):
        verb, _, columnar, method = asked
        outputs = to_jsonable(results[method])
        if verb == "predict":
            return {"outputs" if columnar else "predictions": outputs}
        if verb == "regress":
            return {"results": outputs}
        return {"results": [[[str(label), score] for label, score in zip(model.classes, row)] for row in outputs]}


class V2Codec(Codec):
    """The Open Inference Protocol: JSON tensors, or binary ones after Inference-Header-Content-Length."""

    def read(self, request, config):
        environ = request.environ
        check_content_type(environ)
        header, binary = v2_split_body(environ, read_body(environ, config.max_body_bytes))
        payload = parse_json(header, config.max_depth)
        return v2_request(payload, binary, config.max_rows) + (payload,)

    def inputs(self, model, asked, config):
        arrays, wanted, _, _ = asked
        return ([choose_method(model, method, unknown=BadRequest) for method in wanted],
                v2_inputs(model, arrays, config.max_rows))

    def encode(self, model, asked, results):
        _, _, binary_outputs, payload = asked
        outputs, tail = v2_outputs(model, results, binary_outputs)
        answer = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
        if "id" in payload:
            answer["id"] = payload["id"]
        if not tail:
            return answer
        text = dumps(answer).encode("utf-8")
        return bottle.HTTPResponse(text + tail, headers={"Content-Type": "application/octet-stream",
                                                         "Inference-Header-Content-Length": str(len(text))})


class MLflowCodec(Codec):
    """MLflow's scoring server: POST /invocations (JSON or CSV) on the default model; its error fields."""

    def read(self, request, config):
        return mlflow_rows(request.environ, read_body(request.environ, config.max_body_bytes), config.max_depth)

    def inputs(self, model, rows, config):
        return ["predict"], mlflow_inputs(model, rows, config.max_rows)

    def encode(self, model, rows, results):
        return {"predictions": to_jsonable(results["predict"])}

    def error(self, error):
        return {**error.to_dict(), "error_code": MLFLOW_ERROR_CODES.get(error.status, "BAD_REQUEST"),
                "message": error.message}


CODECS = {"native": NativeCodec(), "seed": SeedCodec(), "tf": TFCodec(), "v2": V2Codec(), "mlflow": MLflowCodec()}
PROTOCOLS = {codec: name for name, codec in CODECS.items()}      # the payload log names a request's protocol

# One request body of each kind a route takes (Route.body names the kind): OpenAPI shows them, and a
# body that is not JSON is answered with its route's (not_json_refusal).  Iris's rows, as in README.
BODY_EXAMPLES = {
    "PredictRequest": {"instances": [[5.1, 3.5, 1.4, 0.2]]},
    "TFPredictRequest": {"signature_name": "serving_default", "instances": [[5.1, 3.5, 1.4, 0.2]]},
    "TFExamples": {"examples": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                                 "petal_width": 0.2}]},
    "V2InferRequest": {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                   "data": [5.1, 3.5, 1.4, 0.2]}]},
    "MLflowRequest": {"dataframe_split": {"columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
                                          "data": [[5.1, 3.5, 1.4, 0.2]]}},
}


###############################################################################
# Background work #############################################################
###############################################################################
# What runs beside the requests, off their path: predictions bounded in time (TimeLimit), and what a
# request hands over after its answer (a Backlog each for the payload log and the shadow).


class TimeLimit:
    """--max-predict-seconds: predictions run on daemon threads and are awaited at most the limit (504 past it).

    A Python thread cannot be stopped, so work past its time finishes in the background; what the
    request held (its model, its --max-inflight slot) passes to that work and is released when it
    ends, so abandoned computations stay counted and cannot pile up unseen.  Work that waited past
    its deadline for a thread is not started at all.  The threads are daemons, started in the
    process that serves (a pre-fork host forks after building the app): an abandoned computation
    never keeps the process alive after its shutdown.
    """

    def __init__(self, seconds, threads):
        self.seconds, self.threads = seconds, threads
        self._tasks = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid = None

    def run(self, compute, held):
        """compute() on a predict thread; `held` (releases) passes to it."""
        import concurrent.futures

        if self._pid != os.getpid():
            self._start()
        deadline = time.monotonic() + self.seconds
        future, handed = concurrent.futures.Future(), held[:]
        held.clear()

        def task():
            try:
                if time.monotonic() >= deadline:
                    raise PredictionTimeout("not started: the predict threads were busy past the time limit")
                future.set_result(compute())
            except BaseException as error:   # handed to the request that waits for it
                future.set_exception(error)
            finally:
                for release in reversed(handed):
                    release()

        self._tasks.put(task)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise PredictionTimeout(f"the prediction took longer than {self.seconds:g} s (--max-predict-seconds); "
                                    "try fewer rows") from None

    def _start(self):
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                for number in range(self.threads):
                    threading.Thread(target=self._work, name=f"predict-{number}", daemon=True).start()

    def _work(self):
        while True:
            self._tasks.get()()


class UnderWay:
    """How many of something are under way, as a `with` block: counted under a lock, read without one."""

    def __init__(self):
        self.count, self._lock = 0, threading.Lock()

    def __enter__(self):
        with self._lock:
            self.count += 1

    def __exit__(self, *failure):
        with self._lock:
            self.count -= 1


class Backlog:
    """Work for one daemon thread, off the request path: what a request hands over after its answer.

    Bounded twice, as what waits holds requests' inputs and outputs: by count, and by the bytes of
    the requests' bodies (or URLs), which stand for what an item holds.  A full backlog refuses an
    item at once rather than make a request wait.  The thread runs `work(items)` on what waits: the
    oldest item and up to `burst` - 1 more, taken at one wake-up; it starts in the process that uses
    the backlog (a pre-fork host forks after building the app), and an exception from `work` is
    logged, never fatal to it.  Then it sleeps `rest(cpu_seconds)`, given the CPU time that took:
    waking once per item would cost requests the interpreter more than the work itself, and work
    that must not compete with them paces itself.
    """

    ITEMS = 1000
    BYTES = 64 * 1024 * 1024

    def __init__(self, name, work, rest, burst=1):
        self.name, self._work, self._rest, self._burst = name, work, rest, burst
        self._lock = threading.Lock()
        self._pid, self._queue, self._bytes = None, None, 0

    def offer(self, item, environ):
        """Hand `item` (of the request behind `environ`) to the thread; False when the backlog is full."""
        if self._pid != os.getpid():
            self._start()
        size = int(environ.get("CONTENT_LENGTH") or 0) or len(environ.get("QUERY_STRING", "")) + 4096
        with self._lock:
            if self._bytes + size > self.BYTES:
                return False
            self._bytes += size
        try:
            self._queue.put_nowait((item, size))
            return True
        except queue.Full:
            self._release(size)
            return False

    def flush(self, timeout):
        """Wait until what was offered so far is done; False if that took over `timeout` seconds."""
        if self._pid != os.getpid():
            return True
        done, deadline = threading.Event(), time.monotonic() + timeout
        try:
            self._queue.put((done, 0), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(max(0.0, deadline - time.monotonic()))

    def _release(self, size):
        with self._lock:
            self._bytes -= size

    def _start(self):
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._queue, self._bytes = os.getpid(), queue.Queue(self.ITEMS), 0
                threading.Thread(target=self._run, name=self.name, daemon=True).start()

    def _run(self):
        while True:
            taken = [self._queue.get()]
            started = time.thread_time()
            with contextlib.suppress(queue.Empty):
                while len(taken) < self._burst:
                    taken.append(self._queue.get_nowait())
            flushes = [item for item, _ in taken if isinstance(item, threading.Event)]
            try:
                self._work([item for item, _ in taken if not isinstance(item, threading.Event)])
            except Exception:  # never let the thread die: the next items still need it
                logger.exception("%s failed", self.name)
            finally:
                self._release(sum(size for _, size in taken))
            for done in flushes:                         # flush(): everything offered before it is done
                done.set()
            time.sleep(self._rest(time.thread_time() - started))


class PayloadLog:
    """--payload-log DIR: one JSON line per sampled prediction request, written by a background thread.

    A request only hands over what it already holds (its model, inputs, outputs, status and latency)
    to a Backlog: turning them into JSON, redacting and writing happen on its thread, so the log never
    slows an answer, and a full backlog drops the record (counted) rather than wait.  Each file is
    named by its start time and process, so processes and restarts never share one; past FILE_BYTES
    a file is closed for a new one, and only the newest FILES of the folder stay.  What it accepted is
    written at interpreter exit (within --shutdown-timeout), under serve(), gunicorn's workers or any
    host that exits normally after its last request.
    """

    FILE_BYTES = 64 * 1024 * 1024
    FILES = 20
    INTERVAL = 0.05         # seconds between writes: what waits is written, and flushed, together
    FILE_NAME = re.compile(r"payload-[0-9]{8}T[0-9]{6}-[0-9]+-[0-9]{6}\.jsonl")

    def __init__(self, folder, sample, registry):
        self.folder, self.sample, self.registry, self.metrics = folder, sample, registry, registry.metrics
        self.backlog = Backlog("payload-log", self._write_records, rest=lambda cpu_seconds: self.INTERVAL,
                               burst=Backlog.ITEMS)
        self._file, self._written, self._serial, self._failing = None, 0, itertools.count(1), False
        atexit.register(PayloadLog._drain_at_exit, weakref.ref(self), registry.config.shutdown_timeout)

    def offer(self, environ, status, elapsed):
        """Queue one prediction request if it is sampled; never blocks."""
        if self.sample < 1 and random.random() >= self.sample:
            return
        record = (time.time(), _request_id(environ), environ["service.labels"], environ.get("service.payload"),
                  PROTOCOLS[environ["service.codec"]], int(status), elapsed)
        if not self.backlog.offer(record, environ):
            self.metrics.count("model_service_payload_log_dropped_total", ())

    def drain(self, timeout):
        """Write and flush everything accepted so far (at shutdown); False if it took over `timeout` seconds."""
        return self.backlog.flush(timeout)

    @staticmethod
    def _drain_at_exit(reference, timeout):
        """atexit: by reference, so an app dropped earlier (tests build many) is not kept alive for it."""
        payload_log = reference()
        if payload_log is not None and not payload_log.drain(timeout):
            logger.warning("payload log: records still queued after %g s were not written", timeout)

    def _write_records(self, records):
        if not records:
            return
        try:
            for record in records:
                self._write(self._line(record))
            self._file.flush()           # whole lines on disk: a reader, or a drain at shutdown, sees them
        except Exception as error:   # a full disk, an unwritable folder: logged once, counted each time
            self.metrics.count("model_service_payload_log_dropped_total", (), len(records))
            if not self._failing:
                logger.error("payload log: cannot write to %s: %s", self.folder, error)
            self._failing = True
            return
        self._failing = False
        self.metrics.count("model_service_payload_log_records_total", (), len(records))

    def _write(self, line):
        data = line.encode("utf-8", "backslashreplace")
        if self._file is None or self._written + len(data) > self.FILE_BYTES:
            self._rotate()
        self._file.write(data)
        self._written += len(data)

    def _rotate(self):
        """Start a new file, then remove the oldest beyond FILES (any process's: names sort by time)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        os.makedirs(self.folder, exist_ok=True)
        name = f"payload-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{next(self._serial):06d}.jsonl"
        self._file, self._written = open(os.path.join(self.folder, name), "ab"), 0
        names = sorted(entry.name for entry in os.scandir(self.folder) if self.FILE_NAME.fullmatch(entry.name))
        for old in names[:-self.FILES]:
            with contextlib.suppress(FileNotFoundError):      # another process removed it first
                os.remove(os.path.join(self.folder, old))

    def _line(self, record):
        at, request_id, labels, payload, protocol, status, elapsed = record
        (_, name), (_, version), (_, method) = labels
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
                "request_id": request_id, "model": name, "version": version, "method": method,
                "protocol": protocol, "status": status, "latency_ms": round(elapsed * 1000, 3)}
        if payload is not None:
            model, inputs, results = payload
            line["features"] = model.feature_names
            line["inputs"], line["redacted"] = self._redacted(model, to_jsonable(inputs))
            line["outputs"] = {method: to_jsonable(outputs) for method, outputs in results.items()}
        return dumps(line) + "\n"

    def _redacted(self, model, rows):
        """(rows with the model's "redact" features nulled, the names redacted); all rows withheld (None)
        when a listed name is not one of the model's features: a redaction that cannot be placed fails closed."""
        hidden = self.registry.model_settings(model.name).redact
        if not hidden:
            return rows, None
        if not hidden <= set(model.feature_names or ()):
            return None, "all"
        columns = [index for index, feature in enumerate(model.feature_names) if feature in hidden]
        for row in rows:
            for index in columns:
                row[index] = None
        return rows, sorted(hidden)


class Shadow:
    """A model's "shadow" version: each request it answers runs again there, off the request path, and the
    two answers are compared (the registry's `agreements`, the model's status and /metrics).

    A request only offers what it already holds (its inputs and outputs) to a Backlog, after its own
    answer is computed; a full backlog drops the offer (counted) rather than wait, so the client's
    answer, status, headers and latency never depend on the shadow.  The shadow's failures are logged
    and counted, never returned.

    The shadow uses spare time: while predictions are being answered (`busy()`), its thread rests
    after each comparison so that it holds at most SHARE of the interpreter, which the requests'
    threads need.  A busy process therefore shadows a sample of its requests and drops the rest,
    counted; an idle one shadows them all.
    """

    SHARE = 0.02

    def __init__(self, registry, busy):
        self.registry, self.metrics, self.busy = registry, registry.metrics, busy
        self.backlog = Backlog("shadow", lambda offers: [self._compare(*offer) for offer in offers],
                               rest=self._rest)

    def _rest(self, cpu_seconds):
        """Seconds to sleep after a comparison that took `cpu_seconds`: none when no prediction is being
        answered, else enough that comparisons take at most SHARE of the interpreter."""
        return cpu_seconds * (1 / self.SHARE - 1) if self.busy() else 0.0

    def offer(self, environ, name, model, methods, inputs, results):
        """Hand the request to the model's shadow version, if it has one other than the version that
        answered; never blocks."""
        slot = self.registry.shadow_slot(name)
        if slot is None or str(slot.ref.version) == model.version:
            return
        if not self.backlog.offer((name, slot, _request_id(environ), methods, inputs, results), environ):
            self.registry.agreement(name, str(slot.ref.version)).dropped += 1
            self.metrics.count("model_service_shadow_dropped_total",
                               (("model", name), ("version", str(slot.ref.version))))

    def _compare(self, name, slot, request_id, methods, inputs, results):
        """Run the methods on the shadow version and count how its outputs compare with the client's."""
        version = str(slot.ref.version)
        labels = (("model", name), ("version", version))
        agreement = self.registry.agreement(name, version)
        try:
            model = self.registry.acquire(name, version, slot=slot)     # (re-resolved by version, not split)
            try:
                shadowed = {method: to_jsonable(model.call(method, inputs)) for method in methods}
            finally:
                self.registry.release(model)
        except Exception as failure:  # it cannot load, or refuses the inputs: counted and logged, never returned
            agreement.fail(request_id, methods, type(failure).__name__)
            self.metrics.count("model_service_shadow_errors_total", labels)
            logger.warning("shadow version %s of model %r failed on request %s: %s", version, name, request_id,
                           _clip(getattr(failure, "message", None) or str(failure)))
            return
        identical = agreement.identical
        differences = agreement.compare(model, request_id, {m: to_jsonable(r) for m, r in results.items()}, shadowed)
        self.metrics.count("model_service_shadow_compared_total", labels)
        self.metrics.count("model_service_shadow_identical_total", labels, agreement.identical - identical)
        if differences:
            self.metrics.count("model_service_shadow_abs_difference_total", labels, sum(differences))
            self.metrics.count("model_service_shadow_numeric_values_total", labels, len(differences))


###############################################################################
# HTTP application ############################################################
###############################################################################
# One table, ROUTES, names every route: its path, the ServiceApp method that
# answers, who may call it, and how OpenAPI documents it.  Every prediction, of
# every protocol, goes through one core (ServiceApp.predict) with the protocol's
# codec; every refusal is a ServiceError, turned into an answer in one place
# (ServiceApp.refusal), Bottle's own 404, 405 and 500 included, so no answer is HTML.

JSON_TYPE = "application/json"
OPEN, TOKEN, ADMIN = "open", "token", "admin"    # who may call a route: anyone, --auth-tokens, --admin-token
UNRESOLVED = "(unknown)"                         # the metrics' model and version of a request that named none
UNRESOLVED_LABELS = (("model", UNRESOLVED), ("version", UNRESOLVED), ("method", ""))


@dataclasses.dataclass(frozen=True)
class Route:
    """One row of ROUTES.

    `path` is OpenAPI's template ({name}, {version}, {label}; a TF verb follows a colon);
    `handler` the ServiceApp method that answers, called with the path's parameters and
    `args`.  `access`: OPEN routes are for probes and load balancers; TOKEN ones need one of
    --auth-tokens when it is set; ADMIN ones are off without --admin-token and need it.
    `answer` and `body` name OpenAPI schemas (see the OpenAPI section).
    """

    method: str
    path: str
    handler: str
    access: str
    summary: str
    tag: str
    answer: str = None          # None: a JSON object; "text": text/plain
    body: str = None
    query: tuple = ()
    args: tuple = ()            # (keyword, value) pairs

    @property
    def rule(self):
        """Bottle's rule: a parameter before a colon or at the end of a TF path admits no colon, and the
        colon of a TF verb is matched by an anonymous wildcard (Bottle reads a bare ":name" as a wildcard)."""
        path = self.path
        if path.startswith("/v1/"):
            path = re.sub(r"\{(\w+)\}(?=:|$)", r"<\1:re:[^/:]+>", path)
        path = re.sub(r":(\w+)$", r"<:re::\1>", path)
        return re.sub(r"\{(\w+)\}", lambda m: f"<{m[1]}:path>" if m[1] == "sentence" else f"<{m[1]}>", path)


def _prediction_routes():
    """The routes that predict, for each way of naming a version: none (the latest), a number, a label."""
    routes = []
    for suffix, what in (("", ""), ("/versions/{version}", " with a version"), ("/labels/{label}", " with a label")):
        native, predict = "/models/{name}" + suffix, (("codec", "native"),)
        routes += [Route("POST", native + "/predict", "predict", TOKEN, f"predict (native API){what}", "predict",
                         "PredictResponse", "PredictRequest", args=predict),
                   Route("GET", native + "/predict", "predict", TOKEN, f"predict with ?instances=<JSON>{what}",
                         "predict", "PredictResponse", query=("instances",), args=predict)]
        tf = "/v1/models/{name}" + suffix
        routes += [Route("GET", tf, "v1_status", TOKEN, f"TF Serving status merged with KServe V1 readiness{what}",
                         "tf-serving", "TFStatus"),
                   Route("GET", tf + "/metadata", "v1_metadata", TOKEN, f"TF Serving signatures{what}", "tf-serving")]
        for verb, body, answer in (("predict", "TFPredictRequest", "TFPredictResponse"),
                                   ("classify", "TFExamples", "TFResults"), ("regress", "TFExamples", "TFResults"),
                                   ("explain", None, None)):
            routes.append(Route("POST", f"{tf}:{verb}", "predict", TOKEN,
                                f"TF Serving {verb}{what}" + (" (not implemented: 501)" if verb == "explain" else ""),
                                "tf-serving", answer, body, args=(("codec", "tf"), ("verb", verb))))
        if suffix != "/labels/{label}":
            v2 = "/v2/models/{name}" + suffix
            routes += [Route("GET", v2, "v2_model_metadata", TOKEN, f"V2 model metadata{what}", "v2", "V2Metadata"),
                       Route("GET", v2 + "/ready", "v2_model_ready", TOKEN, f"V2 model readiness{what}", "v2"),
                       Route("POST", v2 + "/infer", "predict", TOKEN,
                             f"V2 inference{what} (JSON; binary tensors with Inference-Header-Content-Length)", "v2",
                             "V2InferResponse", "V2InferRequest", args=(("codec", "v2"),))]
    return tuple(routes)


ROUTES = (
    Route("GET", "/", "index", OPEN, "service name, version, model names and links (a browser gets the web console)",
          "service"),
    Route("GET", "/healthz", "alive", OPEN, "liveness", "service"),
    Route("GET", "/readyz", "ready", OPEN, "readiness: 503 with the reason until ready", "service",
          args=(("counts", True),)),
    Route("GET", "/openapi.json", "openapi", TOKEN, "this document", "service"),
    Route("GET", "/metrics", "prometheus_metrics", TOKEN, "Prometheus metrics (text format)", "service", "text"),
    Route("GET", "/models", "list_models", TOKEN, "every model and the state of its versions", "models"),
    Route("GET", "/models/{name}", "show_model", TOKEN, "one model's versions, policy and labels", "models",
          "ModelStatus"),
    Route("GET", "/models/{name}/versions/{version}", "show_version", TOKEN, "one version's state and metadata",
          "models"),
    Route("GET", "/models/{name}/labels/{label}", "show_label", TOKEN, "the version a label names", "models"),
    Route("POST", "/predict", "predict", TOKEN, "predict with the default model", "predict", "PredictResponse",
          "PredictRequest", args=(("codec", "seed"),)),
    Route("GET", "/predict/{sentence}", "predict", TOKEN,
          "predict with the default model: the seed course's route, instances as JSON or a Python literal",
          "predict", "PredictResponse", args=(("codec", "seed"),)),
    Route("POST", "/models/{name}/reload", "reload_model", ADMIN, "load a model's versions again (admin token)",
          "admin"),
    Route("POST", "/admin/rescan", "rescan", ADMIN, "rescan the store now (admin token)", "admin"),
    Route("GET", "/v1/models", "model_names", TOKEN, "model names (KServe V1)", "tf-serving"),
    Route("GET", "/v2", "v2_server", TOKEN, "server metadata", "v2"),
    Route("GET", "/v2/health/live", "v2_live", OPEN, "liveness", "v2"),
    Route("GET", "/v2/health/ready", "ready", OPEN, "readiness", "v2"),
    Route("GET", "/v2/models", "model_names", TOKEN, "model names", "v2"),
    Route("POST", "/v2/repository/index", "v2_repository_index", TOKEN, "every served version and its state", "v2",
          "array", "Optional"),
    Route("POST", "/v2/repository/models/{name}/load", "v2_repository_action", ADMIN,
          "load a model of the store (admin token)", "v2", body="Optional", args=(("action", "load"),)),
    Route("POST", "/v2/repository/models/{name}/unload", "v2_repository_action", ADMIN,
          "unload a model of the store (admin token)", "v2", body="Optional", args=(("action", "unload"),)),
    Route("GET", "/ping", "alive", OPEN, "liveness (MLflow)", "mlflow"),
    Route("GET", "/health", "alive", OPEN, "liveness (MLflow)", "mlflow"),
    Route("GET", "/version", "mlflow_version", TOKEN, "the service version (MLflow)", "mlflow", "text"),
    Route("POST", "/invocations", "predict", TOKEN, "predict with the default model (MLflow scoring)", "mlflow",
          "Predictions", "MLflowRequest", args=(("codec", "mlflow"),)),
) + _prediction_routes()

# Paths open without an --auth-tokens token, and the admin routes' (they check their own token).
OPEN_PATHS = frozenset(route.path for route in ROUTES if route.access == OPEN)
ADMIN_PATHS = re.compile("|".join(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(route.path))
                                  for route in ROUTES if route.access == ADMIN))

access_logger = logging.getLogger("service.access")


class ServiceApp(bottle.Bottle):
    """The WSGI application: Bottle routing ROUTES to its methods, over one ModelRegistry.

    What every answer gets (nosniff, X-Request-ID, CORS, the request metrics, the access log)
    is added at the WSGI boundary to the plain header list rather than through Bottle's
    after_request hook and response object, which cost about a quarter of the service's own
    time per request (40 of 165 µs, measured in-process on a small model).
    """

    def __init__(self, config, registry, misconfigured=None):
        super().__init__()
        self.service_config, self.registry, self.metrics = config, registry, registry.metrics
        self.misconfigured = misconfigured      # why the MODEL_SERVICE_* settings were refused, if they were
        self.misconfigured_logged = threading.Event()  # (Bottle refuses to set an attribute twice)
        self.logs_shared = threading.Event()            # _share_logs ran, at the first request
        self.config["service.config"] = config
        self.config["service.registry"] = registry
        self.uninstall(bottle.JSONPlugin)       # it would write NaN tokens; every body goes through dumps()
        self.install(self._json_answers)
        self.default_error_handler = self._bottle_error
        self.add_hook("before_request", self._admit)
        self.admission = threading.BoundedSemaphore(config.max_inflight) if config.max_inflight else None
        self.time_limit = TimeLimit(config.max_predict_seconds, config.threads) if config.max_predict_seconds \
            else None
        self.payload_log = PayloadLog(config.payload_log, config.payload_log_sample, registry) \
            if config.payload_log and config.payload_log_sample else None
        self.predicting = UnderWay()                 # predict() calls
        self.shadow = Shadow(registry, busy=lambda: self.predicting.count > 0)
        for route in ROUTES:
            self.route(route.rule, method=route.method, callback=self._endpoint(route))

    # -- the WSGI boundary ---------------------------------------------------------------
    def wsgi(self, environ, start_response):
        started = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        if path.startswith("//"):               # waitress and wsgiref merge them, gunicorn does not
            environ["PATH_INFO"] = "/" + path.lstrip("/")
        config = self.service_config
        status_line = []

        def respond(status, headers, exc_info=None):
            status_line.append(status)
            headers.append(("X-Content-Type-Options", "nosniff"))
            headers.append(("X-Request-ID", _request_id(environ)))
            if config.cors_origins:
                origin = environ.get("HTTP_ORIGIN")
                if origin and (config.cors_origins == ("*",) or origin in config.cors_origins):
                    headers += [("Access-Control-Allow-Origin", "*" if config.cors_origins == ("*",) else origin),
                                ("Access-Control-Expose-Headers", "Retry-After, Inference-Header-Content-Length")]
                headers.append(("Vary", "Origin"))      # every answer: a shared cache must not mix origins
            return start_response(status, headers, exc_info)

        body = super().wsgi(environ, respond)
        elapsed = time.perf_counter() - started
        status = status_line[-1][:3] if status_line else "500"
        labels = environ.get("service.labels")
        if labels is not None:
            self.metrics.count("model_service_requests_total", labels + (("status", status),))
            self.metrics.observe("model_service_request_duration_seconds", labels[::2], elapsed)
            if self.payload_log is not None:
                self.payload_log.offer(environ, status, elapsed)
        if config.access_log and access_logger.isEnabledFor(logging.INFO):
            access_logger.info("%s %s %s %s %.2fms id=%s", environ.get("REMOTE_ADDR", "-"), environ["REQUEST_METHOD"],
                               _clip(environ.get("PATH_INFO", ""), 200), status, elapsed * 1000,
                               _request_id(environ), extra={"request_id": _request_id(environ)})
        return body

    def _admit(self):
        """Before routing: the checks every request passes (host, size of the target, token), then housekeeping.

        A refusal here is answered at once; an OPTIONS request is a CORS preflight, answered here too.
        """
        environ, config = bottle.request.environ, self.service_config
        if not self.logs_shared.is_set():
            self.logs_shared.set()
            _share_logs(config)
        try:
            if self.misconfigured:
                if not self.misconfigured_logged.is_set():     # once: a line per request would bury it
                    self.misconfigured_logged.set()
                    logger.error("refusing every request: an environment variable is invalid: %s", self.misconfigured)
                raise Misconfigured(f"the service is misconfigured: {self.misconfigured}")
            if config.allowed_hosts:
                host = environ.get("HTTP_HOST", "").lower()
                name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
                if name not in config.allowed_hosts and host not in config.allowed_hosts:
                    raise BadRequest(f"Host {_clip(repr(host), 80)} is not allowed (--allowed-hosts)")
            if environ["REQUEST_METHOD"] == "OPTIONS":
                raise self._preflight(environ)
            path = environ.get("PATH_INFO", "")
            if len(path) + len(environ.get("QUERY_STRING", "")) > config.max_url_bytes:
                raise URITooLong(f"the request target is over {config.max_url_bytes} bytes (--max-url-bytes); "
                                 "send the data in a POST body")
            if config.auth_tokens and path not in OPEN_PATHS and not ADMIN_PATHS.fullmatch(path):
                _require_token(environ, config.auth_tokens, "model-service")
            raw = environ.get("bottle.raw_path", "")
            if not raw.isascii():
                try:
                    raw.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    raise BadRequest("the request path is not valid UTF-8") from None
        except ServiceError as error:
            raise self.refusal(error) from None
        self.registry.refresh()

    def _preflight(self, environ):
        """A CORS preflight, answered before routing (a catch-all OPTIONS route would turn every unknown
        path's 404 into a 405): allowed origins learn what they may send; others are refused."""
        config = self.service_config
        origin = environ.get("HTTP_ORIGIN")
        if origin and not (config.cors_origins == ("*",) or origin in config.cors_origins):
            raise Forbidden(f"origin {_clip(repr(origin), 80)} may not call this service (--cors-origins)")
        methods = []
        for method in ("GET", "POST"):
            try:
                self.router.match({"PATH_INFO": environ.get("PATH_INFO", "/"), "REQUEST_METHOD": method})
                methods.append(method)
            except bottle.HTTPError:
                pass
        if not methods:
            raise NotFound("no route")
        allowed = ", ".join(methods + ["OPTIONS"])
        headers = {"Allow": allowed}
        if origin:
            headers.update({"Access-Control-Allow-Methods": allowed,
                            "Access-Control-Allow-Headers": "Authorization, Content-Type, "
                                                            "Inference-Header-Content-Length",
                            "Access-Control-Max-Age": "600"})
        return bottle.HTTPResponse(status=204, headers=headers)

    def _endpoint(self, route):
        """The callback of one route: its access rule, its codec for refusals, then its handler; a body
        that is not JSON, on a route that takes one, is answered with the route's example."""
        args = dict(route.args)
        codec = CODECS.get(args.pop("codec", None))
        if codec is not None:
            args["codec"] = codec
        handler, config = functools.partial(getattr(self, route.handler), **args), self.service_config
        admin = route.access == ADMIN
        takes_body, example = route.body is not None, BODY_EXAMPLES.get(route.body)

        def endpoint(**parameters):
            if codec is not None:
                bottle.request.environ["service.codec"] = codec
            if admin:
                if not config.admin_token:
                    raise Forbidden(f"administration is off: set {ENV_PREFIX}ADMIN_TOKEN (or --admin-token) "
                                    "to enable it")
                _require_token(bottle.request.environ, (config.admin_token,), "model-service admin",
                               "this route needs the admin token: Authorization: Bearer <token>")
            try:
                return handler(**parameters)
            except NotJSON as error:
                if not takes_body:
                    raise
                raise not_json_refusal(error, bottle.request.environ, example) from None

        return endpoint

    # -- the one error path ---------------------------------------------------------------
    def refusal(self, error):
        """The answer to a ServiceError: the protocol's JSON body, the error's status and headers."""
        codec = bottle.request.environ.get("service.codec", CODECS["native"])
        return bottle.HTTPResponse(_utf8(dumps(codec.error(error))), error.status,
                                   {"Content-Type": JSON_TYPE, **error.headers})

    def _json_answers(self, callback):
        """Bottle plugin: a route's result as strict JSON (an HTTPResponse as it is); a ServiceError as its
        refusal; any other exception, a fault of ours, as a 500."""

        def wrapper(*args, **kwargs):
            try:
                result = callback(*args, **kwargs)
                if isinstance(result, bottle.HTTPResponse):     # a page, text, binary tensors: as it is
                    return result
                body = _utf8(dumps(result))
            except ServiceError as error:
                return self.refusal(error)
            except Exception:
                return self.refusal(_internal_error(f"on {bottle.request.method} {bottle.request.path}",
                                                    traceback.format_exc()))
            bottle.response.content_type = JSON_TYPE
            return body

        return wrapper

    def _bottle_error(self, http_error):
        """Bottle's own errors (no route, wrong method, a fault outside a route) as ServiceErrors."""
        status, request = http_error.status_code, bottle.request
        if status == 404:
            error = NotFound(f"no route for {request.method} {_clip(request.path, 200)}")
        elif status == 405:
            allowed = http_error.headers.get("Allow", "")
            error = MethodNotAllowed(f"method {request.method} is not allowed here; allowed: {allowed}",
                                     {"Allow": allowed})
        elif status >= 500:
            error = _internal_error("outside a route", http_error.traceback or http_error.body)
        else:
            error = error_for_status(status)(str(http_error.body))
        answer = self.refusal(error)
        answer.apply(bottle.response)
        return answer.body

    # -- the predict core -------------------------------------------------------------------
    def predict(self, codec, name=None, version=None, label=None, **route):
        """Every protocol's prediction: resolve → read → admit → load → decode → run → encode.

        The request is labelled for the metrics only with what exists: the model and version
        once resolved (UNRESOLVED before), the methods once the model has them."""
        request = bottle.request
        request.environ["service.labels"] = UNRESOLVED_LABELS
        with self.predicting:
            return self._predict(request, codec, name, version, label, route)

    def _predict(self, request, codec, name, version, label, route):
        """predict(), counted in `predicting` (the shadow rests while it is not 0)."""
        registry, config, environ = self.registry, self.service_config, request.environ
        if name is None:
            name = registry.default_model_name()
        asked = codec.read(request, config, **route)
        held = []                                   # what the prediction holds, released when it is over
        fields = None
        try:
            if self.admission is not None:
                if not self.admission.acquire(blocking=False):
                    raise ModelUnavailable(f"overloaded: {config.max_inflight} predictions are already being "
                                           "answered (--max-inflight); try again", retry_after=1)
                held.append(self.admission.release)
            routing_key = _routing_key(environ, codec, asked)
            slot = registry.slot(name, version, label, routing_key)
            environ["service.labels"] = (("model", name), ("version", str(slot.ref.version)), ("method", ""))
            fields = _log_fields.set({"request_id": _request_id(environ), "model": name,
                                      "version": slot.ref.version})          # for the lines logged meanwhile
            model = registry.acquire(name, version, label, slot, routing_key, wait=config.max_predict_seconds or None)
            held.append(functools.partial(registry.release, model))
            methods, inputs = codec.inputs(model, asked, config)
            environ["service.labels"] = (("model", name), ("version", model.version),
                                         ("method", ",".join(sorted(methods))))

            def compute():
                return {method: model.predict(method, inputs) for method in methods}

            results = compute() if self.time_limit is None else self.time_limit.run(compute, held)
            environ["service.payload"] = (model, inputs, results)        # for the payload log, after the answer
            self.shadow.offer(environ, name, model, methods, inputs, results)
        finally:
            for release in reversed(held):
                release()
            if fields is not None:
                _log_fields.reset(fields)
        return codec.encode(model, asked, results)

    # -- service ------------------------------------------------------------------------------
    def index(self):
        if "text/html" in bottle.request.environ.get("HTTP_ACCEPT", ""):
            return bottle.HTTPResponse(CONSOLE_HTML, headers={"Content-Type": "text/html; charset=utf-8",
                                                             "Content-Security-Policy": CONSOLE_CSP})
        return {"name": SERVICE_NAME, "version": __version__, "status": "alive",
                "models": self.registry.names(),
                "links": {"models": "/models", "health": "/healthz", "ready": "/readyz",
                          "predict": "/models/{name}/predict",
                          "predict_version": "/models/{name}/versions/{version}/predict",
                          "predict_label": "/models/{name}/labels/{label}/predict"}}

    def alive(self):
        return {"status": "alive"}

    def ready(self, counts=False):
        reason = self.registry.not_ready_reason()
        if reason:
            raise ModelUnavailable(f"not ready: {reason}", ready=False)
        if not counts:
            return {"ready": True}
        return {"ready": True, "models": len(self.registry.names()), "loaded": self.registry.loaded_count()}

    def prometheus_metrics(self):
        text = self.metrics.render()
        return bottle.HTTPResponse(text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def openapi(self):
        return openapi_document(self.registry)

    # -- models -------------------------------------------------------------------------------
    def model_names(self):
        self.registry.require_store()
        return {"models": self.registry.names()}

    def list_models(self):
        self.registry.require_store()
        return {"models": self.registry.describe_all()}

    def show_model(self, name):
        return self.registry.describe(name)

    def show_version(self, name, version):
        for info in self.registry.describe(name)["versions"]:
            if info["version"] == version:
                return {"name": name, **info}
        self.registry.slot(name, version)         # the 400 or 404 that explains why
        raise NotFound(f"model {name!r} has no version {version}", model=name)

    def show_label(self, name, label):
        return {"name": name, "label": label, "version": str(self.registry.slot(name, label=label).ref.version)}

    def _loaded(self, name, version=None, label=None):
        """The model that answers for a route, loaded if need be (its metadata needs the estimator)."""
        model = self.registry.acquire(name, version, label)
        self.registry.release(model)
        return model

    # -- administration: only what is already in the store ----------------------------------
    def reload_model(self, name):
        outcome = self.registry.reload(name)
        return {**self.registry.describe(name), "reload": outcome}

    def rescan(self):
        return {"models": self.registry.rescan()}

    # -- TensorFlow Serving REST and KServe V1 ------------------------------------------------
    def v1_status(self, name, version=None, label=None):
        """TF's model_version_status merged with KServe V1's {"name", "ready"}; 503 when nothing can serve."""
        entry = self.registry.entry(name)
        slots = ([self.registry.slot(name, version, label)] if version or label else
                 [entry.versions[number] for number in entry.served])
        ready = any(slot.state != FAILED for slot in slots)
        status = {"name": name, "ready": ready, "model_version_status": [tf_version_status(s) for s in slots]}
        if not ready:
            raise ModelUnavailable(f"model {name!r} has no version that can serve", **status)
        return status

    def v1_metadata(self, name, version=None, label=None):
        model = self._loaded(name, version, label)
        return {"model_spec": {"name": name, "signature_name": "", "version": model.version},
                "metadata": {"signature_def": {"signature_def": tf_signatures(model)}}}

    # -- Open Inference Protocol (V2) -----------------------------------------------------------
    def v2_server(self):
        return {"name": SERVICE_NAME, "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}

    def v2_live(self):
        return {"live": True}

    def v2_model_ready(self, name, version=None):
        slot = self.registry.slot(name, version)
        if slot.state == FAILED:
            raise ModelUnavailable(f"model {name!r} version {slot.ref.version} failed to load: {slot.error}",
                                   name=name, ready=False)
        return {"name": name, "ready": True}

    def v2_model_metadata(self, name, version=None):
        model = self._loaded(name, version)
        return v2_metadata(model, self.registry.entry(name).served_versions())

    def v2_repository_index(self):
        asked = json_body(bottle.request.environ, self.service_config, required=False)
        only_ready = isinstance(asked, dict) and asked.get("ready") is True
        index = []
        for info in self.registry.describe_all():
            for version in info["versions"]:
                state = V2_REPOSITORY_STATES[version["state"]]
                if version["served"] and (not only_ready or state == "READY"):
                    index.append({"name": info["name"], "version": version["version"], "state": state,
                                  "reason": _clip(version["last_error"] or "", 300)})
        return index

    def v2_repository_action(self, name, action):
        asked = json_body(bottle.request.environ, self.service_config, required=False)
        parameters = asked.get("parameters") if isinstance(asked, dict) else None
        if parameters and any(key == "config" or key.startswith("file:") for key in parameters):
            raise BadRequest("models are loaded only from the model store: \"config\" and \"file:\" parameters "
                             "are refused")
        if action == "load":
            self.registry.reload(name)
            for number in self.registry.entry(name).served:
                self.registry.get(name, str(number))
        else:
            self.registry.unload(name)
        return {}

    # -- MLflow scoring ---------------------------------------------------------------------------
    def mlflow_version(self):
        return bottle.HTTPResponse(__version__, headers={"Content-Type": "text/plain; charset=utf-8"})


def _routing_key(environ, codec, asked):
    """A request's routing key for sticky traffic splits: the X-Routing-Key header, or in a V2 request
    "parameters": {"routing_key": "..."} (the one protocol whose requests carry parameters); None if empty."""
    key = environ.get("HTTP_X_ROUTING_KEY")
    if key is None and codec is CODECS["v2"]:
        key = (asked[-1].get("parameters") or {}).get("routing_key")
        if key is not None and not isinstance(key, str):
            raise BadRequest('"parameters": {"routing_key"} must be a string')
    return key or None


def _require_token(environ, tokens, realm, message="this route needs a valid token: Authorization: Bearer <token>"):
    """401 unless the request carries one of `tokens` as its bearer token (each compared in constant time)."""
    scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    given = given.strip().encode("utf-8", "replace")
    matches = [hmac.compare_digest(given, token.encode("utf-8")) for token in tokens]
    if scheme.lower() != "bearer" or not any(matches):
        raise Unauthorized(message, realm)


def _internal_error(where, detail):
    """A fault of the service's own: logged in full with an id, answered with only the id."""
    error_id = os.urandom(6).hex()
    logger.error("internal error %s %s: %s", error_id, where, detail)
    return ServiceError("internal server error", error_id=error_id)


def create_app(store=None, config=None, registry=None, **options):
    """The WSGI application: a ServiceApp over one ModelRegistry.

    `config` defaults to the environment (MODEL_SERVICE_*); `store` and keyword options
    override its fields.  Creating the app touches no disk (the store is scanned on the first
    request) and never fails on the environment: an invalid variable makes every request a
    503 that says which and why, so `import service` always works.
    """
    misconfigured = None
    if config is None:
        try:
            config = Config.load({})
        except ValueError as error:
            config, misconfigured = Config(), str(error)
    if store is not None:
        options["store"] = os.fspath(store)
    if options:
        config = dataclasses.replace(config, **options)
    return ServiceApp(config, registry or ModelRegistry(config), misconfigured)


###############################################################################
# OpenAPI #####################################################################
###############################################################################
# GET /openapi.json: every route, request, response and error, for client generators and
# API explorers; models whose feature names are known get their own row schema.

def _schema_ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema, required=True, example=None):
    media = {"schema": schema} if example is None else {"schema": schema, "example": example}
    return {"required": required, "content": {JSON_TYPE: media}}


def _operation(route, answer, body=None, parameters=(), query=()):
    """One operation: its 200 answer (a schema), optional body, and every error as the Error envelope."""
    media = "text/plain" if route.answer == "text" else JSON_TYPE
    operation = {"summary": route.summary, "tags": [route.tag],
                 "responses": {"200": {"description": "success", "content": {media: {"schema": answer}}},
                               "default": {"description": "an error (4xx for the caller's mistakes, 503 when a "
                                                          "model is unavailable or the service is busy, 504 "
                                                          "past --max-predict-seconds, 500 for the service's "
                                                          "faults)",
                                           "content": {JSON_TYPE: {"schema": _schema_ref("Error")}}}}}
    parameters = [_PATH_PARAMETERS[p] for p in parameters] + [_QUERY_PARAMETERS[q] for q in query]
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


_PATH_PARAMETERS = {
    "name": {"name": "name", "in": "path", "required": True, "description": "model name",
             "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}},
    "version": {"name": "version", "in": "path", "required": True, "description": "version number",
                "schema": {"type": "string", "pattern": r"^[1-9][0-9]{0,17}$"}},
    "label": {"name": "label", "in": "path", "required": True, "description": "version label",
              "schema": {"type": "string", "pattern": r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"}},
    "sentence": {"name": "sentence", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "the instances, as JSON or a Python literal"},
}
_QUERY_PARAMETERS = {
    "instances": {"name": "instances", "in": "query", "required": True, "schema": {"type": "string"},
                  "description": "a JSON list of instances"},
}

_ANY = {}
_OBJECT = {"type": "object", "additionalProperties": True}
_CELL = {"oneOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, {"type": "null"}]}
_ROWS = {"type": "array", "minItems": 1, "items": _ANY}

OPENAPI_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "additionalProperties": True,
              "properties": {"error": {"type": "string"}, "code": {"type": "string"},
                             "model": {"type": "string"}, "error_code": {"type": "string"},
                             "message": {"type": "string"}}},
    "PredictRequest": {"oneOf": [
        {"type": "object", "required": ["instances"], "properties": {
            "instances": _ROWS, "method": {"type": "string"}}},
        {"type": "object", "required": ["inputs"], "properties": {
            "inputs": {"oneOf": [_ROWS, {"type": "object"}]}, "method": {"type": "string"}}},
        _ROWS]},
    "PredictResponse": {"type": "object", "required": ["model", "version", "method", "predictions"],
                        "properties": {"model": {"type": "string"}, "version": {"type": "string"},
                                       "method": {"type": "string"}, "predictions": {"type": "array"},
                                       "classes": {"type": "array"}}},
    "ModelStatus": {"type": "object", "required": ["name", "versions"], "additionalProperties": True,
                    "properties": {"name": {"type": "string"}, "latest_version": {"type": ["string", "null"]},
                                   "versions": {"type": "array", "items": _OBJECT}}},
    "TFPredictRequest": {"type": "object", "properties": {
        "signature_name": {"type": "string"}, "instances": _ROWS,
        "inputs": {"oneOf": [_ROWS, {"type": "object"}]}}},
    "TFPredictResponse": {"type": "object", "properties": {"predictions": {"type": "array"}, "outputs": _ANY}},
    "TFExamples": {"type": "object", "required": ["examples"], "properties": {
        "context": {"type": "object"}, "examples": {"type": "array", "items": {"type": "object"}}}},
    "TFResults": {"type": "object", "required": ["results"], "properties": {"results": {"type": "array"}}},
    "TFStatus": {"type": "object", "required": ["name", "ready", "model_version_status"],
                 "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"},
                                "model_version_status": {"type": "array", "items": _OBJECT}}},
    "V2Tensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object"}, "data": {"type": "array"}}},
    "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _schema_ref("V2Tensor")},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"},
                                                              "parameters": {"type": "object"}}}}}},
    "V2InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": _schema_ref("V2Tensor")}}},
    "V2Metadata": {"type": "object", "required": ["name", "inputs", "outputs"], "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"}, "inputs": {"type": "array", "items": _OBJECT},
        "outputs": {"type": "array", "items": _OBJECT}}},
    "MLflowRequest": {"type": "object", "properties": {
        "dataframe_split": {"type": "object", "properties": {"columns": {"type": "array"},
                                                             "data": {"type": "array"}}},
        "dataframe_records": {"type": "array", "items": {"type": "object"}},
        "instances": _ROWS, "inputs": _ANY, "params": {"type": "object"}}},
    "Predictions": {"type": "object", "required": ["predictions"], "properties": {"predictions": {"type": "array"}}},
}


OPENAPI_BODIES = {   # Route.body: what each request body may be
    "Optional": {"required": False, "content": {JSON_TYPE: {"schema": _OBJECT}}},
    "MLflowRequest": {"required": True, "content": {
        JSON_TYPE: {"schema": _schema_ref("MLflowRequest"), "example": BODY_EXAMPLES["MLflowRequest"]},
        "text/csv": {"schema": {"type": "string"}}}},
}


def openapi_document(registry):
    """The OpenAPI 3.1 description of ROUTES, with a row schema per model whose feature names are known."""
    paths = {}
    for route in ROUTES:
        answer = {None: _OBJECT, "text": {"type": "string"}, "array": {"type": "array"}}.get(
            route.answer) or _schema_ref(route.answer)
        body = None if route.body is None else OPENAPI_BODIES.get(route.body) or _json_body(
            _schema_ref(route.body), example=BODY_EXAMPLES.get(route.body))
        parameters = re.findall(r"\{(\w+)\}", route.path)
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, answer, body, parameters,
                                                                            route.query)
    schemas = dict(OPENAPI_SCHEMAS)
    native = {route.method: route for route in ROUTES if route.path == "/models/{name}/predict"}
    for name, features in registry.known_features().items():
        schemas[f"{name}.row"] = {"type": "object", "required": features, "additionalProperties": False,
                                  "properties": {feature: {"type": ["number", "null"]} for feature in features}}
        rows = {"type": "object", "required": ["instances"], "properties": {
            "instances": {"type": "array", "minItems": 1, "items": _schema_ref(f"{name}.row")},
            "method": {"type": "string"}}}
        paths[f"/models/{name}/predict"] = {
            "get": _operation(native["GET"], _schema_ref("PredictResponse"), query=native["GET"].query),
            "post": _operation(dataclasses.replace(native["POST"], summary=f"predict with {name}: rows keyed by "
                                                                            "its feature names"),
                               _schema_ref("PredictResponse"), _json_body(rows))}
    return {"openapi": "3.1.0",
            "info": {"title": SERVICE_NAME, "version": __version__,
                     "description": "scikit-learn models over HTTP: a native JSON API, TF Serving REST, KServe "
                                    "V1, the Open Inference Protocol (V2) and MLflow scoring."},
            "paths": paths, "components": {"schemas": schemas}}


###############################################################################
# Serving #####################################################################
###############################################################################


def serve(app, config):
    """Run a server until SIGTERM or SIGINT: waitress (tuned, and drained on exit) or any Bottle adapter."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the service is reachable from other machines", config.host)
    if config.workers > 1:
        _serve_workers(app, config)
        return
    if config.server != "waitress":
        # gunicorn and the like handle signals themselves; for the rest, SIGTERM stops like Ctrl-C
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        bottle.run(app, server=config.server, host=config.host, port=config.port, quiet=True)
        return
    import waitress
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer
    from waitress.wasyncore import close_all, dispatcher, loop

    # waitress refuses bodies far over our limit itself (as plain text); below that the
    # service's own check answers 413 in JSON.
    # Slow clients: a connection idle for channel_timeout is closed, and past connection_limit open
    # connections waitress stops accepting until some close, so trickling clients cannot exhaust it.
    server = waitress.create_server(app, host=config.host, port=config.port, threads=config.threads,
                                    max_request_body_size=2 * config.max_body_bytes, ident=SERVICE_NAME,
                                    expose_tracebacks=False, clear_untrusted_proxy_headers=True,
                                    channel_timeout=30, connection_limit=256, cleanup_interval=10,
                                    max_request_header_size=config.max_url_bytes + 65536)
    sockets = server.map if hasattr(server, "map") else server._map
    # waitress warns "Task queue depth is N" for every request that waits for a thread: under load a
    # line per request, costing the requests' own interpreter time, about what the in-flight gauge shows
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server.print_listen("Serving on http://{}:{}")
    deadline = []

    def stop(signum, frame):
        """Readiness turns false; the loop then closes the listening sockets; requests in flight go on.

        (Not closed here: the select() this signal interrupted resumes on the same sockets.)
        """
        if deadline:
            raise SystemExit(0)            # a second signal: stop now
        deadline.append(time.monotonic() + config.shutdown_timeout)
        app.config["service.registry"].draining = True
        logger.info("%s: finishing requests in flight (at most %g s)", signal.Signals(signum).name,
                    config.shutdown_timeout)

    def busy():
        """Connections with a request arriving, running or still being sent; idle keep-alives are not."""
        return [c for c in list(sockets.values())
                if isinstance(c, HTTPChannel) and (c.request is not None or c.requests or c.total_outbufs_len)]

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        while not deadline or (busy() and time.monotonic() < deadline[0]):
            if deadline:
                for channel in list(sockets.values()):
                    if isinstance(channel, BaseWSGIServer) and channel.accepting:
                        dispatcher.close(channel)
            loop(timeout=0.05 if deadline else server.adj.asyncore_loop_timeout, map=sockets,
                 use_poll=server.adj.asyncore_use_poll, count=1)
        left = busy()
        if left:
            logger.warning("shutdown timeout: %d connection(s) still busy are closed", len(left))
        logger.info("stopped")
    except SystemExit:
        logger.info("stopped at once")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        server.task_dispatcher.shutdown(timeout=1)
        close_all(sockets)


def _serve_workers(app, config):
    """--workers N: gunicorn's pre-fork server, N processes serving `app`, forked once its models are loaded.

    The parent imports numpy, scikit-learn and joblib, scans the store and loads the --preload
    versions before forking, then freezes the garbage collector's generations (gc.freeze): a
    collection in a worker then never writes to those objects, so their pages stay shared and
    N workers hold one copy of each model.  After the fork each worker starts its own watcher
    (and predict threads); versions published later load in each worker that needs them.
    Threads per process are --threads (gthread workers); SIGTERM drains within --shutdown-timeout
    (gunicorn's graceful timeout).
    """
    try:
        from gunicorn.app.base import BaseApplication
        from gunicorn.glogging import Logger
    except ImportError:
        raise ImportError("--workers needs gunicorn: pip install gunicorn") from None
    metrics_hooks = _metrics_across_workers()      # before anything counts: the workers' shared folder
    registry = app.config["service.registry"]

    class Logs(Logger):
        """gunicorn's own lines in the service's --log-format (its access log stays off: --access-log is ours)."""

        def setup(self, cfg):
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(log_formatter(config.log_format))
    registry.load_before_fork()
    gc.freeze()

    class Workers(BaseApplication):
        def load_config(self):
            settings = {"bind": f"[{config.host}]:{config.port}" if ":" in config.host else
                        f"{config.host}:{config.port}",
                        "workers": config.workers, "threads": config.threads, "worker_class": "gthread",
                        "graceful_timeout": math.ceil(config.shutdown_timeout), "timeout": 120, "preload_app": False,
                        "proc_name": SERVICE_NAME, "control_socket_disable": True, "logger_class": Logs,
                        **metrics_hooks}
            for key, value in settings.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            """In each worker, after the fork: start its watcher and load what the parent could not."""
            registry.refresh()
            return app

    Workers().run()


def _metrics_across_workers():
    """--workers: the processes count into one fresh folder (prometheus_client's multiprocess mode), so a
    scrape of any worker sums them all; returns gunicorn's hooks that keep its gauges to the live workers.

    Made here, in the parent before the fork and before prometheus_client is imported (it reads the
    variable then), and removed when the parent exits.  A folder the environment already names is not
    used: counts left there by an earlier run would be added to this one's.
    """
    import shutil
    import tempfile

    folder = os.environ[MULTIPROCESS_DIR] = tempfile.mkdtemp(prefix="model-service-metrics-")
    parent = os.getpid()
    atexit.register(lambda: os.getpid() == parent and shutil.rmtree(folder, ignore_errors=True))  # not workers'

    def mark_process_dead(pid):
        importlib.import_module("prometheus_client.multiprocess").mark_process_dead(pid, folder)

    # when_ready: before the first fork, the parent's gauges go (a parent that loaded models would count
    # them beside its workers'); child_exit: a dead worker's go.
    return {"when_ready": lambda arbiter: mark_process_dead(parent),
            "child_exit": lambda arbiter, worker: mark_process_dead(worker.pid)}


###############################################################################
# Replay ######################################################################
###############################################################################
# `python service.py replay LOG... --model NAME [--version V | --label L]`: score the requests a
# payload log recorded again, in-process, on one version of the store, and report how the answers
# compare: the check before promoting a version, runnable in CI with --fail-under.

def _payload_lines(paths, report):
    """(line number, record) of every readable line of the logs; a folder stands for its payload files."""
    for path in paths:
        files = sorted(os.path.join(path, entry) for entry in os.listdir(path)
                       if PayloadLog.FILE_NAME.fullmatch(entry)) if os.path.isdir(path) else [path]
        for file in files:
            with open(file, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    try:
                        record = parse_json(line, max_depth=64, what=f"{file}:{number}")
                    except ServiceError:
                        record = None
                    if not isinstance(record, dict):
                        report.skipped["unreadable line(s)"] += 1
                        continue
                    yield record


def replay(registry, name, paths, version=None, label=None):
    """Replay the logged requests of model `name` on one of its versions; (report, version replayed on)."""
    if version is None and label is None:
        served = registry.entry(name).served
        version = str(served[0]) if served else None     # the highest served: never the split's random pick
    model = registry.acquire(name, version, label)
    report = Agreement()
    try:
        for record in _payload_lines(paths, report):
            logged = record.get("outputs")
            if record.get("model") != name:
                report.skipped["for other models"] += 1
            elif record.get("status") != 200:
                report.skipped["not answered 200"] += 1
            elif record.get("inputs") is None or record.get("redacted") or not isinstance(logged, dict) \
                    or not logged:
                report.skipped["without (complete) inputs"] += 1
            else:
                _replay_request(model, registry.config, record, report)
    finally:
        registry.release(model)
    return report, model.version


def _replay_request(model, config, record, report):
    """Score one logged request's inputs with every method it logged, and count how the outputs compare."""
    try:
        inputs = model_inputs(model, record["inputs"], config.max_rows)
        replayed = {method: to_jsonable(model.call(choose_method(model, method), inputs))
                    for method in record["outputs"]}
    except Exception as error:  # the version fails where the logged one answered: the report says how
        report.fail(str(record.get("request_id")), record["outputs"],
                    _clip(getattr(error, "message", None) or f"{type(error).__name__}: {error}", 160))
        return
    report.compare(model, str(record.get("request_id")), record["outputs"], replayed)


def replay_command(argv):
    """`model-service replay LOG... --model NAME [--version V | --label L]`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="model-service replay",
        description="Score the requests of payload logs (--payload-log) again on one version of a model, "
                    "in-process, and report how its predictions compare with the logged ones.")
    parser.add_argument("logs", metavar="LOG", nargs="+", help="payload log file, or a folder of them")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model whose requests are replayed")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", metavar="V", help="version to replay on (default: the highest served)")
    which.add_argument("--label", metavar="L", help="label naming the version to replay on")
    parser.add_argument("--store", metavar="DIR", help=f"model store (env {ENV_PREFIX}STORE; default: model_store)")
    parser.add_argument("--fail-under", metavar="FRACTION", type=_fraction,
                        help="exit 1 when the share of identical predictions is below FRACTION (for CI)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        config = dataclasses.replace(Config.load({"store": arguments.store}), poll_interval=0.0)
        registry = ModelRegistry(config, watch=False)
        registry.refresh()
        report, version = replay(registry, arguments.model, arguments.logs, arguments.version, arguments.label)
    except (ServiceError, OSError, ValueError) as error:
        print(f"model-service replay: error: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 2
    print("\n".join(report.lines(arguments.model, version)))
    if arguments.fail_under is not None and report.share() < arguments.fail_under:
        print(f"identical share {report.share():.1%} is below --fail-under {arguments.fail_under:g}", file=sys.stderr)
        return 1
    return 0


###############################################################################
# Command line ################################################################
###############################################################################


class _OneLineErrors(argparse.ArgumentParser):
    """argparse whose refusals are one line: the usage of forty options would bury it (--help shows them)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser():
    parser = _OneLineErrors(
        prog="model-service",
        description="Serve the scikit-learn models in a folder over HTTP (JSON in, JSON out).",
        epilog=f"Every option can also be set by an environment variable ({ENV_PREFIX}<OPTION>, "
               "for example MODEL_SERVICE_PORT=9000); a flag beats the environment, which beats the default.")
    for setting in SETTINGS:
        default = setting.default
        shown = "none" if default in (None, ()) else ("yes" if default else "no") if type(default) is bool else default
        optional = {"nargs": "?", "const": setting.const} if setting.const else {}
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.metavar, default=None,
                            help=f"{setting.help} (env {setting.env}; default: {shown})", **optional)
    parser.add_argument("--version", action="version", version=f"{SERVICE_NAME} {__version__}")
    return parser


def _store_problem(store, flags):
    """One line on a store that is no folder, naming where its path came from: flag, variable or default."""
    setting = next(setting for setting in SETTINGS if setting.field == "store")
    source = setting.flag if flags.get(setting.field) else setting.env if os.environ.get(setting.env) else None
    what = "not a folder" if os.path.exists(store) else "no such folder"
    if source is None:
        return f"{setting.flag} {store} (the default): {what} here; name the folder of your models with --store DIR"
    return f"{source} {store}: {what}"


def main(argv=None, serve=serve):
    """Command line entry point; returns the exit code.  `serve` is injectable for tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_command(argv[1:])
    if argv[:1] == ["replay"]:
        return replay_command(argv[1:])
    parser = build_parser()
    flags = vars(parser.parse_args(argv))

    def refuse(message):                        # a setting's value, not the command's syntax: no usage
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        config = Config.load(flags)
    except ValueError as error:
        refuse(str(error))
    logging.basicConfig(level=config.log_level, handlers=[log_handler(config.log_format)])
    if not os.path.isdir(config.store):
        refuse(_store_problem(config.store, flags))
    if config.payload_log:
        try:
            os.makedirs(config.payload_log, exist_ok=True)
        except OSError as error:
            refuse(f"--payload-log {config.payload_log}: {error.strerror}")
    application = create_app(config=config)
    if config.workers == 1:          # under --workers the parent loads before forking, without threads
        application.config["service.registry"].refresh()
    try:
        serve(application, config)
    except KeyboardInterrupt:
        logger.info("stopped")
    except ImportError as error:
        logger.error("server %r is not installed: %s", config.server, error)
        return 2
    except OSError as error:
        logger.error("cannot serve on %s:%s: %s", config.host, config.port, error)
        return 1
    return 0


###############################################################################
# Part II: appendices #########################################################
###############################################################################
# What the request path reaches only through the entry points each appendix's banner names, at run
# time: a request-path change never needs to read below this line.


###############################################################################
# Native predictors ###########################################################
###############################################################################
# For one row, almost all of scikit-learn's `predict` is bookkeeping (validation,
# configuration contexts, joblib dispatch): a 100-tree forest spends about 12 ms on a
# row its trees walk in well under one.  So at load, for the families whose arithmetic
# is known, the fitted arrays are compiled into plain-numpy closures that repeat
# scikit-learn's operations exactly: the same matrix product on the same array, float32
# inputs compared against float64 thresholds, trees summed in order and then divided,
# the same argmax and the same class labels; a pipeline of known scalers, imputers and
# encoders of numeric categories runs their arithmetic first.  Per family:
#   linear models           _linear_regressor, _linear_classifier (+ _logistic_probabilities, _sgd_probabilities)
#   trees and forests       _tree_model (+ _multi_output_classifier), over _tree_walker
#   gradient boosting       _gradient_boosting, _hist_gradient_boosting (+ _categorical_turns), _boosted_classifier
#   pipelines               _compile_pipeline over _native_transforms (scalers, imputer, encoders, ColumnTransformer)
# Nothing here is trusted on its reading of scikit-learn's code: every compiled method is
# PROVED on probe rows built from the model (random rows, every tree threshold with its
# neighbours in the precision the model compares in, an encoder's categories and unknown
# values, NaN and infinities) against the estimator's own method, bit for bit in values, dtype
# and shape, one row at a time and in batches; a method that differs, fails or is not
# compiled is answered by scikit-learn, with the reason in the model's status.  At request time the native path
# takes only inputs it can prove it treats exactly as scikit-learn would (a C-contiguous
# float64 matrix of the right width, values the model accepts); everything else (a
# DataFrame, another dtype or width, values scikit-learn refuses) goes to scikit-learn,
# so its refusals and their messages are unchanged.

NATIVE_PROBE_SEED = 14          # probes are random but the same at every load: a proof can be rerun
_RANDOM_PROBES = 512            # random rows in every proof, besides the threshold rows of trees
_SINGLE_PROBES = 4              # rows of the probe batch also proved one at a time (each costs a forest
                                # ~12 ms in scikit-learn: the proof of a 100-tree forest stays under 1 s)
_TREE_CELLS = 1 << 20           # (row, tree) pairs a forest walks at once: bounds its temporaries


class _NotNative(Exception):
    """Why a model (or one of its methods) is left to scikit-learn."""


class NativePredictor:
    """A model's proved native methods and the input check that keeps them on proved ground.

    `prepare(inputs)` is the array the methods take (float32 for trees, whose scikit-learn
    converts to it first), or None when the inputs must go to scikit-learn.  A pipeline's
    predictor runs its steps' arithmetic in `prepare` and hands the result to its final
    estimator's predictor, whose own check then decides (a scaler passes NaN on; a linear
    model refuses it, and then scikit-learn gives the refusal).  A step answers None for rows
    it leaves to scikit-learn (an encoder meeting a category it must refuse).  `categories`
    ({column: values}) are the values an encoder knows in the columns it encodes: probes and
    tests draw those columns from them, as random numbers would all be unknown.
    """

    def __init__(self, methods, n_features, allow_nan, allow_inf=False, float32=False, steps=None, final=None,
                 categories=None):
        import numpy as np

        self.methods = methods                      # {method: function of the prepared array}
        self._n_features, self._allow_nan, self._allow_inf, self._float32 = n_features, allow_nan, allow_inf, \
            float32
        self._steps, self._final, self.categories = steps, final, categories or {}
        self._ndarray, self._float64 = np.ndarray, np.dtype(np.float64)
        refuses = {(False, False): lambda X: not np.isfinite(X).all(), (True, False): lambda X: np.isinf(X).any(),
                   (False, True): lambda X: np.isnan(X).any(), (True, True): lambda X: False}
        self._refuses = refuses[bool(allow_nan), bool(allow_inf)]     # whether X holds what the model refuses

    def prepare(self, inputs):
        if type(inputs) is not self._ndarray or inputs.dtype != self._float64 or inputs.ndim != 2 \
                or inputs.shape[1] != self._n_features or not inputs.shape[0] or not inputs.flags.c_contiguous:
            return None
        if self._float32:       # values past float32's range become infinities, which scikit-learn refuses
            inputs = inputs.astype("float32")
        if self._refuses(inputs):
            return None
        if self._final is None:
            return inputs
        inputs = self._steps(inputs)
        return None if inputs is None else self._final.prepare(inputs)


@functools.cache
def _native_compilers():
    """{estimator class: compiler}: exact classes only, so a subclass's own predict is never bypassed."""
    from sklearn import ensemble, linear_model, svm, tree

    families = {
        _linear_regressor: (linear_model.LinearRegression, linear_model.Ridge, linear_model.Lasso,
                            linear_model.ElasticNet, linear_model.SGDRegressor, svm.LinearSVR),
        _linear_classifier: (linear_model.LogisticRegression, linear_model.RidgeClassifier,
                             linear_model.SGDClassifier, linear_model.Perceptron, svm.LinearSVC),
        _tree_model: (tree.DecisionTreeClassifier, tree.DecisionTreeRegressor, tree.ExtraTreeClassifier,
                      tree.ExtraTreeRegressor, ensemble.RandomForestClassifier, ensemble.RandomForestRegressor,
                      ensemble.ExtraTreesClassifier, ensemble.ExtraTreesRegressor),
        _gradient_boosting: (ensemble.GradientBoostingClassifier, ensemble.GradientBoostingRegressor),
        _hist_gradient_boosting: (ensemble.HistGradientBoostingClassifier, ensemble.HistGradientBoostingRegressor),
    }
    return {cls: compiler for compiler, classes in families.items() for cls in classes}


def _linear_scores(estimator):
    """`X @ coef_.T + intercept_`, the product scikit-learn's linear models compute, on the same arrays."""
    import numpy as np

    coef, intercept = estimator.coef_, estimator.intercept_
    if type(coef) is not np.ndarray or coef.dtype != np.float64:
        raise _NotNative(f"coef_ is a {type(coef).__name__} of {getattr(coef, 'dtype', '?')}, not float64 numbers")
    coef_t = coef.T if coef.ndim == 2 else coef
    return lambda X: X @ coef_t + intercept


def _linear_regressor(estimator):
    """predict is the scores themselves (LinearModel._decision_function, SGDRegressor's ravel of a 1-D)."""
    return {"predict": _linear_scores(estimator)}, None


def _linear_classifier(estimator):
    """LinearClassifierMixin: decision_function, predict by sign or argmax; LogisticRegression's probabilities."""
    import numpy as np

    binarizer = getattr(estimator, "_label_binarizer", None)
    if binarizer is not None and binarizer.y_type_.startswith("multilabel"):
        raise _NotNative("a multilabel RidgeClassifier predicts through its label binarizer")
    scores, classes, intp = _linear_scores(estimator), estimator.classes_, np.intp

    def decision_function(X):
        found = scores(X)
        return found.reshape(-1) if found.ndim > 1 and found.shape[1] == 1 else found

    def predict(X):
        found = decision_function(X)
        return classes.take((found > 0).astype(intp) if found.ndim == 1 else found.argmax(axis=1), axis=0)

    methods = {"decision_function": decision_function, "predict": predict}
    if type(estimator).__name__ == "LogisticRegression":
        methods.update(_logistic_probabilities(decision_function, len(classes)))
    elif type(estimator).__name__ == "SGDClassifier" and estimator.loss in ("log_loss", "modified_huber"):
        methods.update(_sgd_probabilities(decision_function, estimator.loss))
    return methods, None


def _logistic_probabilities(decision_function, n_classes):
    """LogisticRegression.predict_proba: expit (scipy's, as scikit-learn calls it) when binary, else softmax."""
    import numpy as np
    from scipy.special import expit     # scikit-learn's own dependency, the function it uses

    if n_classes <= 2:
        def predict_proba(X):
            probability = expit(decision_function(X))
            return np.stack([1 - probability, probability], axis=1)
    else:
        def predict_proba(X):           # sklearn.utils.extmath.softmax, in place on a fresh array
            found = decision_function(X)
            found -= found.max(axis=1).reshape((-1, 1))
            np.exp(found, out=found)
            found /= found.sum(axis=1).reshape((-1, 1))
            return found

    return {"predict_proba": predict_proba, "predict_log_proba": lambda X: np.log(predict_proba(X))}


def _sgd_probabilities(decision_function, loss):
    """SGDClassifier.predict_proba, step for step: for log_loss expit, and for modified_huber the scores clipped
    to [-1, 1], plus 1, halved; binary as [1 - p, p], else each row divided by its sum (all zeros: uniform)."""
    import numpy as np
    from scipy.special import expit     # scikit-learn's _expit on numpy arrays

    def positive(scores):
        if loss == "log_loss":
            return expit(scores, out=scores)
        np.clip(scores, -1, 1, scores)
        scores += 1.0
        scores /= 2.0
        return scores

    def predict_proba(X):
        probability = positive(decision_function(X))
        if probability.ndim == 1:       # log_loss stacks 1 - p; modified_huber subtracts p from ones: the same
            return np.stack([1 - probability, probability], axis=1)
        total = probability.sum(axis=1)
        all_zero = total == 0
        if all_zero.any():
            probability[all_zero, :] = 1
            total[all_zero] = probability.shape[1]
        probability /= total.reshape((probability.shape[0], -1))
        return probability

    return {"predict_proba": predict_proba, "predict_log_proba": lambda X: np.log(predict_proba(X))}


def _tree_model(estimator):
    """A tree or a forest of them: every tree walked at once, their leaf values summed in order, then averaged.

    A forest adds each tree's prediction into a zeroed float64 accumulator in the order of
    `estimators_` and divides by their count (ForestClassifier.predict_proba,
    ForestRegressor.predict); a cumulative sum along the trees repeats that order exactly.
    Only forests predicting in one thread: with n_jobs, scikit-learn adds the trees in the
    order its threads finish, and its own answers vary in the last bit.
    """
    import numpy as np

    forest = hasattr(estimator, "estimators_")
    members = list(estimator.estimators_) if forest else [estimator]
    if forest and estimator.n_jobs not in (None, 1):
        raise _NotNative(f"n_jobs={estimator.n_jobs}: scikit-learn sums the trees in the order its threads finish")
    member_classes = {type(estimator.estimator)} if forest else {type(estimator)}
    if {type(member) for member in members} != member_classes:
        raise _NotNative("its trees are not all of the class it builds")
    walk, values, splits = _tree_walker([member.tree_ for member in members], estimator.n_features_in_, np.float32)
    classifier, several = hasattr(estimator, "classes_"), estimator.n_outputs_ > 1
    values = values if classifier and several else values[:, 0, :len(estimator.classes_)] if classifier else \
        values[:, :, 0] if several else values[:, 0, 0]
    count, chunk = len(members), max(1, _TREE_CELLS // len(members))

    def combined(X):
        if len(X) > chunk:                        # rows are independent: bound the (rows, trees) temporaries
            return np.concatenate([combined(X[start:start + chunk]) for start in range(0, len(X), chunk)])
        leaves = values[walk(X)]                  # (rows, trees, ...): each tree's prediction
        if not forest:
            return leaves[:, 0]
        zero = np.zeros_like(leaves[:, :1])
        return np.cumsum(np.concatenate([zero, leaves], axis=1), axis=1)[:, -1] / count

    if not classifier:
        return {"predict": combined}, splits
    if several:
        return _multi_output_classifier(combined, estimator.classes_), splits
    classes = estimator.classes_
    return {"predict_proba": combined, "predict_log_proba": lambda X: np.log(combined(X)),
            "predict": lambda X: classes.take(combined(X).argmax(axis=1), axis=0)}, splits


def _multi_output_classifier(combined, classes):
    """A multi-output tree classifier: a list of probabilities, each output's own classes' columns of the
    (rows, outputs, most classes) `combined`; predict is a column per output, of the first output's classes' dtype."""
    import numpy as np

    widths = [len(labels) for labels in classes]

    def predict_proba(X):
        found = combined(X)
        return [found[:, k, :width] for k, width in enumerate(widths)]

    def predict(X):
        found = np.empty((len(X), len(classes)), dtype=classes[0].dtype)
        for k, probability in enumerate(predict_proba(X)):
            found[:, k] = classes[k].take(probability.argmax(axis=1), axis=0)
        return found

    return {"predict_proba": predict_proba, "predict": predict,
            "predict_log_proba": lambda X: [np.log(probability) for probability in predict_proba(X)]}


def _gradient_boosting(estimator):
    """GradientBoosting: the init estimator's constant, plus learning_rate times each stage's leaf, in order.

    predict_stages adds `scale * value[leaf]` into each row's raw prediction stage after stage
    (and class after class within a stage); a cumulative sum after the constant repeats that
    order.  The constant is the init estimator's answer for any row, so only the "zero" init and
    scikit-learn's dummy estimators, which ignore the rows, are compiled.  Probabilities come from
    the model's own loss object (`_loss.predict_proba`): arithmetic on the raw predictions, without
    the input checks that cost the time.
    """
    import numpy as np
    from sklearn import dummy, tree

    if not (isinstance(estimator.init_, str) and estimator.init_ == "zero") and \
            type(estimator.init_) not in (dummy.DummyClassifier, dummy.DummyRegressor):
        raise _NotNative(f"its init estimator {type(estimator.init_).__name__} may depend on the rows")
    stages = estimator.estimators_
    if {type(member) for member in stages.ravel()} != {tree.DecisionTreeRegressor}:
        raise _NotNative("its stages are not all DecisionTreeRegressor")
    walk, values, splits = _tree_walker([stage.tree_ for stage in stages.ravel()], estimator.n_features_in_,
                                        np.float32)
    start = estimator._raw_predict_init(np.zeros((1, estimator.n_features_in_), dtype=np.float32))
    steps = estimator.learning_rate * values[:, 0, 0]
    n_stages, n_outputs = stages.shape

    def raw(X):
        added = steps[walk(X)].reshape(len(X), n_stages, n_outputs)
        first = np.broadcast_to(start[:, np.newaxis, :], (len(X), 1, n_outputs))
        return np.cumsum(np.concatenate([first, added], axis=1), axis=1)[:, -1]

    if not hasattr(estimator, "classes_"):
        return {"predict": lambda X: raw(X).ravel()}, splits
    return _boosted_classifier(raw, estimator, np.greater_equal), splits


def _boosted_classifier(raw, estimator, positive):
    """A boosting classifier's methods from its raw predictions, as both gradient boostings derive them.

    decision_function is the raw predictions (one column raveled), probabilities come from the
    model's own loss object (arithmetic only, without the input checks), predict is the argmax,
    or for one column `positive(raw, 0)`: GradientBoosting counts a raw 0 as the second class
    (>= 0), HistGradientBoosting as the first (> 0, as argmax breaks ties).
    """
    import numpy as np

    classes, loss = estimator.classes_, estimator._loss

    def decision_function(X):
        found = raw(X)
        return found.ravel() if found.shape[1] == 1 else found

    def predict(X):
        found = decision_function(X)
        return classes[positive(found, 0).astype(int) if found.ndim == 1 else found.argmax(axis=1)]

    return {"decision_function": decision_function, "predict": predict,
            "predict_proba": lambda X: loss.predict_proba(decision_function(X)),
            "predict_log_proba": lambda X: np.log(loss.predict_proba(decision_function(X)))}


def _hist_gradient_boosting(estimator):
    """HistGradientBoosting: the baseline, plus each iteration's leaf, in order; categories encoded first.

    _raw_predict starts from zeros, adds `_baseline_prediction`, then each predictor's leaf
    value into its class's column, iteration after iteration (threads split the rows, never a
    row's sum); a cumulative sum after the baseline repeats that order.  A predictor's node
    sends NaN where missing_go_to_left says and otherwise compares the float64 value with its
    float64 `num_threshold`, which is the tree walk on float64 rows; a categorical node looks
    the value up in its bitsets (_categorical_turns).  Categorical features first go through the
    model's own ColumnTransformer (`_preprocessor`: an OrdinalEncoder of those columns, unknown
    categories becoming NaN, then the others), compiled as a pipeline's is and run in the
    predictor's `prepare`.  Regression applies the loss's inverse link, as predict does.
    """
    import types

    import numpy as np

    iterations = estimator._predictors
    if not iterations:
        raise _NotNative("no fitted iterations")
    n_classes = len(iterations[0])
    known, feature_map = estimator._bin_mapper.make_known_categories_bitsets()
    trees = [types.SimpleNamespace(
        children_left=np.where(n["is_leaf"] == 1, -1, n["left"].astype(np.intp)),
        children_right=np.where(n["is_leaf"] == 1, -1, n["right"].astype(np.intp)),
        feature=n["feature_idx"].astype(np.intp), threshold=n["num_threshold"],
        missing_go_to_left=n["missing_go_to_left"], value=n["value"], node_count=len(n),
        max_depth=int(n["depth"].max()), is_categorical=n["is_categorical"].astype(bool),
        left_categories=_left_categories(n, predictor.raw_left_cat_bitsets, known, feature_map))
        for iteration in iterations for predictor in iteration for n in [predictor.nodes]]
    walk, values, (thresholds, dtype) = _tree_walker(trees, estimator.n_features_in_, np.float64)
    start = np.zeros((1, n_classes), dtype=estimator._baseline_prediction.dtype)
    start += estimator._baseline_prediction

    def raw(X):
        added = values[walk(X)].reshape(len(X), len(iterations), n_classes)
        first = np.broadcast_to(start[:, np.newaxis, :], (len(X), 1, n_classes))
        return np.cumsum(np.concatenate([first, added], axis=1), axis=1)[:, -1]

    if estimator._preprocessor is None:
        encode = ()
    else:       # the encoded columns come first: the trees' features are in that order
        mask = np.asarray(estimator.is_categorical_, dtype=bool)
        order = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
        thresholds = [thresholds[position] for position in np.argsort(order)]
        step = _compile_step("_preprocessor", estimator._preprocessor)
        encode = (step._replace(function=_tree_ready(step.function, False)),)
    if not hasattr(estimator, "classes_"):
        inverse = estimator._loss.link.inverse
        return ({"predict": lambda X: inverse(raw(X).ravel())}, (thresholds, dtype)) + encode
    return (_boosted_classifier(raw, estimator, np.greater), (thresholds, dtype)) + encode


def _tree_ready(transform, sparse):
    """`transform`, its rows made C-ordered for a tree's predictor (trees read any layout alike), and where
    scikit-learn would hand the tree a sparse matrix, None for NaN, which trees refuse in one."""
    import numpy as np

    def ready(X):
        X = transform(X)
        return None if X is None or sparse and np.isnan(X).any() else np.ascontiguousarray(X)

    return ready


def _left_categories(nodes, raw_left, known, feature_map):
    """For each categorical node of one HistGradientBoosting predictor, whether each code 0-255 goes left.

    _predict_one_from_raw_data: a code in the node's raw_left_cat_bitsets row goes left; one
    the bin mapper knows for the feature (known_cat_bitsets) goes right; any other goes where
    missing values go.  A bitset is 8 uint32 words, code v being bit v % 32 of word v // 32.
    """
    import numpy as np

    codes = np.arange(256)

    def bits(words):
        return ((words[..., codes // 32] >> (codes % 32).astype(np.uint32)) & 1).astype(bool)

    split = nodes[nodes["is_categorical"] == 1]
    left = bits(raw_left[split["bitset_idx"]]) if len(split) else np.zeros((0, 256), dtype=bool)
    seen = bits(known[feature_map[split["feature_idx"]]]) if len(split) else left
    return left | (~seen & split["missing_go_to_left"].astype(bool)[:, np.newaxis])


def _tree_walker(trees, n_features, dtype):
    """(walk, values, splits): walk(X) -> leaf of every row in every tree, as Tree._apply_dense finds it.

    `trees` are scikit-learn's Tree objects, or anything holding the same arrays.  All trees'
    nodes go into one set of flat arrays; a leaf points to itself, so every row takes
    max_depth steps and stays on its leaf.  A step compares the row's value (of `dtype`, float32
    for scikit-learn's trees) with the node's float64 threshold, NaN going where
    missing_go_to_left says, as the Cython does; trees with categorical nodes (histogram
    boosting's) turn there as _categorical_turns says.  `splits` is each feature's split
    thresholds and `dtype`, for the proof.
    """
    import numpy as np

    offsets = np.cumsum([0] + [tree.node_count for tree in trees])
    own = np.arange(offsets[-1])
    leaf = np.concatenate([tree.children_left for tree in trees]) == -1
    left = np.where(leaf, own, np.concatenate([tree.children_left + o for tree, o in zip(trees, offsets)]))
    right = np.where(leaf, own, np.concatenate([tree.children_right + o for tree, o in zip(trees, offsets)]))
    feature = np.where(leaf, 0, np.concatenate([tree.feature for tree in trees]))
    threshold = np.concatenate([tree.threshold for tree in trees])
    missing_left = np.concatenate([tree.missing_go_to_left for tree in trees]).astype(bool)
    values = np.concatenate([tree.value for tree in trees])
    roots, depth = offsets[:-1], max(tree.max_depth for tree in trees)
    turns = _categorical_turns(trees, missing_left)

    def walk(X):
        node = np.repeat(roots[np.newaxis, :], len(X), axis=0)
        rows = np.arange(len(X))[:, np.newaxis]
        for _ in range(depth):
            x = X[rows, feature[node]]
            go_left = (x <= threshold[node]) | (np.isnan(x) & missing_left[node])
            node = np.where(go_left if turns is None else turns(node, x, go_left), left[node], right[node])
        return node

    thresholds = [np.unique(threshold[~leaf & (feature == f)]) for f in range(n_features)]
    return walk, values, (thresholds, dtype)


def _categorical_turns(trees, missing_left):
    """None if no node splits on a category; else turns(node, x, go_left): go_left, where the node is categorical
    replaced by its choice as _predict_one_from_raw_data makes it.

    NaN and negative values go where missing values go; any other value is cast to uint8, as the
    Cython casts it, and looked up in the node's row of `left_categories` (_left_categories).
    """
    import numpy as np

    if not all(hasattr(tree, "is_categorical") for tree in trees):
        return None
    split = np.concatenate([tree.is_categorical for tree in trees])
    if not split.any():
        return None
    table = np.concatenate([np.zeros((1, 256), dtype=bool)] + [tree.left_categories for tree in trees])
    row = np.zeros(len(split), dtype=np.intp)
    row[split] = np.arange(1, split.sum() + 1)

    def turns(node, x, go_left):
        categorical = split[node]
        if not categorical.any():
            return go_left
        valid = x >= 0                              # false for NaN
        code = np.where(categorical & valid, x, 0).astype(np.uint8)
        return np.where(categorical, np.where(valid, table[row[node], code], missing_left[node]), go_left)

    return turns


@functools.cache
def _native_transforms():
    """{transformer class: compiler of its transform}, exact classes only, for a pipeline's steps.

    A compiler answers a function of the float64 rows, or a _Step when the transform encodes
    categories (the values to probe it on) or answers a sparse matrix in scikit-learn.
    """
    from sklearn import compose, impute, pipeline, preprocessing

    return {preprocessing.StandardScaler: _standard_scaler, preprocessing.MinMaxScaler: _min_max_scaler,
            impute.SimpleImputer: _simple_imputer, preprocessing.FunctionTransformer: _identity,
            preprocessing.OneHotEncoder: _one_hot_encoder, preprocessing.OrdinalEncoder: _ordinal_encoder,
            compose.ColumnTransformer: _column_transformer, pipeline.Pipeline: _transform_chain}


#: a compiled transform: function(X) -> transformed rows, or None to leave them to scikit-learn;
#: categories {input column: values to probe it on}; sparse: scikit-learn answers a sparse matrix there
_Step = collections.namedtuple("_Step", "function categories sparse")


def _compile_step(name, step):
    """The _Step of one transformer; 'passthrough' (or None) is the identity."""
    if step is None or (isinstance(step, str) and step == "passthrough"):
        return _Step(lambda X: X, {}, False)
    compiler = _native_transforms().get(type(step))
    if compiler is None or "transform" in vars(step):
        raise _NotNative(f"no native version of its step {name!r} ({type(step).__name__})")
    compiled = compiler(step)
    return compiled if isinstance(compiled, _Step) else _Step(compiled, {}, False)


def _transform_chain(pipeline, steps=None):
    """Pipeline.transform (or the steps before a pipeline's final estimator): each step on the last one's output.

    The probe values are the first step's: later steps see transformed columns.
    """
    compiled = [_compile_step(name, step) for name, step in (pipeline.steps if steps is None else steps)]
    if any(step.sparse for step in compiled[:-1]):
        raise _NotNative("a step after one that answers a sparse matrix (its sparse arithmetic is its own)")
    functions = tuple(step.function for step in compiled)

    def chain(X):
        for function in functions:
            X = function(X)
            if X is None:
                return None
        return X

    return _Step(chain, compiled[0].categories if compiled else {}, any(step.sparse for step in compiled))


def _identity(step):
    """FunctionTransformer without a function (a ColumnTransformer's passthrough), or with the check_array that
    histogram boosting's preprocessor gives its numeric columns, which leaves float64 rows as they are."""
    import numpy as np
    from sklearn.utils import check_array

    func = step.func
    checks = isinstance(func, functools.partial) and func.func is check_array and not func.args and \
        func.keywords == {"dtype": [np.float64], "ensure_all_finite": False}
    if step.validate or not (func is None or checks):
        raise _NotNative("a FunctionTransformer with a function or validation")
    return lambda X: X


def _column_transformer(step):
    """ColumnTransformer.transform on a float64 array: each transformer on its columns, stacked side by side.

    The columns are the indices scikit-learn resolved at fit (a model fitted on named columns
    keeps receiving DataFrames and is not compiled).  Dense here even where scikit-learn stacks
    a sparse matrix: the values are the same, and only a tree may read them (see _compile_pipeline).
    """
    import numpy as np

    parts, categories = [], {}
    for name, transformer, _ in step.transformers_:
        columns = np.asarray(step._transformer_to_input_indices[name], dtype=np.intp)
        if (isinstance(transformer, str) and transformer == "drop") or not len(columns):
            continue
        compiled = _compile_step(name, transformer)
        parts.append((columns, compiled.function))
        categories.update({int(columns[j]): values for j, values in compiled.categories.items()})

    def stacked(X):
        outputs = [function(X[:, columns]) for columns, function in parts]
        return None if any(output is None for output in outputs) else np.hstack(outputs)

    return _Step(stacked, categories, bool(step.sparse_output_))


def _category_codes(encoder):
    """codes(X) -> (each value's index in its column's categories, whether it is one), as _BaseEncoder finds them.

    For float64 columns fitted on numbers only (text arrives as objects, which go to
    scikit-learn): a sorted search, NaN being the last category where it is one.  None where
    scikit-learn refuses: an infinity, or an unknown value when handle_unknown is 'error'.
    """
    import numpy as np

    if encoder._infrequent_enabled:
        raise _NotNative(f"{type(encoder).__name__} groups infrequent categories")
    tables = []
    for column in encoder.categories_:
        if column.dtype != np.float64 or np.isnan(column[:-1]).any() or len(column) < 2 and np.isnan(column).all():
            raise _NotNative(f"{type(encoder).__name__} of categories that are not float64 numbers")
        tables.append((column[:-1], len(column) - 1) if np.isnan(column[-1]) else (column, -1))
    refuse_unknown = encoder.handle_unknown == "error"

    def codes(X):
        if np.isinf(X).any():
            return None
        index, known = np.empty(X.shape, dtype=np.intp), np.empty(X.shape, dtype=bool)
        for i, (values, nan_code) in enumerate(tables):
            x = X[:, i]
            index[:, i] = np.searchsorted(values, x).clip(max=len(values) - 1)
            known[:, i] = values[index[:, i]] == x
            if nan_code >= 0:
                missing = np.isnan(x)
                index[missing, i], known[missing, i] = nan_code, True
        return None if refuse_unknown and not known.all() else (index, known)

    probes = {i: np.asarray(values if refuse_unknown else np.concatenate(
        [values, np.nextafter(values, -np.inf), np.nextafter(values, np.inf)])) for i, (values, _) in enumerate(tables)}
    return codes, probes


def _one_hot_encoder(step):
    """OneHotEncoder.transform, without drop: a 1 in each known category's column, unknown ones all zeros."""
    import numpy as np

    if step.drop is not None or step.handle_unknown not in ("error", "ignore", "infrequent_if_exist"):
        raise _NotNative(f"a OneHotEncoder with drop={step.drop!r}, handle_unknown={step.handle_unknown!r}")
    codes, probes = _category_codes(step)
    offsets, width, dtype = np.cumsum([0] + step._n_features_outs)[:-1], sum(step._n_features_outs), step.dtype

    def one_hot(X):
        found = codes(X)
        if found is None:
            return None
        index, known = found
        out = np.zeros((len(X), width), dtype=dtype)
        rows, columns = np.nonzero(known)
        out[rows, offsets[columns] + index[rows, columns]] = 1
        return out

    return _Step(one_hot, probes, bool(step.sparse_output))


def _ordinal_encoder(step):
    """OrdinalEncoder.transform: each category's index, encoded_missing_value for NaN, unknown_value if asked."""
    import numpy as np

    codes, probes = _category_codes(step)
    missing, unknown = step._missing_indices, step.handle_unknown == "use_encoded_value"

    def ordinal(X):
        found = codes(X)
        if found is None:
            return None
        index, known = found
        out = index.astype(step.dtype)
        for column in missing:
            out[np.isnan(X[:, column]), column] = step.encoded_missing_value
        if unknown:
            out[~known] = step.unknown_value
        return out

    return _Step(ordinal, probes, False)


def _standard_scaler(step):
    """StandardScaler.transform on a float64 array: subtract mean_, divide by scale_ (on a copy)."""
    if not step.copy:
        raise _NotNative("a StandardScaler with copy=False scales the caller's own rows")
    mean, scale = (step.mean_ if step.with_mean else None), (step.scale_ if step.with_std else None)

    def standard(X):
        X = X if mean is None else X - mean
        return X if scale is None else X / scale

    return standard


def _min_max_scaler(step):
    """MinMaxScaler.transform: times scale_, plus min_, clipped to feature_range when asked (on a copy)."""
    import numpy as np

    if not step.copy:
        raise _NotNative("a MinMaxScaler with copy=False scales the caller's own rows")
    scale, low, (bottom, top), clip = step.scale_, step.min_, step.feature_range, step.clip

    def min_max(X):
        X = X * scale
        X += low
        return np.clip(X, np.float64(bottom), np.float64(top), out=X) if clip else X

    return min_max


def _simple_imputer(step):
    """SimpleImputer.transform for a mean or median of NaN in every column: each NaN becomes its column's."""
    import numpy as np

    statistics, missing = step.statistics_, step.missing_values
    if step.strategy not in ("mean", "median") or step.add_indicator or not step.copy or not (
            isinstance(missing, float) and np.isnan(missing)) or not np.isfinite(statistics).all():
        raise _NotNative("only a SimpleImputer of NaN by mean or median, copying, without indicator or empty "
                         "columns")
    return lambda X: np.where(np.isnan(X), statistics, X)


def _compile_pipeline(pipeline, wanted, n_features):
    """A Pipeline of known transforms ending in a known model: its steps, then the final predictor.

    The final estimator is compiled and proved alone first (on its own thresholds), then the
    whole pipeline is proved end to end against Pipeline's own methods, on rows whose encoded
    columns hold the encoders' categories.  Where scikit-learn hands the final step a sparse
    matrix, only trees are compiled: they read a sparse row's values exactly as a dense row's,
    while a linear model's sparse product sums in another order than the dense one.
    """
    *steps, (_, final) = pipeline.steps
    transforms = _transform_chain(pipeline, steps)
    trees = _native_compilers().get(type(final)) in (_tree_model, _gradient_boosting, _hist_gradient_boosting)
    if transforms.sparse and not trees:
        raise _NotNative("a step answers a sparse matrix, whose products scikit-learn sums in another order")
    if trees:
        transforms = transforms._replace(function=_tree_ready(transforms.function, transforms.sparse))
    try:
        inner, reasons = _compile(final, wanted, final.n_features_in_)
        if not inner.methods:
            raise _NotNative(next(iter(reasons.values())))
    except _NotNative as error:
        raise _NotNative(f"its final step: {error}") from None
    return _proved(pipeline, dict(inner.methods), None, lambda allow_nan, allow_inf: NativePredictor(
        {}, n_features, allow_nan, allow_inf, steps=transforms.function, final=inner,
        categories=transforms.categories), transforms.categories)


def _probe_rows(n_features, splits, rng, categories):
    """Finite rows to prove on: random ones at many scales, and for trees every threshold and its neighbours.

    A threshold t is probed at t itself, at t in the dtype the model compares in (float32 for
    scikit-learn's trees, float64 for histogram boosting) and at the values of that dtype on
    either side of it, which is where a comparison could go either way.  Each row carries one
    probe per feature, so every probe appears in some row.  A column an encoder encodes is drawn
    from its `categories` probe values instead (random numbers would all be unknown categories).
    """
    import numpy as np

    scale = 10.0 ** rng.integers(-3, 4, size=(_RANDOM_PROBES, 1))
    rows = [rng.standard_normal((_RANDOM_PROBES, n_features)) * scale, np.zeros((1, n_features))]
    if splits is not None:
        thresholds, dtype = splits
        columns = []
        for found in thresholds:
            near = found.astype(dtype)
            values = np.concatenate([found, near, np.nextafter(near, dtype(-np.inf)),
                                     np.nextafter(near, dtype(np.inf))]).astype(np.float64)
            values = values[np.abs(values) <= np.finfo(dtype).max]    # a split on NaN alone is at +inf
            columns.append(values if len(values) else rng.standard_normal(1))
        height = max(len(column) for column in columns)
        rows.append(np.stack([rng.permutation(np.resize(column, height)) for column in columns], axis=1))
    rows = np.ascontiguousarray(np.concatenate(rows))
    for column, values in categories.items():
        rows[:, column] = rng.choice(values, len(rows))
    return rows


def _edge_rows(batch, rng):
    """Rows holding what scikit-learn may refuse: NaN, infinities, a float64 past float32's range."""
    import numpy as np

    edges = []
    for value in (np.nan, np.inf, -np.inf, 1e39):
        row = batch[:1].copy()
        row[0, rng.integers(row.shape[1])] = value
        edges.append(row)
    holes = batch[:64].copy()
    holes[rng.random(holes.shape) < 0.2] = np.nan
    return edges + [holes]


def _answer(function, X):
    """(True, outputs) or (False, the exception): scikit-learn's refusals are facts the proof compares."""
    try:
        return True, function(X)
    except Exception as error:  # its refusal of the probe, whatever the estimator raises
        return False, error


def _prove(estimator, methods, make, batch, rng):
    """The NativePredictor of the methods that answer every probe exactly as scikit-learn does, and why others don't.

    First the input check: NaN, and infinities, are let through natively only if scikit-learn accepts them, and
    an edge row the check lets through must be one scikit-learn answers.  Then each method on
    the probe batch, on single rows of it, and on the edge rows the check lets through.
    `make(allow_nan, allow_inf)` builds the predictor that holds the proved methods.
    """
    first = getattr(estimator, next(iter(methods)))
    edges = _edge_rows(batch, rng)      # NaN, then infinities: each allowed where scikit-learn takes it
    predictor = make(_answer(first, edges[0])[0], _answer(first, edges[1])[0] and _answer(first, edges[2])[0])
    probes = [batch] + [batch[i:i + 1] for i in rng.choice(len(batch), _SINGLE_PROBES)]
    for row in edges:
        if predictor.prepare(row) is not None:
            if not _answer(first, row)[0]:
                return predictor, dict.fromkeys(methods, "scikit-learn refuses an input the native check lets by")
            probes.append(row)
    refused = {}
    for method, function in methods.items():
        expected_of = getattr(estimator, method)
        for X in probes:
            ok, expected = _answer(expected_of, X)
            try:
                prepared = predictor.prepare(X)
                same = ok and prepared is not None and _same_outputs(expected, function(prepared))
            except Exception as error:  # the compiled closure failed: that is a reason, not a crash
                refused[method] = f"the native {method} failed on a probe: {type(error).__name__}: {error}"
                break
            if not same:
                refused[method] = (f"scikit-learn refused a probe: {_clip(str(expected), 120)}" if not ok else
                                   f"its native check leaves a probe of {len(X)} row(s) to scikit-learn"
                                   if prepared is None else f"differs from scikit-learn on a probe of {len(X)} row(s)")
                break
        else:
            predictor.methods[method] = function
    return predictor, refused


def _compile(estimator, wanted, n_features):
    """(NativePredictor, {method: why not}) for the `wanted` methods of one estimator; _NotNative says why none.

    A compiler returns its methods and its `splits`: None, or (each feature's thresholds, the
    dtype its inputs are compared in), float32 for scikit-learn's trees, float64 for histogram
    boosting; and, where the model transforms its rows itself first (histogram boosting's
    categories), the _Step that does, which then runs in the predictor's `prepare`.
    """
    import numpy as np
    from sklearn.pipeline import Pipeline

    shadowed = [m for m in wanted if m in vars(estimator)]
    if shadowed:
        raise _NotNative(f"{', '.join(shadowed)} replaced on the instance")
    if type(estimator) is Pipeline:
        return _compile_pipeline(estimator, wanted, n_features)
    compiler = _native_compilers().get(type(estimator))
    if compiler is None:
        raise _NotNative(f"no native compiler for {type(estimator).__name__} (exact classes only)")
    compiled, splits, *own_step = compiler(estimator)
    float32 = splits is not None and splits[1] is np.float32
    compiled = {m: f for m, f in compiled.items() if m in wanted}
    if not own_step:
        return _proved(estimator, compiled, splits, lambda allow_nan, allow_inf: NativePredictor(
            {}, n_features, allow_nan, allow_inf, float32=float32))
    step, takes_all = own_step[0], NativePredictor({}, n_features, True, True)
    return _proved(estimator, compiled, splits, lambda allow_nan, allow_inf: NativePredictor(
        {}, n_features, allow_nan, allow_inf, steps=step.function, final=takes_all, categories=step.categories),
        step.categories)


def _proved(estimator, compiled, splits, make, categories=None):
    """_prove on the probe rows of this estimator (the same at every load)."""
    import numpy as np

    if not compiled:
        raise _NotNative("no native version of its methods")
    rng = np.random.default_rng(NATIVE_PROBE_SEED)
    batch = _probe_rows(estimator.n_features_in_, splits, rng, categories or {})
    with np.errstate(all="ignore"):     # log(0) and the like warn alike on both sides: not a difference
        return _prove(estimator, compiled, make, batch, rng)


def compile_native(estimator, model):
    """(NativePredictor or None, {method: (predictor, reason)}) for a freshly loaded model.

    None when no method is proved.  Every failure here, expected or not, only means that
    scikit-learn answers: loading never fails because of the native predictor.
    """
    try:
        if _named_parts(estimator):
            raise _NotNative("fitted on named columns: scikit-learn checks the names of what it is given")
        predictor, reasons = _compile(estimator, model.methods, model.n_features)
    except Exception as error:  # a compiler meeting an estimator it misreads: scikit-learn answers
        reason = str(error) if isinstance(error, _NotNative) else \
            f"compiling failed: {type(error).__name__}: {_clip(str(error), 120)}"
        return None, {m: (SKLEARN, reason) for m in model.methods}
    status = {m: (NATIVE, "proved bit-identical to scikit-learn on probe rows at load") if m in predictor.methods
              else (SKLEARN, reasons.get(m, "no native version of this method")) for m in model.methods}
    return (predictor if predictor.methods else None), status


def attach_native(model, enabled):
    """Give `model` its native predictor (or say why not), timing compile and proof into its load time."""
    if not enabled:
        model.predictors = {m: (SKLEARN, "native predictors are switched off") for m in model.methods}
        return
    started = time.perf_counter()
    model.native, model.predictors = compile_native(model.estimator, model)
    seconds = time.perf_counter() - started
    model.load_seconds += seconds
    native = [m for m, (predictor, _) in model.predictors.items() if predictor == NATIVE]
    logger.info("model %r version %s: native predictor for %s (compiled and proved in %.3f s)%s", model.name,
                model.version, ", ".join(native) or "no method", seconds,
                "".join(f"; {m} by scikit-learn: {why}" for m, (p, why) in model.predictors.items() if p == SKLEARN))


###############################################################################
# JSON model format ###########################################################
###############################################################################
# A fitted estimator written as data: an allow-listed class name plus its state
# (`__getstate__`), with numbers stored bit for bit.  The specification, with every node
# type, allow-list, check and limit, is docs/json-model-format.md.
#
#   {"format": "model-service/sklearn-json", "format_version": 2,
#    "sklearn_version": "1.9.1", "estimator": <node>}
#
# A <node> is a JSON null, boolean, string, integer (64-bit), finite float or list, or an
# object tagged with "$type":
#   estimator  {"$type": "estimator", "class": "sklearn.linear_model.Ridge", "state": {attr: node}}
#   ndarray    {"$type": "ndarray", "dtype": "<f8", "shape": [2, 3], "data": base64 of the C-order bytes}
#              ("order": "F" for Fortran-order bytes; text and object arrays carry "items": [node, ...])
#   scalar     {"$type": "scalar", "dtype": "<i8", "data": base64}   a numpy scalar
#   float      {"$type": "float", "value": "nan" | "inf" | "-inf"}
#   tuple, set, frozenset, slice   {"$type": ..., "items": [node, ...]}
#   dict, bunch                    {"$type": ..., "items": [[key node, value node], ...]}
#   dtype      {"$type": "dtype", "dtype": "<f8"}                   a numpy dtype
#   type       {"$type": "type", "name": "float64"}                 a numpy scalar type
#   object     {"$type": "object", "class": ..., "args": [numbers] | "state": node}   JSON_OBJECTS
#   tree       {"$type": "tree", "n_features", "n_classes": [per output], "nodes": {column: ndarray},
#               "value": ndarray}                                   scikit-learn's Tree
#   tree_predictor  {"$type": "tree_predictor", "nodes": {column: ndarray}, "binned_left_cat_bitsets",
#                    "raw_left_cat_bitsets"}                        histogram boosting's TreePredictor
#   neighbors_tree  {"$type": "neighbors_tree", "class", "data", "leaf_size", "metric", "metric_params"}
#   random_state, generator        a numpy random generator and its state
#   partial    {"$type": "partial", "function": <JSON_FUNCTIONS>, "args": [...], "keywords": [...]}
#
# Rebuild, never restore.  A file supplies values and plain arrays, nothing else: an array's
# dtype is a name from a closed table (JSON_DTYPES) that the loader maps to its own numpy type,
# so no byte order, field offset, item size or record layout ever comes from a file.  The
# structures compiled code walks (Tree, TreePredictor, KDTree/BallTree) are built here from
# such arrays, with what can be derived from them (node counts, depths, output counts, widths)
# computed, never read, and each structure checked whole before it is built.  A budget
# (JsonLimits) bounds what a file can make the loader allocate, spent before each part is
# allocated.  Loading imports only the modules of allow-listed names and calls only their
# constructors and JSON_FUNCTIONS.  Every check runs inside the decoding itself, so
# load_json_model, the store, export and replay all get each one.

JSON_FORMAT = "model-service/sklearn-json"
JSON_FORMAT_VERSION = 2
JSON_READABLE_VERSIONS = (1, 2)     # 1 wrote trees as records (numpy's layout): read through the same builders

# Estimators: classes restored with `__new__` and BaseEstimator's `__setstate__`.
JSON_ESTIMATORS = frozenset({
    "sklearn.linear_model.LinearRegression", "sklearn.linear_model.Ridge", "sklearn.linear_model.RidgeClassifier",
    "sklearn.linear_model.Lasso", "sklearn.linear_model.ElasticNet", "sklearn.linear_model.PoissonRegressor",
    "sklearn.linear_model.TweedieRegressor", "sklearn.linear_model.GammaRegressor",
    "sklearn.linear_model.LogisticRegression", "sklearn.linear_model.SGDClassifier",
    "sklearn.linear_model.SGDRegressor",
    "sklearn.svm.SVC", "sklearn.svm.SVR", "sklearn.svm.LinearSVC", "sklearn.svm.LinearSVR",
    "sklearn.naive_bayes.GaussianNB", "sklearn.naive_bayes.MultinomialNB", "sklearn.naive_bayes.BernoulliNB",
    "sklearn.naive_bayes.ComplementNB",
    "sklearn.neighbors.KNeighborsClassifier", "sklearn.neighbors.KNeighborsRegressor",
    "sklearn.tree.DecisionTreeClassifier", "sklearn.tree.DecisionTreeRegressor",
    "sklearn.tree.ExtraTreeClassifier", "sklearn.tree.ExtraTreeRegressor",
    "sklearn.ensemble.RandomForestClassifier", "sklearn.ensemble.RandomForestRegressor",
    "sklearn.ensemble.ExtraTreesClassifier", "sklearn.ensemble.ExtraTreesRegressor",
    "sklearn.ensemble.GradientBoostingClassifier", "sklearn.ensemble.GradientBoostingRegressor",
    "sklearn.ensemble.HistGradientBoostingClassifier", "sklearn.ensemble.HistGradientBoostingRegressor",
    "sklearn.ensemble.VotingClassifier", "sklearn.ensemble.VotingRegressor",
    "sklearn.ensemble.StackingClassifier", "sklearn.ensemble.StackingRegressor",
    "sklearn.cluster.KMeans", "sklearn.decomposition.PCA", "sklearn.decomposition.TruncatedSVD",
    "sklearn.preprocessing.StandardScaler", "sklearn.preprocessing.MinMaxScaler",
    "sklearn.preprocessing.MaxAbsScaler", "sklearn.preprocessing.RobustScaler",
    "sklearn.preprocessing.Normalizer", "sklearn.preprocessing.Binarizer",
    "sklearn.preprocessing.OneHotEncoder", "sklearn.preprocessing.OrdinalEncoder",
    "sklearn.preprocessing.PolynomialFeatures", "sklearn.preprocessing.KBinsDiscretizer",
    "sklearn.preprocessing.LabelEncoder", "sklearn.preprocessing.LabelBinarizer",
    "sklearn.preprocessing.FunctionTransformer", "sklearn.impute.SimpleImputer",
    "sklearn.feature_extraction.text.CountVectorizer", "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.feature_extraction.text.TfidfTransformer",
    "sklearn.compose.ColumnTransformer", "sklearn.pipeline.Pipeline", "sklearn.pipeline.FeatureUnion",
    "sklearn.dummy.DummyClassifier", "sklearn.dummy.DummyRegressor",          # GradientBoosting's init_
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",          # HistGradientBoosting's bins
})

# Internal objects estimators hold, and how each is rebuilt: "call" runs the class with the
# node's "args" (numbers), "new" creates it empty and restores its "state".
_LOSSES = "sklearn._loss._loss."
JSON_OBJECTS = {
    **{_LOSSES + name: "call" for name in (
        "CyAbsoluteError", "CyExponentialLoss", "CyHalfBinomialLoss", "CyHalfGammaLoss", "CyHalfMultinomialLoss",
        "CyHalfPoissonLoss", "CyHalfSquaredError", "CyHalfTweedieLoss", "CyHalfTweedieLossIdentity",
        "CyHuberLoss", "CyPinballLoss")},
    **{"sklearn.linear_model._sgd_fast." + name: "call" for name in (
        "EpsilonInsensitive", "Hinge", "ModifiedHuber", "SquaredEpsilonInsensitive", "SquaredHinge")},
    **{"sklearn._loss.loss." + name: "new" for name in (
        "AbsoluteError", "ExponentialLoss", "HalfBinomialLoss", "HalfGammaLoss", "HalfMultinomialLoss",
        "HalfPoissonLoss", "HalfSquaredError", "HalfTweedieLoss", "HalfTweedieLossIdentity", "HuberLoss",
        "PinballLoss")},
    **{"sklearn._loss.link." + name: "new" for name in (
        "HalfLogitLink", "IdentityLink", "Interval", "LogLink", "LogitLink", "MultinomialLogit")},
}

# The structures compiled code walks without bounds checks, each written as plain columns and
# built by the loader (see "compiled structures" below), by node type.
JSON_STRUCTURES = {"sklearn.tree._tree.Tree": "tree",
                   "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor": "tree_predictor"}

# Functions an estimator may hold (HistGradientBoosting's preprocessor calls check_array
# through a functools.partial); any other function is refused at export and at load.
JSON_FUNCTIONS = ("sklearn.utils.check_array",)

# Neighbour search trees are never restored from a file: they are rebuilt from the training
# data, exactly as fit() builds them (their own state can crash the interpreter if forged).
JSON_NEIGHBOR_TREES = ("sklearn.neighbors.KDTree", "sklearn.neighbors.BallTree")
JSON_BIT_GENERATORS = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")

# The dtypes a file may name for numbers: little-endian booleans, integers, floats and complex numbers.
# Besides them, "<U<width>" (text, a width of 1 to 999999 characters, counted in the budget) and "|O"
# (objects) hold "items"; nothing else (records, bytes, dates, other byte orders) is a dtype of the format.
JSON_DTYPES = ("|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16")
_TEXT_DTYPE = re.compile(r"<U[1-9][0-9]{0,5}")
_NUMPY_TYPES = ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "float16", "float32", "float64", "complex64", "complex128", "str_")


def _allowed_name(cls, names):
    """The allow-listed name under which `cls` itself is importable, or None."""
    for public in names:
        module, _, attr = public.rpartition(".")
        if attr == cls.__name__ and cls.__module__.split(".")[0] == module.split(".")[0]:
            if getattr(importlib.import_module(module), attr, None) is cls:
                return public
    return None


def _allowed_function(function):
    """The allow-listed name of a function, or None."""
    for name in JSON_FUNCTIONS:
        module, _, attr = name.rpartition(".")
        if getattr(importlib.import_module(module), attr, None) is function:
            return name
    return None


def _resolve(name, names, where):
    """The class an allow-listed name stands for; anything else is refused without an import."""
    if not isinstance(name, str) or name not in names:
        raise ArtifactError(f"{where}: class {_clip(repr(name), 120)} is not allowed in JSON models "
                            "(see docs/json-model-format.md)")
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _unsupported(value, where):
    return ArtifactError(f"cannot write {where} as JSON: {type(value).__module__}.{type(value).__qualname__} "
                         "is not supported by the JSON model format")


# -- Writing -------------------------------------------------------------------


def _encode_node(value, where):
    """Encode one value of an estimator's state; `where` names it in errors."""
    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.generic):
        return value
    if isinstance(value, float) and not isinstance(value, np.generic):
        return value if math.isfinite(value) else {"$type": "float", "value": repr(value)}
    if type(value) is list:
        return [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if type(value) is tuple:
        return {"$type": "tuple", "items": [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if type(value) is dict:
        return {"$type": "dict", "items": _encode_items(value, where)}
    if type(value) in (set, frozenset):
        items = sorted((_encode_node(item, f"{where} item") for item in value), key=dumps)
        return {"$type": type(value).__name__, "items": items}
    if type(value) is slice:
        return {"$type": "slice", "items": [_encode_node(getattr(value, part), f"{where}.{part}")
                                            for part in ("start", "stop", "step")]}
    if isinstance(value, np.ndarray) and type(value) is np.ndarray:
        return _encode_array(value, where)
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biufc":
            return _encode_node(value.item(), where)
        name = _dtype_name(value.dtype, where)
        return {"$type": "scalar", "dtype": name, "data": base64.b64encode(np.asarray(value, name).tobytes()).decode()}
    if isinstance(value, np.dtype):
        return {"$type": "dtype", "dtype": _dtype_name(value, where)}
    if isinstance(value, type) and issubclass(value, np.generic):
        names = {getattr(np, name): name for name in _NUMPY_TYPES}
        if value in names:
            return {"$type": "type", "name": names[value]}
    if type(value) is np.random.RandomState:
        return {"$type": "random_state", "state": _encode_node(value.get_state(legacy=True), f"{where}.state")}
    if type(value) is np.random.Generator and type(value.bit_generator).__name__ in JSON_BIT_GENERATORS:
        return {"$type": "generator", "bit_generator": type(value.bit_generator).__name__,
                "state": _encode_node(value.bit_generator.state, f"{where}.state")}
    if type(value) is functools.partial and _allowed_function(value.func):
        return {"$type": "partial", "function": _allowed_function(value.func),
                "args": _encode_node(list(value.args), f"{where}.args"),
                "keywords": _encode_items(value.keywords, f"{where}.keywords")}
    if type(value).__name__ == "Bunch" and type(value).__module__ == "sklearn.utils._bunch":
        return {"$type": "bunch", "items": _encode_items(dict(value), where)}
    for names, encode in ((JSON_ESTIMATORS, _encode_estimator), (JSON_STRUCTURES, _encode_structure),
                          (JSON_OBJECTS, _encode_object)):
        name = _allowed_name(type(value), names)
        if name is not None:
            return encode(value, name, where)
    raise _unsupported(value, where)


def _encode_items(mapping, where):
    return [[_encode_node(key, f"{where} key"), _encode_node(item, f"{where}[{key!r}]")]
            for key, item in mapping.items()]


def _encode_estimator(estimator, name, where):
    state = {}
    for key, item in sorted(estimator.__getstate__().items()):
        tree_class = key == "_tree" and _allowed_name(type(item), JSON_NEIGHBOR_TREES)
        state[key] = (_neighbors_tree_node(estimator, tree_class, where) if tree_class
                      else _encode_node(item, f"{where}.{key}"))
    return {"$type": "estimator", "class": name, "state": state}


def _neighbors_tree_node(estimator, tree_class, where):
    """What rebuilds a KNN estimator's KDTree/BallTree: fit()'s own arguments, never the tree's state."""
    if not isinstance(estimator.effective_metric_, str):
        raise ArtifactError(f"cannot write {where} as JSON: its metric is a Python function")
    return {"$type": "neighbors_tree", "class": tree_class,
            "data": _encode_node(estimator._fit_X, f"{where}._fit_X"),
            "leaf_size": _encode_node(estimator.leaf_size, f"{where}.leaf_size"),
            "metric": estimator.effective_metric_,
            "metric_params": _encode_node(dict(estimator.effective_metric_params_ or {}),
                                          f"{where}.effective_metric_params_")}


def _encode_structure(value, name, where):
    """A Tree or TreePredictor as what the loader builds it from: its node records as one plain array per
    field (never numpy's record layout), less what the loader computes, and its other arrays."""
    if name.endswith(".Tree"):
        state = value.__getstate__()
        nodes, arrays = state["nodes"], {"value": state["values"]}
        node = {"n_features": int(value.n_features), "n_classes": [int(count) for count in value.n_classes]}
    else:
        nodes, arrays, node = value.nodes, dict(vars(value)), {}
        if set(arrays) != {"nodes", *_PREDICTOR_BITSETS}:
            raise _unsupported(value, where)
        del arrays["nodes"]
    node.update({"$type": JSON_STRUCTURES[name], **{key: _encode_array(array, f"{where}.{key}")
                                                    for key, array in arrays.items()}})
    node["nodes"] = {field: _encode_array(nodes[field], f"{where}.nodes.{field}")
                     for field in nodes.dtype.names if field not in _COMPUTED_FIELDS}
    return node


def _encode_object(value, name, where):
    """An internal object, through the reduce protocol pickle itself would use."""
    import copyreg

    reduced = value.__reduce_ex__(2)
    function, args = reduced[0], reduced[1]
    state = reduced[2] if len(reduced) > 2 else None
    if any(part is not None for part in reduced[3:]):
        raise _unsupported(value, where)
    if JSON_OBJECTS[name] == "new":
        if function is not copyreg.__newobj__ or len(args) != 1 or not isinstance(state, (dict, type(None))):
            raise _unsupported(value, where)
        node = {"$type": "object", "class": name}
        if state:
            node["state"] = _encode_node(state, f"{where}.state")
        return node
    if getattr(function, "__name__", "").startswith("__pyx_unpickle_") and args[2] == ():
        args, state = (), None                    # a Cython class without state: built by calling it
    elif function is not type(value):
        raise _unsupported(value, where)
    node = {"$type": "object", "class": name, "args": _encode_node(list(args), f"{where}.args")}
    if state is not None:
        node["state"] = _encode_node(state, f"{where}.state")
    return node


def _encode_array(array, where):
    name = _dtype_name(array.dtype, where)
    node = {"$type": "ndarray", "dtype": name, "shape": list(array.shape)}
    if name in JSON_DTYPES:
        fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous
        if fortran:
            node["order"] = "F"               # kept: the memory order can change a BLAS result's last bits
        data = array.astype(name, copy=False).tobytes(order="F" if fortran else "C")
        node["data"] = base64.b64encode(data).decode()
    else:
        node["items"] = [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(array.ravel().tolist())]
    return node


def _dtype_name(dtype, where):
    """The name a file gives `dtype`: numbers as little-endian (their values, whatever the byte order in
    memory), text by its width, objects as "|O"; anything else cannot be written."""
    name = (dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype).str
    if name in JSON_DTYPES or name == "|O" or _TEXT_DTYPE.fullmatch(name):
        return name
    raise ArtifactError(f"cannot write {where} as JSON: dtype {_clip(str(dtype), 80)} is not supported by the "
                        "JSON model format")


def dump_json_model(estimator):
    """The JSON model document (a str) for a fitted estimator of an allow-listed class.

    The same estimator always gives the same text: keys are sorted and nothing in it
    depends on memory addresses or the time.
    """
    import sklearn

    if _allowed_name(type(estimator), JSON_ESTIMATORS) is None:
        raise ArtifactError(f"{type(estimator).__module__}.{type(estimator).__qualname__} is not supported by "
                            f"the JSON model format; supported: {', '.join(sorted(JSON_ESTIMATORS))}")
    document = {"format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION,
                "sklearn_version": sklearn.__version__, "estimator": _encode_node(estimator, "estimator")}
    return json.dumps(document, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


def save_json_model(estimator, path):
    """Write a fitted estimator as a JSON model file (by write-then-rename, so never half-written)."""
    _write_json_document(dump_json_model(estimator), path)


def _write_json_document(text, path):
    import tempfile

    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ArtifactError(f"cannot write the model as UTF-8 JSON: {error}") from None
    folder, base = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")  # hidden: stores skip it
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# -- Reading -------------------------------------------------------------------


def load_json_model(source, limits=None):
    """Build the estimator a JSON model document describes (text, bytes or a path).

    `limits` (a JsonLimits; by default the --json-max-* settings' defaults) bounds what the
    document may make the loader allocate.  Every failure is an ArtifactError that says where.
    """
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        with open(source, "rb") as handle:
            source = handle.read()
    try:
        document = _strict_json(source.decode("utf-8") if isinstance(source, bytes) else source)
    except (ValueError, RecursionError) as error:       # a UnicodeDecodeError is a ValueError
        raise ArtifactError(f"not valid JSON: {_clip(str(error))}") from None
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise ArtifactError(f"not a JSON model document (expected \"format\": \"{JSON_FORMAT}\")")
    version = document.get("format_version")
    if type(version) is not int or version not in JSON_READABLE_VERSIONS:
        raise ArtifactError(f"unsupported format_version {_clip(repr(version), 40)}; this service reads versions "
                            f"{' and '.join(map(str, JSON_READABLE_VERSIONS))}")
    try:
        estimator = _decode_node(document.get("estimator"), "estimator", _JsonLoad(version, limits or JsonLimits()))
    except RecursionError:
        raise ArtifactError("the document is nested too deeply") from None
    if not hasattr(estimator, "get_params"):
        raise ArtifactError("the document's \"estimator\" is not an estimator")
    return estimator


# What each limit counts, in the words of its refusal.
_LIMIT_WORDS = {"nodes": "tree nodes", "width": "features in one part", "categories": "categories",
                "array_bytes": "bytes of arrays"}


class _JsonLoad:
    """One document as it is decoded: its format version, and what its parts have spent of the budget."""

    def __init__(self, version, limits):
        self.version, self.limits = version, limits
        self.spent = collections.Counter()
        self.integers = (-1 << 63, 1 << 63)         # what compiled code takes: a C int64

    def spend(self, what, amount, where):
        """Count `amount` more of `what` (nodes, categories, array_bytes) before it is allocated."""
        self.spent[what] += amount
        self.bound(what, self.spent[what], where)

    def bound(self, what, amount, where):
        """Refuse `amount` of `what` (a JsonLimits field) past its limit, naming the setting that sets it."""
        limit = getattr(self.limits, what)
        if amount > limit:
            raise ArtifactError(f"{where}: the model holds more than {limit} {_LIMIT_WORDS[what]} "
                                f"(--json-max-{what.replace('_', '-')}); refused before allocating it")

    @contextlib.contextmanager
    def unsigned_128(self):
        """Integers up to 128 bits while a bit generator's state is read (PCG64 keeps 128-bit counters)."""
        self.integers = (0, 1 << 128)
        try:
            yield
        finally:
            self.integers = (-1 << 63, 1 << 63)


def _decode_node(node, where, load):
    if node is None or isinstance(node, (bool, str, float)):
        return node
    if type(node) is int:
        if not load.integers[0] <= node < load.integers[1]:
            raise ArtifactError(f"{where}: the integer {_clip(str(node), 40)} is outside the "
                                f"{'64-bit' if load.integers[0] else 'unsigned 128-bit'} range compiled code takes")
        return node
    if isinstance(node, list):
        return [_decode_node(item, f"{where}[{i}]", load) for i, item in enumerate(node)]
    if not isinstance(node, dict):
        raise ArtifactError(f"{where}: unexpected JSON value")
    kind = node.get("$type")
    try:
        decode = _DECODERS.get(kind) if isinstance(kind, str) else None
        if decode is None:
            raise ArtifactError(f"{where}: unknown node type {_clip(repr(kind), 80)}")
        return decode(node, where, load)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as error:
        raise ArtifactError(f"{where}: malformed {kind} node ({type(error).__name__}: {_clip(str(error))})") \
            from None


def _decode_items(node, where, load):
    return [_decode_node(item, f"{where}[{i}]", load) for i, item in enumerate(node["items"])]


def _decode_pairs(node, where, load, field="items"):
    pairs = {}
    for key, value in node[field]:
        key = _decode_node(key, f"{where} key", load)
        pairs[key] = _decode_node(value, f"{where}[{key!r}]", load)
    return pairs


def _array_dtype(name, where):
    """The loader's numpy dtype for a dtype name of the format; any other name is refused."""
    import numpy as np

    if isinstance(name, str) and (name in JSON_DTYPES or name == "|O" or _TEXT_DTYPE.fullmatch(name)):
        return np.dtype(name)
    raise ArtifactError(f"{where}: dtype {_clip(repr(name), 200)} is not allowed (the format's dtypes: "
                        f"{', '.join(JSON_DTYPES)}, <U<width> and |O)")


def _decode_array(node, where, load):
    import numpy as np

    dtype = _array_dtype(node["dtype"], where)
    shape = node["shape"]
    if not isinstance(shape, list) or len(shape) > 32 or not all(type(size) is int and size >= 0 for size in shape):
        raise ArtifactError(f"{where}: shape must be a list of at most 32 sizes")
    count = math.prod(shape)
    load.spend("array_bytes", count * dtype.itemsize, where)
    if dtype.kind in "biufc":
        order = node.get("order", "C")
        if order not in ("C", "F"):
            raise ArtifactError(f"{where}: order must be \"C\" or \"F\"")
        return np.frombuffer(_raw_bytes(node, dtype, count, where), dtype=dtype).reshape(shape, order=order).copy(
            order=order)
    items = _decode_items(node, where, load)
    if len(items) != count:
        raise ArtifactError(f"{where}: {len(items)} items do not fill shape {shape}")
    if dtype.kind == "U" and not all(isinstance(item, str) and len(item) <= dtype.itemsize // 4 for item in items):
        raise ArtifactError(f"{where}: the items of a {dtype.str} array are strings of at most "
                            f"{dtype.itemsize // 4} characters")
    array = np.empty(count, dtype=dtype)
    array[:] = items if dtype.kind != "O" else _object_items(items)
    return array.reshape(shape)


def _decode_scalar(node, where, load):
    import numpy as np

    dtype = _array_dtype(node["dtype"], where)
    if dtype.kind not in "biufc":
        raise ArtifactError(f"{where}: a scalar is a number or a boolean")
    return np.frombuffer(_raw_bytes(node, dtype, 1, where), dtype=dtype)[0]


def _decode_float(node, where, load):
    if node["value"] not in ("nan", "inf", "-inf"):
        raise ArtifactError(f"{where}: bad float {_clip(repr(node['value']), 40)}")
    return float(node["value"])


def _decode_type(node, where, load):
    import numpy as np

    if not isinstance(node["name"], str) or node["name"] not in _NUMPY_TYPES:
        raise ArtifactError(f"{where}: numpy type {_clip(repr(node['name']), 40)} is not allowed")
    return getattr(np, node["name"])


def _decode_slice(node, where, load):
    parts = _decode_items(node, where, load)
    if len(parts) != 3 or not all(part is None or type(part) is int for part in parts):
        raise ArtifactError(f"{where}: a slice holds [start, stop, step] integers or nulls")
    return slice(*parts)


def _decode_random_state(node, where, load):
    import numpy as np

    generator = np.random.RandomState()
    generator.set_state(_decode_node(node["state"], f"{where}.state", load))
    _check_generator_position(generator.get_state(legacy=False), where)
    return generator


def _decode_generator(node, where, load):
    import numpy as np

    name = node["bit_generator"]
    if name not in JSON_BIT_GENERATORS:
        raise ArtifactError(f"{where}: bit generator {_clip(repr(name), 40)} is not allowed")
    bit_generator = getattr(np.random, name)()
    with load.unsigned_128():
        bit_generator.state = _decode_node(node["state"], f"{where}.state", load)
    _check_generator_position(bit_generator.state, where)
    return np.random.Generator(bit_generator)


def _check_generator_position(state, where):
    """numpy takes a bit generator's buffer position as given and reads its buffer there: it must lie inside
    (MT19937's key of 624 words, Philox's buffer of 4; at the end, the next draw refills it)."""
    name = state["bit_generator"]
    position, end = ((state["state"]["pos"], 624) if name == "MT19937" else
                     (state["buffer_pos"], 4) if name == "Philox" else (0, 0))
    if not 0 <= position <= end:
        raise ArtifactError(f"{where}: the {name} generator's position {_clip(str(position), 40)} is outside its "
                            f"buffer (0 to {end})")


def _decode_partial(node, where, load):
    function = _resolve(node["function"], JSON_FUNCTIONS, where)
    args = _decode_node(node["args"], f"{where}.args", load)
    keywords = _decode_pairs(node, where, load, "keywords")
    if not isinstance(args, list) or not all(isinstance(key, str) for key in keywords):
        raise ArtifactError(f"{where}: a partial holds a list of args and keywords named by strings")
    return functools.partial(function, *args, **keywords)


def _decode_bunch(node, where, load):
    from sklearn.utils import Bunch

    return Bunch(**_decode_pairs(node, where, load))


def _decode_estimator(node, where, load):
    cls = _resolve(node["class"], JSON_ESTIMATORS, where)
    state = node["state"]
    if not isinstance(state, dict):
        raise ArtifactError(f"{where}: estimator state must be an object")
    _refuse_shadowing(cls, state, where)
    estimator = cls.__new__(cls)
    estimator.__setstate__({key: _decode_node(value, f"{where}.{key}", load) for key, value in state.items()})
    _check_estimator(estimator, where, load)
    return estimator


def _refuse_shadowing(cls, state, where):
    """A state holds values: never an attribute that would hide what the class defines (a method such as
    predict or _validate_params, a property, or a class attribute such as _parameter_constraints)."""
    for key in state:
        if hasattr(cls, key):
            raise ArtifactError(f"{where}.{_clip(key, 60)}: a state holds values only, and may not replace what "
                                f"{cls.__name__} defines")


def _decode_object(node, where, load):
    name = node["class"]
    if load.version == 1 and name in JSON_STRUCTURES:
        return _VERSION_1_STRUCTURES[JSON_STRUCTURES[name]](node, where, load)
    cls = _resolve(name, JSON_OBJECTS, where)
    state = _decode_node(node["state"], f"{where}.state", load) if "state" in node else None
    if JSON_OBJECTS[name] == "new":
        if "args" in node or not isinstance(state, (dict, type(None))):
            raise ArtifactError(f"{where}: {name} is rebuilt from a state object, without args")
        _refuse_shadowing(cls, state or {}, where)
        value = cls.__new__(cls)
        value.__dict__.update(state or {})
        return value
    args = _decode_node(node["args"], f"{where}.args", load)
    if not isinstance(args, list) or not all(type(arg) in (int, float) for arg in args):
        raise ArtifactError(f"{where}: the arguments of {name} must be numbers")
    if state is not None:
        raise ArtifactError(f"{where}: {name} takes no state")
    return cls(*args)


def _decode_neighbors_tree(node, where, load):
    import numpy as np

    cls = _resolve(node["class"], JSON_NEIGHBOR_TREES, where)
    data = _decode_node(node["data"], f"{where}.data", load)
    metric, params = node["metric"], _decode_node(node["metric_params"], f"{where}.metric_params", load)
    leaf_size = node["leaf_size"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.dtype.kind != "f" or not len(data) or \
            not isinstance(metric, str) or metric == "pyfunc" or not isinstance(params, dict) or \
            not all(isinstance(key, str) and not callable(value) for key, value in params.items()) or \
            type(leaf_size) is not int or leaf_size < 1:
        raise ArtifactError(f"{where}: a neighbours tree needs 2-d float data, a metric name with parameters that "
                            "are values, and a leaf size")
    return cls(data, leaf_size=leaf_size, metric=metric, **params)


def _decode_tree(node, where, load):
    columns = _decode_columns(node["nodes"], where, load)
    return _build_tree(node["n_features"], node["n_classes"], columns,
                       _decode_node(node["value"], f"{where}.value", load), where, load)


def _decode_tree_predictor(node, where, load):
    columns = _decode_columns(node["nodes"], where, load)
    bitsets = [_decode_node(node[key], f"{where}.{key}", load) for key in _PREDICTOR_BITSETS]
    return _build_tree_predictor(columns, *bitsets, where, load)


def _decode_columns(nodes, where, load):
    if not isinstance(nodes, dict):
        raise ArtifactError(f"{where}.nodes must map each node field to its array")
    return {name: _decode_node(column, f"{where}.nodes.{name}", load) for name, column in nodes.items()}


_DECODERS = {
    "estimator": _decode_estimator,
    "object": _decode_object,
    "tree": _decode_tree,
    "tree_predictor": _decode_tree_predictor,
    "neighbors_tree": _decode_neighbors_tree,
    "ndarray": _decode_array,
    "scalar": _decode_scalar,
    "float": _decode_float,
    "tuple": lambda node, where, load: tuple(_decode_items(node, where, load)),
    "set": lambda node, where, load: set(_decode_items(node, where, load)),
    "frozenset": lambda node, where, load: frozenset(_decode_items(node, where, load)),
    "dict": lambda node, where, load: _decode_pairs(node, where, load),
    "slice": _decode_slice,
    "dtype": lambda node, where, load: _array_dtype(node["dtype"], where),
    "type": _decode_type,
    "random_state": _decode_random_state,
    "generator": _decode_generator,
    "bunch": _decode_bunch,
    "partial": _decode_partial,
}


def _raw_bytes(node, dtype, count, where):
    raw = base64.b64decode(node["data"], validate=True)
    if len(raw) != count * dtype.itemsize:
        raise ArtifactError(f"{where}: {len(raw)} bytes of data do not hold {count} values of "
                            f"{_clip(str(dtype), 80)}")
    return raw


def _object_items(items):
    """Assign a list into an object array without numpy re-nesting its lists."""
    import numpy as np

    holder = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        holder[i] = item
    return holder


# -- compiled structures ----------------------------------------------------------------------
# scikit-learn's Cython walks tree nodes, and histogram boosting's its predictor nodes, without
# bounds checks, as many steps as the depth it is given.  So the loader builds both itself: the
# node records get scikit-learn's own layout (NODE_DTYPE, PREDICTOR_RECORD_DTYPE) and are filled
# from one plain array per field, each of the field's own dtype; the node count, the output
# count and every node's depth are computed; and the nodes must form one tree (_tree_depths).

_COMPUTED_FIELDS = ("depth",)                     # TreePredictor's: computed by _tree_depths, never read
_PREDICTOR_BITSETS = ("binned_left_cat_bitsets", "raw_left_cat_bitsets")


def _build_tree(n_features, n_classes, columns, value, where, load):
    """scikit-learn's Tree for `n_features` inputs and `n_classes` per output, from its node columns and
    its values (nodes x outputs x classes), once they form one tree whose splits read existing features."""
    import numpy as np
    from sklearn.tree._tree import NODE_DTYPE, Tree

    count = _node_count(columns, NODE_DTYPE, where, load)
    if type(n_features) is not int or n_features < 1:
        raise ArtifactError(f"{where}: n_features must be a positive integer")
    load.bound("width", n_features, f"{where}.n_features")
    if not isinstance(value, np.ndarray) or value.dtype != np.float64 or value.ndim != 3 or \
            value.shape[0] != count or 0 in value.shape:
        raise ArtifactError(f"{where}.value must be a float64 array of its {count} nodes x outputs x classes")
    n_outputs, widest = value.shape[1:]
    if not isinstance(n_classes, list) or len(n_classes) != n_outputs or \
            not all(type(k) is int and 1 <= k <= widest for k in n_classes) or max(n_classes) != widest:
        raise ArtifactError(f"{where}.n_classes must count each of its {n_outputs} outputs' classes, at most "
                            f"{widest} (the width of its values)")
    left, right, feature = columns["left_child"], columns["right_child"], columns["feature"]
    leaf = left == -1
    if np.any(right[leaf] != -1) or np.any(feature[leaf] != -2):
        raise ArtifactError(f"{where}: a leaf (left_child -1) has right_child -1 and feature -2")
    depths = _tree_depths(left, right, leaf, where)
    inner = ~leaf
    if np.any((feature[inner] < 0) | (feature[inner] >= n_features)):
        raise ArtifactError(f"{where}: a Tree node splits on a feature that does not exist")
    if np.isnan(columns["threshold"][inner]).any() or np.any(columns["missing_go_to_left"] > 1):
        raise ArtifactError(f"{where}: a split's threshold is NaN, or its missing_go_to_left is not 0 or 1")
    records = np.zeros(count, dtype=NODE_DTYPE)
    for name in NODE_DTYPE.names:
        records[name] = columns[name]
    tree = Tree(n_features, np.array(n_classes, dtype=np.intp), n_outputs)
    tree.__setstate__({"max_depth": int(depths.max()), "node_count": count, "nodes": records,
                       "values": np.ascontiguousarray(value)})
    return tree


def _build_tree_predictor(columns, binned_bitsets, raw_bitsets, where, load):
    """Histogram boosting's TreePredictor from its node columns and categorical bitsets, once they form one
    tree; each node's depth is computed (the native walker takes as many steps as the deepest one)."""
    import numpy as np
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    count = _node_count(columns, PREDICTOR_RECORD_DTYPE, where, load)
    if any(np.any(columns[flag] > 1) for flag in ("is_leaf", "is_categorical", "missing_go_to_left")):
        raise ArtifactError(f"{where}: is_leaf, is_categorical and missing_go_to_left are 0 or 1")
    leaf = columns["is_leaf"] == 1
    left, right = columns["left"].astype(np.int64), columns["right"].astype(np.int64)
    if np.any(left[leaf] != 0) or np.any(right[leaf] != 0):
        raise ArtifactError(f"{where}: a leaf has no children (left and right 0)")
    depths = _tree_depths(left, right, leaf, where)
    bitsets = (binned_bitsets, raw_bitsets)
    if not all(isinstance(b, np.ndarray) and b.dtype == np.uint32 and b.ndim == 2 and b.shape[1] == 8
               for b in bitsets) or len(binned_bitsets) != len(raw_bitsets):
        raise ArtifactError(f"{where}: the two bitset arrays are uint32, 8 words per categorical split, as many")
    inner = ~leaf
    categorical = inner & (columns["is_categorical"] == 1)
    if np.any(columns["feature_idx"][inner] < 0) or np.any(columns["bitset_idx"][categorical] >= len(raw_bitsets)) \
            or np.isnan(columns["num_threshold"][inner & ~categorical]).any():
        raise ArtifactError(f"{where}: a TreePredictor node points outside its features or bitsets, or its "
                            "threshold is NaN")
    records = np.zeros(count, dtype=PREDICTOR_RECORD_DTYPE)
    for name in columns:
        records[name] = columns[name]
    records["depth"] = depths
    return TreePredictor(records, *(np.ascontiguousarray(b) for b in bitsets))


def _node_count(columns, record, where, load):
    """How many nodes `columns` hold: one 1-d array for each field of `record` (but the computed ones), of
    that field's own dtype, all as long, at least one node; counted against the budget."""
    import numpy as np

    names = [name for name in record.names if name not in _COMPUTED_FIELDS]
    if sorted(columns) != sorted(names):
        raise ArtifactError(f"{where}.nodes must hold the fields {', '.join(names)}")
    for name in names:
        column, dtype = columns[name], record.fields[name][0]
        if not isinstance(column, np.ndarray) or column.dtype != dtype or column.ndim != 1:
            raise ArtifactError(f"{where}.nodes.{name} must be a 1-d array of {dtype.str}")
    count = len(columns[names[0]])
    if not count or any(len(columns[name]) != count for name in names):
        raise ArtifactError(f"{where}: every node field holds the same number of nodes, at least one")
    load.spend("nodes", count, where)
    return count


def _tree_depths(left, right, leaf, where):
    """Every node's depth, once the nodes form one tree: from the root (node 0) each node is reached once.

    Each inner node has two children after it in the array (scikit-learn lays trees out so)
    and every node but the root is the child of exactly one node: following parents then
    always ends at the root, so there is no cycle, no shared and no unreachable node.  The
    depths come by pointer jumping: log2(depth) vectorised steps, never one per node or level.
    """
    import numpy as np

    count = len(left)
    index = np.arange(count)
    inner = ~leaf
    parents, lefts, rights = index[inner], left[inner], right[inner]
    children = np.concatenate([lefts, rights])
    if np.any((lefts <= parents) | (rights <= parents) | (lefts >= count) | (rights >= count)) or \
            np.any(np.bincount(children, minlength=count)[1:] != 1):
        raise ArtifactError(f"{where}: the nodes do not form one tree (each inner node needs two children after "
                            "it in the array, and every node but the first one parent)")
    up = np.zeros(count, dtype=np.int64)
    up[children] = np.concatenate([parents, parents])
    depths = (index > 0).astype(np.int64)
    while up.any():
        depths, up = depths + depths[up], up[up]
    return depths


def _version_1_tree(node, where, load):
    """A version 1 Tree (an object node: arguments, then its nodes as records) through _build_tree."""
    n_features, n_classes, _ = node["args"]              # the third, the output count, is computed
    n_classes = _decode_node(n_classes, f"{where}.args[1]", load)
    fields = _version_1_fields(node)
    return _build_tree(n_features, n_classes.tolist() if hasattr(n_classes, "tolist") else n_classes,
                       _version_1_columns(fields["nodes"], "sklearn.tree._tree", "NODE_DTYPE", where, load),
                       _decode_node(fields["values"], f"{where}.values", load), where, load)


def _version_1_tree_predictor(node, where, load):
    """A version 1 TreePredictor (an object node whose state holds its nodes as records) through
    _build_tree_predictor."""
    fields = _version_1_fields(node)
    columns = _version_1_columns(fields["nodes"], "sklearn.ensemble._hist_gradient_boosting.common",
                                 "PREDICTOR_RECORD_DTYPE", where, load)
    return _build_tree_predictor(columns, *(_decode_node(fields[key], f"{where}.{key}", load)
                                            for key in _PREDICTOR_BITSETS), where, load)


def _version_1_fields(node):
    """A version 1 object node's state: a dict node of field names to (undecoded) nodes."""
    if node["state"]["$type"] != "dict":
        raise ValueError("its state is a dict node of its fields")
    return {key: value for key, value in node["state"]["items"] if isinstance(key, str)}


def _version_1_columns(node, module, name, where, load):
    """Version 1's node records, as columns: the record layout is the loader's own (scikit-learn's `name`),
    which the file's description must equal field for field; the file's never reads a byte."""
    import numpy as np

    record = getattr(importlib.import_module(module), name)
    own = {"names": list(record.names), "formats": [record.fields[n][0].str for n in record.names],
           "offsets": [record.fields[n][1] for n in record.names], "itemsize": record.itemsize}
    shape = node["shape"]
    if node["$type"] != "ndarray" or node["dtype"] != own or node.get("order", "C") != "C" or \
            not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 0):
        raise ArtifactError(f"{where}.nodes: version 1 node records must be laid out as {name} is: {own}")
    load.spend("array_bytes", shape[0] * record.itemsize, f"{where}.nodes")
    records = np.frombuffer(_raw_bytes(node, record, shape[0], f"{where}.nodes"), dtype=record)
    return {field: records[field].copy() for field in record.names if field not in _COMPUTED_FIELDS}


_VERSION_1_STRUCTURES = {"tree": _version_1_tree, "tree_predictor": _version_1_tree_predictor}

# -- checks on estimators -----------------------------------------------------------------------
# The state an estimator is restored with is plain values, but scikit-learn's compiled code and
# numpy size loops and allocations by some of it, and index arrays by others.  Each estimator is
# checked as it is decoded (its steps, members and sub-estimators first), by what it holds rather
# than by its class name, before anything uses it.

def _check_estimator(estimator, where, load):
    """Every check an estimator's decoded state must pass before compiled code trusts it.

    scikit-learn's own parameter validation, thread counts compiled code accepts, an input width
    (n_features_in_) that is positive, within the budget and the width of every fitted array that
    has one, then each family's checks (_PART_CHECKS).
    """
    import numpy as np
    from sklearn.utils._param_validation import InvalidParameterError

    state = estimator.__dict__
    try:
        if hasattr(type(estimator), "_parameter_constraints"):   # every public class has them
            estimator._validate_params()      # every hyper-parameter in its documented range
    except (InvalidParameterError, AttributeError, TypeError) as error:
        raise ArtifactError(f"{where}: {_clip(str(error))}") from None
    for name, lowest in (("n_jobs", -1024), ("_n_threads", 1)):   # become threads, processes or OpenMP's
        value = state.get(name)
        if value is not None and not (_is_int(value) and lowest <= value and value != 0):
            raise ArtifactError(f"{where}.{name}: a thread count must be an integer from {lowest} up, not 0")
        if value is not None and value > (os.cpu_count() or 1):   # a file never starts more workers than CPUs
            state[name] = os.cpu_count() or 1
    n_features = state.get("n_features_in_")
    if n_features is not None and not (_is_int(n_features) and n_features >= 1):
        raise ArtifactError(f"{where}.n_features_in_ must be a positive integer")
    if n_features is not None:
        load.bound("width", int(n_features), f"{where}.n_features_in_")
    names = state.get("feature_names_in_")          # requests are turned into columns of these names
    if names is not None and not (isinstance(names, np.ndarray) and names.shape == (n_features,) and
                                  all(isinstance(name, str) for name in names.tolist())):
        raise ArtifactError(f"{where}.feature_names_in_ must name each of the n_features_in_ features")
    for check in _PART_CHECKS:
        check(estimator, state, where, load)


def _is_int(value):
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _required_features(state, where, what):
    """n_features_in_, which the estimator's own input check enforces; compiled code relies on it."""
    n_features = state.get("n_features_in_")
    if n_features is None:
        raise ArtifactError(f"{where}: {what} needs n_features_in_ (its input check is skipped without it)")
    return int(n_features)


# Fitted arrays whose last axis is the estimator's input width (one coefficient, mean, scale, centre,
# statistic, bin or category list per feature): n_features_in_ must be that width wherever one is held.
_WIDTH_ARRAYS = ("coef_", "components_", "cluster_centers_", "theta_", "var_", "feature_log_prob_", "feature_count_",
                 "mean_", "scale_", "min_", "data_min_", "data_max_", "data_range_", "max_abs_", "center_",
                 "statistics_", "bin_edges_", "n_bins_", "idf_", "_fit_X", "categories_")


def _check_widths(estimator, state, where, load):
    """The input width is derived from the fitted arrays: a stored n_features_in_ must agree with each
    (a forged one would size the rows the service builds, and its warm-up row)."""
    import numpy as np

    n_features = state.get("n_features_in_")
    if n_features is None:
        return
    held = {name: state.get(name) for name in _WIDTH_ARRAYS}
    if state.get("kernel", "precomputed") != "precomputed":   # an SVM's support vectors, unless a kernel matrix
        held["support_vectors_"] = state.get("support_vectors_")
    for name, value in held.items():
        width = len(value) if isinstance(value, list) else \
            value.shape[-1] if isinstance(value, np.ndarray) and value.ndim else None
        if width is not None and width != n_features:
            raise ArtifactError(f"{where}.n_features_in_ is {n_features}, but its {name} holds {width} features")


def _check_categories(estimator, state, where, load):
    """Classes, encoder categories and vocabulary terms are counted against the budget (each becomes an
    output column, a label or a count that predictions are sized by), and each output's class count is
    the one derived from its classes."""
    import numpy as np

    counts = []
    for name in ("classes_", "categories_"):
        held = state.get(name)
        parts = held if isinstance(held, list) else [held]
        counts += [len(part) for part in parts if isinstance(part, np.ndarray) and part.ndim == 1]
    vocabulary = state.get("vocabulary_")
    load.spend("categories", sum(counts) + (len(vocabulary) if isinstance(vocabulary, dict) else 0), where)
    classes, stored = state.get("classes_"), state.get("n_classes_")
    if stored is not None and classes is not None:
        derived = [len(classes)] if isinstance(classes, np.ndarray) else [len(part) for part in classes]
        if not isinstance(stored, (int, np.integer, np.ndarray, list)) or \
                np.atleast_1d(stored).tolist() != derived:
            raise ArtifactError(f"{where}.n_classes_ is not the number of its classes_ ({derived})")


def _check_tree_estimator(estimator, state, where, load):
    tree = state.get("tree_")
    if tree is None:
        return
    if type(tree).__name__ != "Tree":
        raise ArtifactError(f"{where}.tree_ is not a Tree")
    n_features = _required_features(state, where, "a decision tree")
    if tree.n_features != n_features or state.get("n_outputs_") != tree.n_outputs:
        raise ArtifactError(f"{where}: its tree has {tree.n_features} features and {tree.n_outputs} outputs, "
                            f"the estimator {n_features} and {state.get('n_outputs_')}")
    if "classes_" in state:
        classes = state["classes_"] if tree.n_outputs > 1 else [state["classes_"]]
        if not isinstance(classes, list) or [len(c) for c in classes] != [int(n) for n in tree.n_classes]:
            raise ArtifactError(f"{where}: classes_ do not match the tree's class counts")


def _check_members(estimator, state, where, load):
    """A fitted forest's or gradient boosting's members: trees the ensemble calls without checking inputs
    again, which must agree with it and with each other (voting and stacking call their members' public
    methods, which check).  An unfitted ensemble (a template inside voting's `estimators`) holds none."""
    import numpy as np
    from sklearn.ensemble._forest import BaseForest
    from sklearn.ensemble._gb import BaseGradientBoosting

    members = state.get("estimators_")
    if not isinstance(estimator, (BaseForest, BaseGradientBoosting)) or members is None:
        return
    n_features = _required_features(state, where, "a tree ensemble")
    flat = np.asarray(members, dtype=object).ravel() if isinstance(members, (list, np.ndarray)) else []
    if not len(flat) or not all(hasattr(m, "tree_") and m.tree_.n_features == n_features
                                and m.__dict__.get("n_features_in_") == n_features for m in flat):
        raise ArtifactError(f"{where}: every member must be a tree of the ensemble's {n_features} features")
    if "init_" in state:                     # gradient boosting: stages x trees per stage of regression trees
        _check_trees_per_iteration(state, where)
        width = state.get("n_trees_per_iteration_")
        if not isinstance(members, np.ndarray) or members.ndim != 2 or members.shape[1] != width or \
                any(m.tree_.n_outputs != 1 or int(m.tree_.n_classes[0]) != 1 for m in flat):
            raise ArtifactError(f"{where}: estimators_ must be stages of {width} single-output regression trees")
        if state.get("init_") != "zero":
            _check_init_width(estimator, n_features, width, where)
        return
    outputs = state.get("n_outputs_")
    classes = state.get("classes_")
    counts = None if classes is None else [len(classes)] if outputs == 1 else [len(c) for c in classes]
    if any(m.tree_.n_outputs != outputs or counts is not None and list(m.tree_.n_classes) != counts
           for m in flat):
        raise ArtifactError(f"{where}: a member tree has other outputs or classes than the ensemble's "
                            f"({outputs} outputs, {counts or 'no'} classes)")


def _check_trees_per_iteration(state, where):
    """Boosting fits one tree per class per iteration, or one for a regression or two classes."""
    classes = state.get("classes_")
    derived = 1 if classes is None or len(classes) <= 2 else len(classes)
    if state.get("n_trees_per_iteration_") != derived:
        raise ArtifactError(f"{where}.n_trees_per_iteration_ must be {derived}, one tree per class (one for a "
                            "regression or two classes)")


def _check_init_width(estimator, n_features, width, where):
    """Gradient boosting adds its stages into the initial estimator's raw predictions, row by row in
    compiled code: their width must be the number of trees per stage.  The initial estimator was
    checked as it was decoded, so it is asked directly, on one row of zeros."""
    import numpy as np

    try:
        raw = estimator._raw_predict_init(np.zeros((1, n_features), dtype=np.float32))
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as error:
        raise ArtifactError(f"{where}.init_ cannot start the predictions: {_clip(str(error))}") from None
    if not isinstance(raw, np.ndarray) or raw.shape != (1, width) or raw.dtype != np.float64:
        raise ArtifactError(f"{where}.init_ predicts {getattr(raw, 'shape', None)} raw values for one row, "
                            f"the stages hold {width} trees each")


def _check_histogram_predictors(estimator, state, where, load):
    """HistGradientBoosting walks its predictors' nodes over the rows; categorical splits read the bin
    mapper's bitsets, which it builds by setting one bit per known category value."""
    import numpy as np

    predictors = state.get("_predictors")
    if predictors is None:
        return
    n_features = _required_features(state, where, "histogram gradient boosting")
    _check_trees_per_iteration(state, where)
    width = state.get("n_trees_per_iteration_")
    if not isinstance(predictors, list) or not predictors or not all(
            isinstance(stage, list) and len(stage) == width for stage in predictors):
        raise ArtifactError(f"{where}._predictors must be iterations of {width} predictors each")
    mapper = state.get("_bin_mapper")
    categorical = getattr(mapper, "is_categorical_", None)
    if categorical is None:
        categorical = np.zeros(n_features, dtype=np.uint8)
    thresholds = getattr(mapper, "bin_thresholds_", None)
    if not isinstance(categorical, np.ndarray) or categorical.shape != (n_features,) or \
            not isinstance(thresholds, list) or len(thresholds) != n_features:
        raise ArtifactError(f"{where}._bin_mapper does not describe the model's {n_features} features")
    for f in np.flatnonzero(categorical):
        known = thresholds[f]
        if not isinstance(known, np.ndarray) or known.ndim != 1 or known.dtype.kind != "f" or \
                not np.all((known >= 0) & (known < 256) & (known == np.floor(known))):
            raise ArtifactError(f"{where}._bin_mapper: categories must be whole numbers from 0 to 255")
    baseline = state.get("_baseline_prediction")
    if not isinstance(baseline, np.ndarray) or baseline.shape != (1, width):
        raise ArtifactError(f"{where}._baseline_prediction must hold {width} values")
    for predictor in (p for stage in predictors for p in stage):
        if type(predictor).__name__ != "TreePredictor":
            raise ArtifactError(f"{where}._predictors holds something other than a TreePredictor")
        inner = predictor.nodes[predictor.nodes["is_leaf"] == 0]
        if np.any(inner["feature_idx"] >= n_features):
            raise ArtifactError(f"{where}: a predictor splits on a feature the estimator does not have")
        split = inner[inner["is_categorical"] == 1]
        if len(split) and not np.all(categorical[split["feature_idx"]]):
            raise ArtifactError(f"{where}: a predictor makes a categorical split on a numeric feature")


def _check_kmeans(estimator, state, where, load):
    import numpy as np

    centers = state.get("cluster_centers_")
    if centers is None:
        return
    n_features = _required_features(state, where, "a clustering")
    if not isinstance(centers, np.ndarray) or centers.ndim != 2 or centers.shape[1] != n_features or \
            not len(centers) or centers.dtype not in (np.float32, np.float64) or \
            not centers.flags.c_contiguous:
        raise ArtifactError(f"{where}: cluster_centers_ must be a C-ordered float array of clusters by "
                            f"{n_features} features")


# libsvm's wrapper takes these arrays as typed C buffers: each of exactly this dtype and rank, C-ordered.
_LIBSVM_ARRAYS = {"support_vectors_": ("float64", 2), "_dual_coef_": ("float64", 2), "_intercept_": ("float64", 1),
                  "_probA": ("float64", 1), "_probB": ("float64", 1), "_n_support": ("int32", 1),
                  "support_": ("int32", 1)}


def _check_svm(estimator, state, where, load):
    """libsvm indexes support vectors, coefficients and intercepts by counts the state holds, and, with a
    precomputed kernel, each request's kernel row by the support indices."""
    import numpy as np

    if "support_vectors_" not in state:
        return
    n_features = _required_features(state, where, "an SVM")
    if not (_is_int(state.get("degree")) and 0 <= state["degree"] < 2**31):     # libsvm's C int
        raise ArtifactError(f"{where}.degree must be an integer from 0 to 2**31 - 1")
    for name, (dtype, rank) in _LIBSVM_ARRAYS.items():
        array = state.get(name)
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != rank or \
                not array.flags.c_contiguous:
            raise ArtifactError(f"{where}.{name} must be a C-ordered {rank}-d {dtype} array (libsvm reads it so)")
    if state.get("_sparse") is not False:
        raise ArtifactError(f"{where}: an SVM is served fitted on dense data (_sparse false)")
    support = state["support_"]
    if state.get("kernel") == "precomputed" and np.any((support < 0) | (support >= n_features)):
        raise ArtifactError(f"{where}.support_ must index the {n_features} columns of a precomputed kernel row")
    _check_libsvm(estimator, where)


def _check_libsvm(svm, where):
    """libsvm indexes support vectors, coefficients and intercepts by counts the state holds."""
    vectors, counts = svm.__dict__["support_vectors_"], svm.__dict__["_n_support"]
    dual, intercept = svm.__dict__["_dual_coef_"], svm.__dict__["_intercept_"]
    precomputed = svm.kernel == "precomputed"          # its support vectors are columns of a request's kernel row
    n_vectors = len(svm.support_) if precomputed else len(vectors)
    classifier = svm._impl in ("c_svc", "nu_svc")
    n_classes = len(counts) if classifier else 2
    pairs = n_classes * (n_classes - 1) // 2
    probabilities = [svm.__dict__[k] for k in ("_probA", "_probB")]
    probability = svm.__dict__.get("_effective_probability", svm.__dict__.get("probability"))  # "deprecated" in 1.9
    sizes = (pairs,) if probability is True else (0, pairs)
    if counts.shape != (n_classes,) or n_classes < 2 or counts.min(initial=0) < 0 or \
            (classifier and int(counts.sum()) != n_vectors) or len(svm.support_) != n_vectors or \
            dual.shape != (n_classes - 1, n_vectors) or intercept.shape != (pairs,) or \
            (vectors.shape != (0, 0) if precomputed else vectors.shape[1] != svm.__dict__.get("n_features_in_")) or \
            not all(p.shape in ((size,) for size in sizes) for p in probabilities):
        raise ArtifactError(f"{where}: the SVM's support vectors, coefficients and intercepts do not agree")


# A text vectorizer's work per request is set by its state: its token pattern runs on every text a
# request sends (a pattern that backtracks, such as (\w+)+$, takes exponential time on a crafted text)
# and every n-gram length up to max_n is counted and held (memory grows with max_n squared per token).
# A JSON model may use the token patterns people use, and n-grams of up to MAX_NGRAM words or
# characters: no data-only file can make one request take hours or hold far more than it sends.
SAFE_TOKEN_PATTERNS = (r"(?u)\b\w\w+\b", r"(?u)\b\w+\b", r"\b\w\w+\b", r"\b\w+\b", r"(?u)\S+", r"\S+", None)
MAX_NGRAM = 8


def _check_vectorizer(estimator, state, where, load):
    """A vectorizer reads no file, its work per text is bounded (see SAFE_TOKEN_PATTERNS), and its term
    indices, which become a sparse matrix's column indices that scipy's compiled code and the next step's
    product trust, number the columns 0 .. n-1, once each."""
    if callable(getattr(estimator, "build_analyzer", None)):
        mode = state.get("input", "content")
        if mode != "content":           # "filename" or "file": it would open the paths a request sends
            raise ArtifactError(f"{where}: its {type(estimator).__name__} has input={_clip(repr(mode), 40)}, which "
                                "reads the files or file objects a request names; only input=\"content\" can be "
                                "served (set it and save the model again)")
        ngrams = state.get("ngram_range")           # n-grams are counted in a loop from the lower bound up
        if not (isinstance(ngrams, tuple) and len(ngrams) == 2 and all(_is_int(n) for n in ngrams)
                and 1 <= ngrams[0] <= ngrams[1] <= MAX_NGRAM):
            raise ArtifactError(f"{where}.ngram_range must be (min_n, max_n) with 1 <= min_n <= max_n <= "
                                f"{MAX_NGRAM}")
        if state.get("analyzer", "word") == "word" and state.get("token_pattern") not in SAFE_TOKEN_PATTERNS:
            raise ArtifactError(f"{where}.token_pattern {_clip(repr(state.get('token_pattern')), 60)} is not one a "
                                f"JSON model may use (a pattern can take exponential time on a crafted text): "
                                f"{', '.join(repr(p) for p in SAFE_TOKEN_PATTERNS[:-1])}")
    vocabulary = state.get("vocabulary_")
    if vocabulary is None:
        return
    if not isinstance(vocabulary, dict) or not all(isinstance(t, str) and _is_int(i) and not isinstance(i, bool)
                                                   for t, i in vocabulary.items()) or \
            sorted(int(i) for i in vocabulary.values()) != list(range(len(vocabulary))):
        raise ArtifactError(f"{where}.vocabulary_ must number its terms 0 to {len(vocabulary) - 1}, once each")


def _check_neighbors(estimator, state, where, load):
    """Neighbour searches divide by and index into the training rows by the counts stored beside them, and
    a classifier counts votes by the labels' codes."""
    import numpy as np

    data = state.get("_fit_X")
    if data is None or "n_samples_fit_" not in state:
        return
    n_features = _required_features(state, where, "a neighbours model")
    labels = state.get("_y")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != n_features or \
            data.dtype.kind != "f" or not len(data) or state["n_samples_fit_"] != len(data) or \
            (labels is not None and (not isinstance(labels, np.ndarray) or len(labels) != len(data))) or \
            not (_is_int(state.get("n_neighbors")) and 1 <= state["n_neighbors"] <= len(data)):
        raise ArtifactError(f"{where}: _fit_X, n_samples_fit_ and _y must hold the same training rows, of "
                            f"{n_features} features, and n_neighbors at most that many")
    classes = state.get("classes_")
    if isinstance(classes, np.ndarray) and labels is not None and labels.ndim == 1 and (
            labels.dtype.kind not in "iu" or np.any((labels < 0) | (labels >= len(classes)))):
        raise ArtifactError(f"{where}._y must be the codes of its {len(classes)} classes_")
    tree = state.get("_tree")
    if tree is not None and not np.array_equal(np.asarray(tree.data), data, equal_nan=True):
        raise ArtifactError(f"{where}: the search tree is not built on _fit_X")


def _check_derived(estimator, state, where, load):
    """Private attributes fit derives from parameters and fitted arrays, which later code branches on or
    sizes its output by, must be what fit would derive (a forged one answers a 500 or a wrong result)."""
    import numpy as np

    if "_n_features_outs" in state and callable(getattr(estimator, "_compute_n_features_outs", None)):
        try:
            expected = estimator._compute_n_features_outs()
        except (ValueError, TypeError, IndexError, AttributeError, KeyError):
            expected = None
        if expected is None or list(state["_n_features_outs"]) != list(expected):
            raise ArtifactError(f"{where}._n_features_outs does not match categories_")
    if "_n_out_full" in state:                  # PolynomialFeatures sizes its output by these
        try:
            counts = [estimator._num_combinations(n_features=state["n_features_in_"], min_degree=low,
                                                  max_degree=state["_max_degree"],
                                                  interaction_only=estimator.interaction_only,
                                                  include_bias=estimator.include_bias)
                      for low in (state["_min_degree"], 0)]
        except (KeyError, TypeError, ValueError, OverflowError):
            counts = None
        if counts != [state.get("n_output_features_"), state["_n_out_full"]]:
            raise ArtifactError(f"{where}: its output sizes are not those of its degrees and features")
        load.bound("width", max(counts), f"{where}.n_output_features_")
    edges, bins = state.get("bin_edges_"), state.get("n_bins_")   # KBinsDiscretizer: one more edge than bins
    if isinstance(bins, np.ndarray) and isinstance(edges, np.ndarray) and \
            (bins.shape != edges.shape or [len(e) - 1 for e in edges.tolist()] != bins.tolist()):
        raise ArtifactError(f"{where}.n_bins_ must count the bins between each feature's bin_edges_")
    encoder = state.get("le_")                  # voting's members were fitted on encoded labels 0..n-1,
    if encoder is not None and isinstance(state.get("estimators_"), list):   # which hard voting bincounts
        n_classes = len(getattr(encoder, "classes_", ()))
        if not all(np.array_equal(getattr(member, "classes_", None), np.arange(n_classes))
                   for member in state["estimators_"]):
            raise ArtifactError(f"{where}: each member's classes_ must be the encoded labels 0 to {n_classes - 1}")
    constant = state.get("constant_")           # DummyRegressor sizes its answer by n_outputs_
    if "n_outputs_" in state and isinstance(constant, np.ndarray) and \
            (constant.ndim != 2 or constant.shape != (1, state["n_outputs_"])):
        raise ArtifactError(f"{where}: constant_ does not hold n_outputs_ values")
    if "_strategy" in state and state.get("_strategy") not in ("most_frequent", "prior", "stratified", "uniform",
                                                                "constant", "mean", "median", "quantile"):
        raise ArtifactError(f"{where}._strategy is not a strategy")


_PART_CHECKS = (_check_widths, _check_categories, _check_tree_estimator, _check_members, _check_histogram_predictors,
                _check_kmeans, _check_svm, _check_vectorizer, _check_neighbors, _check_derived)


# -- Export --------------------------------------------------------------------
# `python service.py export SRC DST.json`: turn a pickle or joblib artifact into a
# JSON model, and prove the copy predicts exactly like the original before writing it.


def export_json_model(estimator, path, sample=None, rows=20):
    """Write `estimator` to `path` as a JSON model once its JSON copy gives identical outputs.

    `sample` is what a predict request carries (a list of rows, or {"instances": ...}
    or {"inputs": ...}); without one, `rows` random rows of the model's width are made
    up.  Every prediction method that accepts the rows is compared bit for bit.
    Returns {"path", "bytes", "sha256", "rows", "methods"}; raises ArtifactError if the
    model cannot be written as JSON, no method can be checked, or the copy differs.
    """
    text = dump_json_model(estimator)
    copy = load_json_model(text)
    inputs, count = _check_inputs(estimator, sample, rows)
    methods = []
    for method in PREDICT_METHODS:
        if not callable(getattr(estimator, method, None)):
            continue
        try:
            expected = getattr(estimator, method)(inputs)
        except Exception:  # the original refuses these rows for this method (e.g. hard voting's proba)
            continue
        if not _same_outputs(expected, getattr(copy, method)(inputs)):
            raise ArtifactError(f"the JSON copy's {method} differs from the original's: not written")
        methods.append(method)
    if not methods:
        raise ArtifactError("no prediction method of the model accepts the check rows: "
                            "give a sample of real inputs (--check SAMPLE.json)")
    _write_json_document(text, path)
    data = text.encode("utf-8")
    return {"path": os.fspath(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": count, "methods": methods}


def _check_inputs(estimator, sample, rows):
    """(inputs, row count) to compare the original and its copy on."""
    import numpy as np

    model = LoadedModel(ArtifactRef("export", 1, "", "export", ".json", 0, 0), estimator, None, 0, 0.0)
    if sample is not None:
        try:
            instances, _ = decode_payload(sample, None)
            inputs = model_inputs(model, instances, max_rows=10**6)
        except ServiceError as error:
            raise ArtifactError(f"the sample does not fit the model: {error.message}") from None
        return inputs, len(inputs)
    if model.n_features is None:
        raise ArtifactError("the model does not say how many features it takes (a text pipeline?): "
                            "give a sample of real inputs (--check SAMPLE.json)")
    matrix = np.random.default_rng(0).normal(size=(rows, model.n_features))
    if model.make_frame is not None:
        return model.make_frame(matrix, columns=model.feature_names), rows
    return matrix, rows


def export_command(argv):
    """`model-service export SRC DST.json [--check SAMPLE.json]`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="model-service export",
        description="Write a pickle or joblib artifact as a JSON model (loaded without running code), after "
                    "checking that the JSON copy predicts exactly like the original.")
    parser.add_argument("source", metavar="SRC", help="artifact to convert (.joblib, .pkl, .pickle or .json)")
    parser.add_argument("destination", metavar="DST.json", help="JSON model to write (by write-then-rename)")
    parser.add_argument("--check", metavar="SAMPLE.json",
                        help="inputs to compare on, as a predict request body (default: 20 made-up rows)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        sample = None
        if arguments.check:
            with open(arguments.check, "rb") as handle:
                sample = parse_json(handle.read(), max_depth=64, what=arguments.check)
        estimator = _read_artifact(arguments.source)
        report = export_json_model(estimator, arguments.destination, sample)
    except (ArtifactError, ServiceError, OSError) as error:
        print(f"model-service export: error: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return 1
    print(f"wrote {report['path']} ({report['bytes']} bytes, sha256 {report['sha256']}): "
          f"{', '.join(report['methods'])} identical to the original on {report['rows']} "
          f"{'sample' if sample is not None else 'made-up'} rows")
    return 0


def _read_artifact(path):
    """Load an artifact file the way the store would, chosen by its extension."""
    extension = os.path.splitext(path)[1]
    if extension not in ARTIFACT_FORMATS:
        raise ArtifactError(f"{path}: unknown extension (use {', '.join(ARTIFACT_FORMATS)})")
    stat = os.stat(path)
    ref = ArtifactRef(os.path.basename(path), 1, os.path.abspath(path), path, extension, stat.st_size,
                      stat.st_mtime_ns)
    return load_artifact(ref)[0]


###############################################################################
# Web console #################################################################
###############################################################################
# The web console GET / serves to browsers: one self-contained page (no CDN, no build step) that
# lists the models and sends predictions through the JSON API.  What a model takes (methods,
# n_features_in_, feature_names_in_) it reads from the model's status in GET /models, the one
# place that says it; a version not loaded yet has none there, so the page first asks for its V2
# metadata, which loads it.  The table is read again after every prediction.  Everything it shows
# from the service goes through textContent (names and labels are the store's, not ours), and its
# Content-Security-Policy admits only its own script and style (by hash) and requests to this origin.
CONSOLE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>model-service</title>
<style>
 body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }
 h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
 table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd; }
 label { display: block; margin: .4rem 0 .1rem; font-weight: 600; }
 input, select, textarea { font: inherit; padding: .25rem; } textarea { width: 100%; min-height: 5rem; font-family: monospace; }
 #features { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); gap: .3rem 1rem; }
 #features input { display: block; width: 100%; box-sizing: border-box; }
 pre, code { background: #f6f6f6; } pre { padding: .8rem; overflow: auto; } code { word-break: break-all; }
 .error { color: #b00020; } .muted { color: #777; } .invalid { outline: 2px solid #b00020; background: #fff0f0; }
 button { font: inherit; padding: .35rem 1rem; margin-top: .8rem; }
</style>
</head>
<body>
<h1>model-service</h1>
<p class="muted">Models in this service, and a form to try them. <a href="/openapi.json">OpenAPI</a> · <a href="/models">/models</a></p>
<form id="auth">
 <label for="token">Token <span class="muted">(only if the service asks for one)</span></label>
 <input id="token" type="password" autocomplete="off"> <button type="submit">Use token</button>
</form>
<table id="models"><thead><tr><th>model</th><th>latest</th><th>served versions</th><th>labels</th><th>states</th></tr></thead><tbody></tbody></table>
<p id="listing" class="muted"></p>
<h2>Try a model</h2>
<form id="try">
 <label for="model">Model</label><select id="model" name="model"></select>
 <label for="version">Version</label><select id="version" name="version"></select>
 <label for="method">Method</label><select id="method" name="method"></select>
 <p id="described" class="muted"></p>
 <div id="features"></div>
 <label for="raw">Input as JSON (rows, as in {"instances": ...}; used instead of the fields when given)</label>
 <textarea id="raw" name="raw"></textarea>
 <p class="muted">Example request: <code id="example"></code></p>
 <button id="send" type="submit">Predict</button>
</form>
<h2>Result</h2>
<p id="status" class="muted">No request sent yet.</p>
<pre id="result"></pre>
<script>
"use strict";
// Everything shown from the service (names, labels, features, messages) is untrusted: it goes through
// textContent and attribute values, never markup.  What a model takes comes from its status in GET /models.
const $ = (id) => document.getElementById(id);
const NUMBER = /^[-+]?([0-9]+[.]?[0-9]*|[.][0-9]+)(e[-+]?[0-9]+)?$/i;
const MAX_FIELDS = 64;      // a wider model takes its rows as JSON only
let models = [];            // GET /models: each model with the state and metadata of its versions
let shown = null;           // the status of the version whose methods and fields the form shows
let choosing = 0;           // the latest showForm call: an earlier one's late answer is dropped

function option(select, value, text) {
  const item = document.createElement("option");
  item.value = value; item.textContent = text; select.appendChild(item);
}

function say(element, text, isError) {
  element.className = isError ? "error" : "muted"; element.textContent = text;
}

async function request(url, body) {
  const headers = {"Accept": "application/json"};
  const token = $("token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, body === undefined ? {headers} : {method: "POST", headers, body});
  let answer = null;
  try { answer = JSON.parse(await response.text()); } catch (error) { /* not the service's: the status tells */ }
  let line = (response.status + " " + response.statusText).trim();
  if (!response.ok) line += ": " + (answer && typeof answer.error === "string" ? answer.error : "not a JSON answer");
  return {ok: response.ok, status: response.status, line, answer};
}

async function call(url) {
  const result = await request(url);
  if (!result.ok) throw Object.assign(new Error(result.line), {status: result.status});
  return result.answer;
}

function showModels() {
  const rows = $("models").tBodies[0];
  rows.textContent = "";
  for (const model of models) {
    const row = rows.insertRow();
    const states = model.versions.map((v) => v.version + ": " + v.state).join(", ");
    const labels = Object.entries(model.labels).map(([l, v]) => l + " → " + v).join(", ");
    for (const text of [model.name, model.latest_version || "none", model.served_versions.join(", "), labels, states]) {
      row.insertCell().textContent = text;
    }
  }
  const before = $("model").value;
  $("model").textContent = "";
  for (const model of models) option($("model"), model.name, model.name);
  if (models.some((m) => m.name === before)) $("model").value = before;
}

async function refresh() {
  try {
    models = (await call("/models")).models;
    showModels();
    say($("listing"), models.length ? "" : "The store holds no model yet.");
    return true;
  } catch (error) {
    say($("listing"), "Cannot list the models: " + error.message, true);
    if (error.status === 401) $("token").focus();
    return false;
  }
}

function chosen() {
  const model = models.find((m) => m.name === $("model").value);
  const value = $("version").value, cut = value.indexOf("/");
  const kind = value.slice(0, cut), key = value.slice(cut + 1);       // "", "versions/N" or "labels/L"
  const number = !model ? null : kind === "versions" ? key :
                 kind === "labels" ? model.labels[key] : model.latest_version;
  return {model, version: model && model.versions.find((v) => v.version === number), kind, key};
}

function predictURL() {
  const {model, kind, key} = chosen();
  return "/models/" + encodeURIComponent(model ? model.name : "") +
         (kind ? "/" + kind + "/" + encodeURIComponent(key) : "") + "/predict";
}

function showVersions() {       // keeps the choice while it is still offered
  const {model} = chosen(), before = $("version").value;
  $("version").textContent = "";
  if (!model) return;
  option($("version"), "", "latest (" + (model.latest_version || "none") + ")");
  for (const v of model.served_versions) option($("version"), "versions/" + v, "version " + v);
  for (const [label, v] of Object.entries(model.labels)) {
    option($("version"), "labels/" + label, label + " (version " + v + ")");
  }
  $("version").value = before;
  if ($("version").selectedIndex < 0) $("version").value = "";
}

function chooseModel() {
  $("version").textContent = "";
  showVersions();
  return showForm();
}

async function showForm() {
  const ticket = ++choosing;
  showInputs(null);
  let {model, version} = chosen();
  if (!model) return;
  if (!version) return say($("described"), "No version of " + model.name + " is served.", true);
  try {
    if (!version.methods) {     // not loaded: its status has no methods yet; its V2 metadata loads it
      say($("described"), "Loading version " + version.version + " …");
      await call("/v2/models/" + encodeURIComponent(model.name) + "/versions/" + version.version);
      await refresh();
      version = chosen().version;
    }
  } catch (error) {
    if (ticket === choosing) say($("described"), "Cannot show its inputs (give them as JSON): " + error.message, true);
    return;
  }
  if (ticket === choosing && version && version.methods) showInputs(version);
}

function featureNames(info) {
  return info.feature_names_in_ || Array.from({length: info.n_features_in_ || 0}, (_, i) => "feature " + i);
}

function row(info, values) {     // Object.fromEntries: a feature named __proto__ stays a feature
  if (!info.n_features_in_) return values[0];
  return info.feature_names_in_ ? Object.fromEntries(info.feature_names_in_.map((n, i) => [n, values[i]])) : values;
}

function example(info) {
  return info ? [row(info, info.n_features_in_ ? featureNames(info).map(() => 0) : ["some text"])] : [];
}

function showInputs(info) {
  shown = info;
  $("method").textContent = ""; $("features").textContent = ""; say($("described"), "");
  $("raw").placeholder = info ? JSON.stringify(example(info)) : "";
  if (info) {
    for (const method of info.methods) option($("method"), method, method);
    if (info.methods.includes("predict")) $("method").value = "predict";
    const names = featureNames(info);
    if (names.length <= MAX_FIELDS) names.forEach(addField);
    say($("described"), !names.length ? "This model takes its rows as JSON, e.g. " + $("raw").placeholder + "." :
        names.length > MAX_FIELDS ? "This model takes " + names.length + " features: give its rows as JSON." :
        "Fill in one row of " + names.length + " features, or give rows as JSON below.");
  }
  showExample();
}

function addField(name) {
  const label = document.createElement("label"), input = document.createElement("input");
  label.textContent = name;
  input.type = "text"; input.inputMode = "decimal"; input.autocomplete = "off"; input.placeholder = "0";
  input.dataset.feature = name;
  label.appendChild(input);
  $("features").appendChild(label);
}

function showExample() {
  const body = {instances: example(shown), method: $("method").value || "predict"};
  $("example").textContent = shown ? "POST " + predictURL() + " " + JSON.stringify(body) : "";
}

function invalid(field, message) {
  field.setAttribute("aria-invalid", "true"); field.setAttribute("aria-describedby", "status");
  field.classList.add("invalid"); field.focus();
  return new Error(message);
}

function instances() {
  const raw = $("raw");
  if (raw.value.trim()) {
    try {
      return JSON.parse(raw.value);
    } catch (error) {
      throw invalid(raw, "the JSON input is not valid JSON: " + error.message);
    }
  }
  const fields = [...$("features").querySelectorAll("input")];
  if (!fields.length) throw invalid(raw, "the JSON input is empty, and this model has no fields to fill in");
  for (const field of fields) {
    const text = field.value.trim(), name = JSON.stringify(field.dataset.feature);
    if (!NUMBER.test(text)) {
      throw invalid(field, "feature " + name + (text ? " is not a number: " + JSON.stringify(text) : " is empty"));
    }
  }
  return [row(shown, fields.map((f) => Number(f.value)))];
}

async function send(event) {
  event.preventDefault();
  for (const field of document.querySelectorAll("[aria-invalid]")) {
    field.removeAttribute("aria-invalid"); field.removeAttribute("aria-describedby"); field.classList.remove("invalid");
  }
  $("result").textContent = "";
  let body;
  try {
    body = JSON.stringify({instances: instances(), method: $("method").value || "predict"});
  } catch (error) {
    return say($("status"), "Input error: " + error.message, true);
  }
  const url = predictURL();
  say($("status"), "Sending to " + url + " …");
  let result;
  try {
    result = await request(url, body);
  } catch (error) {
    result = {ok: false, line: "Request failed: " + error.message, answer: null};
  }
  const listed = await refresh();       // the prediction may have loaded, replaced or failed a version
  say($("status"), result.line, !result.ok);      // shown once the table is as the prediction left it
  $("result").textContent = result.answer === null ? "" : JSON.stringify(result.answer, null, 2);
  if (!listed) return;
  showVersions();
  const {version} = chosen();
  if (!shown || !version || version.version !== shown.version) await showForm();   // another version answers now
}

async function start(event) {
  if (event) event.preventDefault();
  if (await refresh()) await chooseModel();
}

$("auth").addEventListener("submit", start);
$("model").addEventListener("change", chooseModel);
$("version").addEventListener("change", showForm);
$("method").addEventListener("change", showExample);
$("try").addEventListener("submit", send);
start();
</script>
</body>
</html>
"""


def _content_security_policy(page):
    def digest(tag):
        text = page.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"
    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


CONSOLE_CSP = _content_security_policy(CONSOLE_HTML)


###############################################################################
# WSGI entry points ###########################################################
###############################################################################
# `waitress-serve service:app`, `gunicorn service:app`, mod_wsgi's
# `application`: the same object, configured from the environment.

app = application = create_app()

if __name__ == "__main__":
    sys.exit(main())
