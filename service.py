"""model-service: serve trained scikit-learn models over HTTP from one file.

Quick start::

    python service.py                      # serve ./model_store on 127.0.0.1:8080 (waitress)
    waitress-serve service:app             # embed: configured from MODEL_SERVICE_* variables
    gunicorn service:app                   # any WSGI host; `application` is the same object

Store layout (found automatically, both side by side)::

    model_store/<name>.<ext>                    one version, "1"
    model_store/<name>/<version>/<file>.<ext>   versions are positive integers; the highest serves

``<ext>`` is ``.joblib``, ``.pkl``/``.pickle``, ``.json`` (models as data, see
"JSON model format") or ``.skops`` (skops.io, loading only trusted types).
pickle and joblib artifacts run code when loaded: only put
artifacts you trust in the store, or load them with ``--safe-pickle`` (a restricted
unpickler, see "Restricted unpickling").

Sections (``grep -n '^# .*####' service.py``), in two parts.  Part I is the request
path in the order data flows; each of its sections uses only what is above it::

    Imports and logging     the standard library and bottle only
    Small utilities         clipping, names, strict JSON, output comparison
    Errors                  ServiceError and its statuses: the one error path
    Configuration           one table of settings: flag, variable, default, help
    Metrics                 what GET /metrics counts
    Tracing                 OpenTelemetry spans, when the OTEL_* variables ask for them
    Model store             find: artifacts and settings (model-settings.json) on disk
    Restricted unpickling   --safe-pickle: only the types a model is made of
    Artifact loaders        load: bytes to an estimator, by format
    Servables               a loaded model, its batcher and its input checks
    Agreement               how two versions' answers compare (shadow, replay)
    Model registry          hold: versions and residency; a pure plan per scan, a loader, the facade
    Request bodies          read and parse a body within its bounds; request ids
    Protocols               one block each (routes, handlers, request record, schemas): native, seed, TF
                            Serving/KServe V1, V2, MLflow
    Background work         time limits, and the payload log (with live drift) and shadow off the request path
    HTTP application        the route table, access, the predict core, the error responder
    OpenAPI                 /openapi.json from the route table
    Serving                 waitress (drained on exit) or gunicorn workers
    Replay                  ``python service.py replay``: a payload log scored again
    Drift                   ``python service.py drift`` and ``profile``: a payload log against training data
    Command line            ``python service.py``

Part II holds the appendices, which Part I reaches only through the entry points
listed here, and only at run time (tests/test_cli.py checks both rules)::

    Part II: appendices
    Native predictors       answers without scikit-learn's overhead, proved bit-identical at load:
                            attach_native
    JSON model format       models as data, and export: load_json_model, dump_json_model,
                            save_json_model, export_json_model, export_skops_model, export_command
    Web console             the page GET / serves to browsers: CONSOLE_HTML, CONSOLE_CSP
    Explanations            exact per-row contributions (TreeSHAP, linear): explain_model

    WSGI entry points       ``service:app``, and ``python service.py`` (after everything it needs)
"""

__version__ = "0.1.0"

__all__ = [
    "Config", "ServiceError", "ArtifactRef", "ModelStore", "LoadedModel",
    "ModelRegistry", "create_app", "serve", "main", "app", "application",
    "dump_json_model", "save_json_model", "load_json_model", "export_json_model", "export_skops_model",
    "JsonLimits", "to_jsonable",
]


###############################################################################
# Imports and logging #########################################################
###############################################################################
# Only the standard library and bottle here: numpy, scikit-learn, joblib and
# pandas are imported when the first model is loaded, so `import service` stays
# fast and a bad store can never break it.

import _compat_pickle
import argparse
import ast
import atexit
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import contextvars
import csv
import dataclasses
import difflib
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import importlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import pickle
import posixpath
import queue
import random
import re
import shutil
import signal
import sys
import tempfile
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
LOG_FIELDS = ("request_id", "model", "version", "trace_id")    # what a line concerns, in its JSON object when known
_log_fields = contextvars.ContextVar("service_log_fields", default={})


@contextlib.contextmanager
def _logging_about(**fields):
    """Lines logged in this block (in this thread) concern these LOG_FIELDS (e.g. the model being loaded)."""
    token = _log_fields.set({**_log_fields.get(), **fields})
    try:
        yield
    finally:
        _log_fields.reset(token)


def _utc_time(seconds, millis=False):
    """An ISO 8601 UTC time, 2026-12-05T10:00:00Z (with millis: 2026-12-05T10:00:00.123Z); None for None."""
    if seconds is None:
        return None
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return text + (f".{int(seconds % 1 * 1000):03d}Z" if millis else "Z")


class JsonLogFormatter(logging.Formatter):
    """--log-format json: one JSON object per line: time (UTC), level, logger, pid, message, then request_id,
    model and version when the line concerns them (the record's `extra`, else the _logging_about of its thread)."""

    def format(self, record):
        entry = {"time": _utc_time(record.created, millis=True),
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
# version and label may be, strict JSON out of numpy values and in from text (what
# RFC 8259 refuses is refused, nesting measured), bit-for-bit output comparison, and
# walking an estimator's parts.


def _clip(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."


def closest(word, choices):
    """The one of `choices` closest to `word` (a mistyped name: another case, a letter off), or None."""
    choices = list(choices)
    same = [choice for choice in choices if choice.lower() == word.lower()]
    found = same or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


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


def _strict_json(text):
    """json.loads as RFC 8259 reads JSON: ValueError for NaN and Infinity, for a number beyond a float, and
    for an object naming a member twice."""
    if _MAYBE_OUT_OF_RANGE.search(text):        # rare: pay for a hook on every float only then
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float, object_pairs_hook=_members)
    return json.loads(text, parse_constant=_not_json, object_pairs_hook=_members)


def _members(pairs):
    """object_pairs_hook: an object's members, each named once.  A name given twice is ambiguous (parsers
    keep the first, the last or both, so a proxy and the service could read two requests): refused."""
    members = dict(pairs)
    if len(members) != len(pairs):
        names = [name for name, _ in pairs]
        twice = next(name for number, name in enumerate(names) if name in names[:number])
        raise DuplicateMember(f"an object names the member {_clip(json.dumps(twice), 60)} twice: "
                              "name each member once")
    return members


class DuplicateMember(ValueError):
    """JSON (or a Python literal) naming one member of an object twice."""


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

    def __init__(self, message, media_type=False, looks_like_json=False, **fields):
        super().__init__(message, **fields)
        self.media_type = media_type        # refused for its Content-Type whatever the body holds: a 415
        self.looks_like_json = looks_like_json  # malformed JSON ("{" or "[" first): a typo, whatever the header


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


class Overloaded(ModelUnavailable):
    """503 at once: --max-inflight predictions are already being answered (gRPC: RESOURCE_EXHAUSTED)."""


class Misconfigured(ServiceError):
    """503 for every request of an app whose MODEL_SERVICE_* settings are invalid (`import service` still works)."""

    status, code = 503, "misconfigured"


class ModelFault(ServiceError):
    """500: the model failed on a request through a fault of its artifact, not of the request (see
    `LoadedModel.model_fault`): never fitted, or pickled by a scikit-learn that gave it other attributes.
    The answer names the fault and the error_id under which its traceback was logged."""

    code = "model_fault"


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


def _count_of_threads(text):
    """A positive number of threads or processes, at most 1024: starting more than a system allows aborts
    the process (10**20 threads ended in "libgcc_s.so.1 must be installed for pthread_exit to work")."""
    value = _integer(text)
    if not 1 <= value <= 1024:
        raise ValueError(f"must be a whole number from 1 to 1024, not {_clip(repr(text), 40)}")
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
    Setting("threads", _count_of_threads, 4, "worker threads (waitress; per process under --workers)", "N"),
    Setting("workers", _count_of_threads, 1,
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
    Setting("connection_timeout", _positive_int, 30,
            "seconds a connection may send nothing, within a request or between requests, before it is closed "
            "(waitress)", "SECONDS"),
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
            "longest a batch waits for company after its first request (it closes sooner when full or when every "
            "request in flight has joined)", "MS"),
    Setting("payload_log", str, None,
            "folder of the payload log: one JSON line per sampled prediction request (inputs, outputs, status, "
            "latency), written off the request path (default: off)",
            "DIR"),
    Setting("payload_log_sample", _fraction, 1.0, "share of prediction requests the payload log records, 0-1",
            "FRACTION"),
    Setting("grpc_port", _port, None,
            "also serve the Open Inference Protocol (V2) over gRPC on this port, bound to --host like HTTP (off "
            "by default; needs the grpc extra: pip install '.[grpc]')", "PORT"),
    Setting("native", _boolean, True,
            "answer with predictors compiled at load, without scikit-learn's overhead, each proved bit-identical "
            "to scikit-learn on probe rows (other methods and inputs: scikit-learn); a model's settings may turn "
            "them off", "yes|no", const="yes"),
    Setting("sklearn_threads", _non_negative_int, 1,
            "OpenMP and BLAS threads one scikit-learn call may start (histogram boosting, matrix products), in "
            "each server thread: calls in --threads x --workers threads then share the cores instead of fighting "
            "over them (0: the libraries' own default, every core per call)", "N"),
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


_warned_variables = set()       # stray variables this process has warned about: once is enough


def warn_of_stray_variables(environ):
    """Warn, once per process, of each MODEL_SERVICE_* variable that no setting reads, naming the closest
    setting's: a typo (MODEL_SERVICE_PROT) would otherwise be ignored without a word.  `python service.py` calls
    it at start; an embedded app at its first request (by then, a no-op after the first)."""
    known = [setting.env for setting in SETTINGS]
    options = [name[len(ENV_PREFIX):] for name in known]        # compared without the prefix all of them share
    for name in sorted(variable for variable in environ if variable.startswith(ENV_PREFIX) and variable not in known
                       and variable not in _warned_variables):
        _warned_variables.add(name)
        near = closest(name[len(ENV_PREFIX):], options)
        logger.warning("environment variable %s is no setting of the service and is ignored%s", name,
                       f"; did you mean {ENV_PREFIX}{near}?" if near else
                       f" (settings are {ENV_PREFIX}<OPTION>: see --help)")


# Everything the service can be told: a frozen dataclass with one field per row of SETTINGS.
Config = dataclasses.make_dataclass(
    "Config", [(s.field, type(s.default), dataclasses.field(default=s.default, repr=not s.secret)) for s in SETTINGS],
    frozen=True, namespace={"load": classmethod(_load_config), "__module__": __name__,
                            "__doc__": "Everything the service can be told; built by `Config.load` or `create_app`."})


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

#: The metrics' names, each written once: the table below and every count use these.
REQUESTS_TOTAL = "model_service_requests_total"
REQUEST_DURATION_SECONDS = "model_service_request_duration_seconds"
MODEL_LOADS_TOTAL = "model_service_model_loads_total"
MODEL_LOAD_DURATION_SECONDS = "model_service_model_load_duration_seconds"
BATCH_SIZE = "model_service_batch_size"
PAYLOAD_LOG_RECORDS_TOTAL = "model_service_payload_log_records_total"
PAYLOAD_LOG_DROPPED_TOTAL = "model_service_payload_log_dropped_total"
PREDICT_CALLS_TOTAL = "model_service_predict_calls_total"
SHADOW_COMPARED_TOTAL = "model_service_shadow_compared_total"
SHADOW_IDENTICAL_TOTAL = "model_service_shadow_identical_total"
SHADOW_ABS_DIFFERENCE_TOTAL = "model_service_shadow_abs_difference_total"
SHADOW_NUMERIC_VALUES_TOTAL = "model_service_shadow_numeric_values_total"
SHADOW_ERRORS_TOTAL = "model_service_shadow_errors_total"
SHADOW_DROPPED_TOTAL = "model_service_shadow_dropped_total"
MODELS_LOADED = "model_service_models_loaded"
REQUESTS_IN_FLIGHT = "model_service_requests_in_flight"
LABEL_VERSION = "model_service_label_version"
DRIFT_P_VALUE = "model_service_drift_p_value"
DRIFT_PSI = "model_service_drift_psi"
DRIFT_ROWS_SCORED = "model_service_drift_window_rows"

METRICS = {   # name: (type, help, label names, histogram buckets or a gauge's multiprocess mode)
    REQUESTS_TOTAL: ("counter", "Prediction requests by model, version, method, protocol and status.",
                     MODEL_VERSION + ("method", "protocol", "status"), None),
    REQUEST_DURATION_SECONDS: ("histogram", "Time to answer a prediction request.",
                               ("model", "method"), LATENCY_BUCKETS),
    MODEL_LOADS_TOTAL: ("counter", "Model version loads by outcome (success, failure).",
                        MODEL_VERSION + ("outcome",), None),
    MODEL_LOAD_DURATION_SECONDS: ("histogram", "Time to load a model version.", MODEL_VERSION,
                                  LOAD_BUCKETS),
    BATCH_SIZE: ("histogram", "Requests stacked into one predict call.", ("model",), BATCH_BUCKETS),
    PAYLOAD_LOG_RECORDS_TOTAL: ("counter", "Prediction requests written to the payload log.", (),
                                None),
    PAYLOAD_LOG_DROPPED_TOTAL: ("counter", "Payload log records dropped: its queue was full or "
                                "a write failed.", (), None),
    PREDICT_CALLS_TOTAL: ("counter", "Predict calls (a stacked batch is one) by model, version, "
                          "method and the predictor that answered (native, scikit-learn).",
                          MODEL_VERSION + ("method", "predictor"), None),
    SHADOW_COMPARED_TOTAL: ("counter", "Requests compared with the model's shadow version, by "
                            "model and shadow version.", MODEL_VERSION, None),
    SHADOW_IDENTICAL_TOTAL: ("counter", "Requests whose shadow predictions were identical.",
                             MODEL_VERSION, None),
    SHADOW_ABS_DIFFERENCE_TOTAL: ("counter", "Sum of the absolute differences of numeric shadow "
                                  "outputs (divide by numeric_values_total for the mean).",
                                  MODEL_VERSION, None),
    SHADOW_NUMERIC_VALUES_TOTAL: ("counter", "Numeric output values compared with the shadow's "
                                  "(in requests that were not identical).", MODEL_VERSION, None),
    SHADOW_ERRORS_TOTAL: ("counter", "Requests the shadow version failed on.", MODEL_VERSION, None),
    SHADOW_DROPPED_TOTAL: ("counter", "Requests not shadowed: the shadow queue was full.",
                           MODEL_VERSION, None),
    MODELS_LOADED: ("gauge", "Model versions in memory.", (), None),
    REQUESTS_IN_FLIGHT: ("gauge", "Prediction requests being answered now.", (), None),
    # read at scrape time like the two above; several processes: the largest (every worker shares the fact)
    LABEL_VERSION: ("gauge", "1 for each label of a model and the version it answers with now.",
                    ("model", "label", "version"), "livemax"),
    # set by the live drift (see "Background work"); the last field: how a scrape of --workers combines them
    DRIFT_P_VALUE: ("gauge", "p-value of the KS (numbers) or chi-squared (categories) test of a "
                    "feature's newest served values against the model's reference profile "
                    "(several processes: the lowest).", ("model", "feature"), "livemin"),
    DRIFT_PSI: ("gauge", "Population stability index of a feature's newest served values against "
                "the model's reference profile (several processes: the highest).",
                ("model", "feature"), "livemax"),
    DRIFT_ROWS_SCORED: ("gauge", "Served rows the drift gauges were scored on (several processes: "
                        "their sum).", ("model",), "livesum"),
}
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"     # prometheus_client's: where processes share their counts


class Metrics:
    """The service's metrics: prometheus_client families, and the labelled child of each series cached by
    its (name, label pairs), so a count costs one dict lookup before prometheus_client's own increment
    (its labels() lookup costs several µs).  The cache stays bounded because label values do: they are
    only models, versions and methods that exist (UNRESOLVED for the rest) and forget() drops a version's.

    The gauges named in `gauges` ({name: () -> value, or {label values: value} for a gauge with labels})
    are read at scrape time in one process; the others (the live drift's) are `set` by their owner in
    every mode.  Shared between processes, a scrape can only read files, so each process writes its own
    read-at-scrape gauges whenever they change (`changed`, called by the registry's Residency and by a
    scan that moved a label) and the scrape combines the live processes' by each gauge's multiprocess
    mode (METRICS' last field; "livesum" by default: versions in memory over the workers, i.e. copies of
    models, and requests being answered by any of them; a dead worker's are removed by
    mark_process_dead).  A label's version is a fact every worker shares: the scrape takes the largest
    ("livemax"), and a series that stops being true is written as 0.
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

    def set(self, name, labels, value):
        child = self._children.get((name, labels))
        (child if child is not None else self._child(name, labels)).set(value)

    def drop(self, names, model):
        """Drop one model's series of the families `names` (one process; shared, the files keep them until the
        process exits)."""
        with self._lock:
            for key in [key for key in self._children if key[0] in names and ("model", model) in key[1]]:
                del self._children[key]
                if not self._shared:
                    self._families[key[0]].remove(*(value for _, value in key[1]))

    def changed(self):
        """Models in memory, requests in flight or labels changed: shared, this process writes the gauges that did
        (each write is a file update; called under the Residency's lock, so in order).

        (A worker forked with models already in memory writes them when it starts: Residency.announce.)"""
        if not self._shared and (self._families is not None or not os.environ.get(MULTIPROCESS_DIR)):
            return                  # one process: read at scrape time
        families = self._ready()
        if self._shared:
            if self._written[0] != os.getpid():     # forked: this process's file has none of them yet
                self._written = (os.getpid(), {})
            for name in self._gauges:
                value = self._gauges[name]()
                written = self._written[1].get(name)
                if written == value:
                    continue
                self._written[1][name] = value
                if not isinstance(value, dict):
                    families[name].set(value)
                    continue
                for labels in {**(written or {}), **value}:
                    families[name].labels(*labels).set(value.get(labels, 0))

    def forget(self, model, version):
        """Drop every series of one model version (its number).  Shared, the files keep its counts
        (prometheus_client cannot remove them there), so a scrape leaves them out until the version is
        counted again."""
        version = str(version)
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
        for name, (kind, help_text, label_names, last) in METRICS.items():
            if name in self._gauges and not self._shared:
                continue                         # read at scrape time (_ScrapeGauges)
            options = {"buckets": last} if kind == "histogram" else \
                {"multiprocess_mode": last or "livesum"} if kind == "gauge" else {}
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
        families = []
        for name, read in self.gauges.items():
            value, (_, help_text, label_names, _) = read(), METRICS[name]
            if not isinstance(value, dict):
                families.append(self.family(name, help_text, value=value))
                continue
            family = self.family(name, help_text, labels=label_names)
            for labels, number in sorted(value.items()):
                family.add_metric(labels, number)
            families.append(family)
        return families


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
# Tracing #####################################################################
###############################################################################
# OpenTelemetry traces (the [otel] extra: opentelemetry-sdk and its OTLP/HTTP exporter), off unless the
# standard OTEL_* variables ask for them, and imported only then.  One server span per request (W3C
# traceparent/tracestate taken from the caller), child spans for what the request spends its time on, the
# trace id in the JSON log lines and a traceparent answer header.  Off, every call here costs one attribute
# test and returns a shared empty context manager.

TRACE_EXPORTERS = ("otlp", "console")
_NO_SPAN = contextlib.nullcontext()


def trace_exporter_wanted(environ):
    """The exporter the OTEL_* variables ask for ("otlp" or "console"), or None: traces are on when
    OTEL_TRACES_EXPORTER names one of TRACE_EXPORTERS, or is unset while an OTLP endpoint is; never when
    OTEL_SDK_DISABLED is true or OTEL_TRACES_EXPORTER is "none".  ValueError for an exporter not supported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return "otlp" if endpoint else None
    if named == "none":
        return None
    if named not in TRACE_EXPORTERS:
        raise ValueError(f"OTEL_TRACES_EXPORTER={named!r}: this service exports traces with "
                         f"{' or '.join(TRACE_EXPORTERS)} (OTLP over HTTP), or none")
    return named


def _otel_sdk_missing():
    """Why traces cannot be exported here, or None when the [otel] extra is installed."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        return (f"OTEL_* variables ask for traces, but the OpenTelemetry SDK is not installed ({error.name}): "
                "pip install '.[otel]'")
    return None


class Tracing:
    """The service's traces: a tracer provider of its own (not the process's global one: an embedding host
    keeps its own), made in the process that serves at its first span, as a pre-fork host forks after
    building the app; its batch processor exports off the request path and flushes at exit.

    `exporter` is "otlp", "console" or, for tests, a SpanExporter (exported one span at a time); None: off.
    """

    def __init__(self, exporter=None, problem=None):
        self.exporter, self.enabled = exporter, exporter is not None
        self.problem = problem          # why the OTEL_* variables could not be followed (the app logs it once)
        self._tracer, self._pid, self._lock = None, None, threading.Lock()

    @classmethod
    def from_environment(cls, environ=None):
        """Tracing as the OTEL_* variables configure it (nothing is imported yet); off, with the `problem`,
        when they cannot be followed."""
        environ = os.environ if environ is None else environ
        try:
            return cls(trace_exporter_wanted(environ))
        except ValueError as error:
            return cls(problem=str(error))

    def tracer(self):
        """This process's tracer, made at its first span; None, and tracing off, when the SDK is missing."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    missing = _otel_sdk_missing() if isinstance(self.exporter, str) else None
                    if missing:
                        logger.error("traces are off: %s", missing)
                        self.enabled = False
                    self._tracer, self._pid = None if missing else self._make_tracer(), os.getpid()
        return self._tracer

    def _make_tracer(self):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        resource = Resource.create()
        if resource.attributes.get("service.name", "").startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)       # its sampler: OTEL_TRACES_SAMPLER(_ARG)
        if self.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))   # OTEL_EXPORTER_OTLP_*
        elif self.exporter == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        return provider.get_tracer(SERVICE_NAME, __version__)

    def request(self, name, headers, **attributes):
        """The server span of one request (a `with` block), child of the caller's `traceparent` and `tracestate`
        (`headers`: a mapping of lower-case names, as W3C's propagator reads them); the shared empty context
        when off."""
        tracer = self.tracer() if self.enabled else None
        if tracer is None:
            return _NO_SPAN
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(headers)
        return tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes,
                                            record_exception=False, set_status_on_exception=False)

    def span(self, name, **attributes):
        """A child span of the current one, as a `with` block (the shared empty context when off)."""
        tracer = self.tracer() if self.enabled else None
        return _NO_SPAN if tracer is None else tracer.start_as_current_span(name, attributes=attributes)


TRACING_OFF = Tracing()


def traceparent(span):
    """The W3C traceparent header of `span` ("00-<trace id>-<span id>-<flags>"), or None for no span."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


###############################################################################
# Model store #################################################################
###############################################################################
# Finds artifacts on disk.  It knows nothing of loading or HTTP: a scan returns
# the catalogue {name: {version: ArtifactRef}} and logs what it skipped.

SETTINGS_FILE = "model-settings.json"
PROFILE_FILE = "reference-profile.json"                          # beside the settings: see "Drift"
SHA256SUMS_FILE = "SHA256SUMS"                                    # at the store root, as `sha256sum` writes it
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_SHA256SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")      # "<hex>  <path>", or "<hex> *<path>" (binary)
# An artifact's format comes from its file's extension, decided by the operator who put it in the
# store, never from a request or from the artifact's own contents.
ARTIFACT_FORMATS = {".joblib": "joblib", ".pkl": "pickle", ".pickle": "pickle", ".json": "json", ".skops": "skops"}
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
            try:
                if entry.name == SHA256SUMS_FILE and not _is_dir(entry):
                    sums = self._read_sums(entry)
                else:
                    self._add_model(entry, found)
            except Exception as error:  # whatever is wrong with one entry skips it, never the rest of the scan
                self._warn("skipping %r: it cannot be scanned: %s: %s", entry.name, type(error).__name__,
                           _clip(str(error), 200))
        self.settings_files = {name: ref for name, ref in self.settings_files.items() if found.get(name)}
        self.sha256sums = sums
        return {name: versions for name, versions in found.items() if versions}

    def _add_model(self, entry, found):
        """Add the model of one entry of the store's root (a flat artifact or a folder of versions) to
        `found`; a name found twice is no model (None)."""
        if self._skipped(entry.name, entry.name):
            return
        if _is_dir(entry):
            name = entry.name
            versions = self._scan_versions(entry)
        else:
            name, extension = os.path.splitext(entry.name)
            ref = self._artifact(name, 1, entry, extension)
            versions = {1: ref} if ref else {}
        if not versions:
            return
        if not valid_model_name(name):
            self._warn("skipping %s: %r is not a valid model name", entry.name, name)
        elif name in found:
            self._warn("skipping model %r: more than one artifact or folder has that name", name)
            found[name] = None
        else:
            found[name] = versions

    def _read_sums(self, entry):
        """{relative path: sha256 hex} from SHA256SUMS; lines not as `sha256sum` writes them are warned about."""
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
            if entry.name == PROFILE_FILE and not _is_dir(entry):
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
         "warmup": [[5.1, 3.5, 1.4, 0.2]],      rows (lists, records or texts) every method runs once at load
         "explain": {"reference": [5.8, 3.0, 4.4, 1.3]}}   the row (or record) a linear model's
                                                explanations are measured from (see "Explanations")

    Every key is optional ("latest": only the highest version serves).  A label keeps the
    version it names in service while that version is on disk, even where the version policy
    alone would drop it (see `kept_by_labels`).  Unknown keys are refused, so a typo never
    passes silently.
    A traffic split names defined labels or served versions with weights >= 0, not all
    zero: a split that cannot be honoured refuses the file rather than route elsewhere.
    The shadow, like a traffic target, names a defined label or a served version.
    """

    MAX_BYTES = 64 * 1024
    MAX_DEPTH = 16
    KEYS = ("version_policy", "labels", "safe_pickle", "sha256", "batching", "traffic", "redact", "shadow",
            "native", "warmup", "explain")
    MAX_WARMUP_ROWS = 100

    def __init__(self, policy="latest", count=1, versions=(), labels=None, safe_pickle=False, sha256=None,
                 batching=None, native=True):
        self.batching = batching                # None: the flags decide; False: never; (size, latency_ms)
        self.traffic = {}                       # {label (str) or version (int): weight}
        self.redact = frozenset()               # feature names kept out of the payload log
        self.shadow = None                      # label (str) or version (int) shadowing every request
        self.native = native                    # False: no native predictor, whatever --native says
        self.warmup = None                      # rows to warm a loaded version on; None: derived (see _warm)
        self.explain_reference = None           # the row linear explanations are measured from; None: see Explainer
        self.policy, self.count, self.versions = policy, count, tuple(versions)
        self.labels = dict(labels or {})
        self.safe_pickle = safe_pickle
        self.sha256 = dict(sha256 or {})       # {version: lower-case hex digest}

    @classmethod
    def read(cls, ref, numbers):
        """The settings in the file behind `ref`, checked against the versions `numbers` on disk; whatever
        the file holds, either settings or a ValueError saying what is wrong with it.

        A settings file is written by whoever can write the store, and one bad file must cost its own
        model its new settings, never the scan of the store or the server.  So beyond the refusals that
        say what to fix, anything else the content provokes (a number too large for arithmetic, memory)
        is that file's refusal too, named by its kind.
        """
        try:
            settings = cls.parse(cls._document(ref))
            settings.check_served(numbers)
            return settings
        except ValueError as error:         # (shown in the status and the log: a few lines at most)
            raise ValueError(_clip(str(error), 500)) from None
        except Exception as error:  # whatever the file provoked: its refusal, never the scan's failure
            raise ValueError(f"it cannot be used: {type(error).__name__}: {_clip(str(error), 200)}") from None

    @classmethod
    def _document(cls, ref):
        """The file's JSON value, read as request bodies are (strict RFC 8259, each member named once),
        within MAX_BYTES and MAX_DEPTH."""
        try:
            with open(ref.path, "rb") as handle:
                data = handle.read(cls.MAX_BYTES + 1)
        except OSError as error:
            raise ValueError(f"cannot read it: {error.strerror}") from None
        if len(data) > cls.MAX_BYTES:
            raise ValueError(f"it is larger than {cls.MAX_BYTES} bytes")
        try:
            document = _strict_json(data.decode("utf-8-sig"))
        except RecursionError:
            raise ValueError(f"not valid JSON: nested deeper than {cls.MAX_DEPTH} levels") from None
        except ValueError as error:         # not UTF-8, not JSON, NaN, a number beyond a float, a member twice
            raise ValueError(f"not valid JSON: {_clip(str(error), 200)}") from None
        if _nested_deeper_than(cls.MAX_DEPTH, data):
            raise ValueError(f"not valid JSON: nested deeper than {cls.MAX_DEPTH} levels")
        return document

    @classmethod
    def parse(cls, document):
        if not isinstance(document, dict):
            raise ValueError("it must hold a JSON object")
        unknown = sorted(set(document) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {_clip(', '.join(map(repr, unknown)), 200)}; "
                             f"known: {', '.join(cls.KEYS)}")
        settings = cls(**cls._policy(document.get("version_policy", "latest")))
        labels = document.get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError('"labels" must map label names to versions')
        for label, version in labels.items():
            if not LABEL.fullmatch(label):
                raise ValueError(f"invalid label {_clip(repr(label), 80)}: labels match ^{LABEL.pattern}$")
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
        settings.explain_reference = cls._explain_reference(document.get("explain"))
        return settings

    @staticmethod
    def _explain_reference(explain):
        """The "explain" object's reference row: a list of values or a record by feature name, as a request sends."""
        if explain is None:
            return None
        if not isinstance(explain, dict) or set(explain) != {"reference"} or \
                not isinstance(explain["reference"], (list, dict)) or not explain["reference"]:
            raise ValueError('"explain" must be {"reference": row}, the row (or record) linear explanations are '
                             'measured from, e.g. {"reference": [5.8, 3.0, 4.4, 1.3]}')
        return explain["reference"]

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
            if type(weight) not in (int, float) or not 0 <= weight <= sys.float_info.max:
                raise ValueError(f'"traffic": the weight of {target!r} must be a number >= 0 (at most '
                                 f'{sys.float_info.max:.4g}), not {_clip(repr(weight), 40)}')
            split[target] = weight
        if split and not any(weight > 0 for weight in split.values()):
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
        """Refuse a traffic split or shadow naming a version not served among `numbers` (those on disk)."""
        served = self.served(numbers)
        shadow = {} if self.shadow is None else {self.shadow: '"shadow"'}
        for target, where in {**{target: '"traffic"' for target in self.traffic}, **shadow}.items():
            number = self.labels[target] if isinstance(target, str) else target
            if number not in served:
                what = f"label {target!r} names version {number}" if isinstance(target, str) else f"version {number}"
                raise ValueError(f'{where}: {what}, which is not served (the version policy and labels serve '
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
        """A version number, as the store's folders spell them (VERSION: at most 18 digits)."""
        if type(value) is int and 1 <= value < 10 ** 18:
            return value
        if isinstance(value, str) and VERSION.fullmatch(value):
            return int(value)
        raise ValueError(f"{where}: {_clip(repr(value), 80)} is not a version (a positive integer)")

    def select(self, numbers):
        """The versions the version policy selects among `numbers` (the versions on disk), highest first."""
        numbers = sorted(numbers, reverse=True)
        if self.policy == "all":
            return tuple(numbers)
        if self.policy == "latest":
            return tuple(numbers[:self.count])
        return tuple(n for n in numbers if n in self.versions)

    def kept_by_labels(self, numbers):
        """{version: [its labels]} of the versions on disk (`numbers`) that the policy does not select but a label
        names: they stay in service.

        A label is a promise to the clients that use it: publishing version 3 under "latest" must
        not take away the version 1 that `stable` names (TF Serving's labels, likewise, name only
        versions it serves).  Moving or removing the label is what lets such a version go.
        """
        selected = self.select(numbers)
        kept = {}
        for label, number in sorted(self.labels.items()):
            if number in numbers and number not in selected:
                kept.setdefault(number, []).append(label)
        return kept

    def served(self, numbers):
        """The versions served among `numbers` (those on disk), highest first: the policy's, and those labels keep."""
        return tuple(sorted({*self.select(numbers), *self.kept_by_labels(numbers)}, reverse=True))

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
                "native": self.native, "warmup": self.warmup,
                "explain": None if self.explain_reference is None else {"reference": self.explain_reference}}


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


def _admits_by_name(allowlist, path):
    """Whether `allowlist` admits what the dotted `path` a file names resolves to; nothing is imported from a
    module the allow-list does not import from (importing runs a module's code)."""
    module, _, name = path.rpartition(".")
    if not (PYTHON_MODULE.fullmatch(module) and PYTHON_MODULE.fullmatch(name)) or "__" in path \
            or not allowlist.importable(module):
        return False
    return allowlist.admits(_lookup(path))


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
    if options.safe_pickle:
        return _RestrictedUnpickler(io.BytesIO(data), options.trust).load()
    return pickle.loads(data)


def _load_joblib(data, options):
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


def _load_skops(data, options):
    """A .skops file (skops.io): a zip of a JSON schema and arrays that skops rebuilds, creating only the types
    it is told to trust.  Trusted: what skops trusts by default, what --safe-pickle's allow-list admits
    (scikit-learn's estimators and internal types such as its trees, numpy, scipy.sparse) and --trust modules.
    Anything else refuses the load, naming each type, before any object is made."""
    try:
        import skops.io
    except ImportError:
        raise ArtifactError("the skops package is not installed: pip install '.[skops]' (the skops extra) to "
                            "load .skops artifacts") from None
    untrusted = skops.io.get_untrusted_types(data=data)
    allowlist = _Allowlist(options.trust)
    refused = [name for name in untrusted if not _admits_by_name(allowlist, name)]
    if refused:
        module = refused[0].rpartition(".")[0]
        why = "neither skops nor --safe-pickle's allow-list trusts " + ("it" if len(refused) == 1 else
                                                                         "them: " + ", ".join(refused))
        raise ArtifactError(_refusal(_clip(", ".join(refused), 200), why, module))
    return skops.io.loads(data, trusted=untrusted)


ARTIFACT_LOADERS = {"joblib": _load_joblib, "pickle": _load_pickle, "json": _load_json,    # by ArtifactRef.format
                    "skops": _load_skops}

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
    _refuse_unfitted(estimator, ref)
    return estimator, digest, len(data), skew


def _refuse_unfitted(estimator, ref):
    """Refuse a scikit-learn model that was never fitted, by scikit-learn's own check_is_fitted.

    Loaded, it would fail every request with NotFittedError: a fault of the artifact that no
    client can fix, so it is the load that fails, saying why.  The check runs on the model and
    on the parts fitted in place or kept fitted (a pipeline's steps, a union's transformers, a
    column transformer's fitted transformers_); a meta-estimator's check covers its fitted
    copies.  Only scikit-learn's own classes are checked: a class of one's own may keep its
    fitted state in attributes check_is_fitted cannot know.
    """
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    for part in _fitted_parts(estimator):
        if type(part).__module__.partition(".")[0] != "sklearn":
            continue
        try:
            check_is_fitted(part)
        except NotFittedError as error:
            raise ArtifactError(f"{ref.file} holds a model that was never fitted: {_clip(str(error), 200)} "
                                "(fit it, then save it again)") from None
        except Exception:  # TypeError: not an estimator instance; tags that fail: nothing to say about fitting
            continue


def _fitted_parts(estimator):
    """`estimator`, then the estimators that must be fitted for it to answer: a pipeline's steps, a union's
    transformers and a fitted column transformer's, recursively (strings such as "passthrough" skipped)."""
    yield estimator
    members = getattr(estimator, "__dict__", {})
    steps = members.get("steps") or members.get("transformer_list") or members.get("transformers_") or ()
    for step in steps:
        part = step[1] if isinstance(step, tuple) and len(step) >= 2 else None
        if part is not None and not isinstance(part, str):
            yield from _fitted_parts(part)


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
        self.version = ref.version
        self.labels = (("model", ref.name), ("version", str(ref.version)))     # its metrics' labels
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
        #: input columns that hold text categories (an encoder fitted on text takes them): Python objects; the
        #: others are numbers
        self.text_columns = _text_columns(estimator) if self.n_features is not None else frozenset()
        #: rows -> the DataFrame scikit-learn is given, for a model fitted on named columns; None: it takes the rows
        self.make_frame = _frame_maker(self.feature_names, self.text_columns) if names is not None else None
        self.inflight = 0               # requests using it now (under the registry's Residency lock)
        self.last_used = 0.0            # registry clock at the last request, for LRU and idle unloads
        self.retired = False            # out of service; freed when its last request ends
        self.batcher = None             # a Batcher when concurrent requests are stacked (tabular models only)
        self.checked_call = _finite_checked_call(estimator) if self.n_features is not None else None
        self.metrics = None             # the registry's Metrics, which count calls by predictor
        self.tracing = TRACING_OFF      # the registry's Tracing: a span per call, saying which predictor answered
        self.native = None              # a NativePredictor: the methods proved at load to answer as scikit-learn
        self.predictors = {}            # method -> (NATIVE or SKLEARN, why), for the status
        self.warmup = "not warmed"      # what warming did, for the load's log line (see _warm)
        self.sklearn_threads = 0        # OpenMP and BLAS threads a scikit-learn call may start (0: unbounded)

    def predict(self, method, inputs):
        """Answer one method for a request: through the batcher when the model has one, else `call`."""
        if self.batcher is not None:
            return self.batcher.join(method, inputs)
        return self.call(method, inputs)

    def call(self, method, inputs):
        """Call one method now: natively where it is proved and takes these inputs, else through scikit-learn."""
        native = self.native.methods.get(method) if self.native is not None else None
        prepared = None if native is None else self.native.prepare(inputs)
        predictor = SKLEARN if prepared is None else NATIVE
        with self.tracing.span("predict", method=method, predictor=predictor) if self.tracing.enabled else _NO_SPAN:
            outputs = self._sklearn_call(method, inputs) if prepared is None else native(prepared)
        if self.metrics is not None:
            self.metrics.count(PREDICT_CALLS_TOTAL,
                               self.labels + (("method", method), ("predictor", predictor)))
        return outputs

    def sklearn_inputs(self, inputs):
        """What scikit-learn is given for `inputs` (rows in feature order, as model_inputs makes them): a DataFrame
        for a model fitted on named columns (make_frame), else the rows themselves, as Python objects if the model
        has text columns (numbers sent alone included: a text column's null is then a missing category)."""
        if not hasattr(inputs, "dtype"):
            return inputs
        if self.make_frame is not None:
            return self.make_frame(inputs)
        return inputs.astype(object) if self.text_columns and inputs.dtype != object else inputs

    def _sklearn_call(self, method, inputs):
        """The estimator's own answer; its complaints about the input are the caller's 400, its own faults
        (see `model_fault`) the server's 500."""
        _bound_threads(self.sklearn_threads)
        try:
            if self.checked_call is not None:
                return self.checked_call(getattr(self.estimator, method), self.sklearn_inputs(inputs))
            return getattr(self.estimator, method)(self.sklearn_inputs(inputs))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            fault = self.model_fault(method, error)
            if fault is not None:
                raise fault from error
            # e.g. a text pipeline given numbers: 'int' object has no attribute 'lower'
            raise BadRequest(f"{method} failed: {self._unconverted_cell(inputs, error)}{_clip(str(error))}",
                             model=self.name) from None

    def feature_label(self, position):
        """How a message names the feature at `position`: its name when the model knows it, else its index."""
        names = self.feature_names
        return repr(names[position]) if names and position < len(names) else str(position)

    def _unconverted_cell(self, inputs, error):
        """"instance 0, feature 'sepal_width': " when `error` is numpy's "could not convert string to float:
        'big'" (a model taking only numbers, given text), naming where that text was; else ""."""
        prefix = "could not convert string to float: "
        text = str(error)
        values = inputs.to_numpy() if hasattr(inputs, "to_numpy") else inputs
        if not text.startswith(prefix) or getattr(values, "ndim", 0) != 2:
            return ""
        quoted = text[len(prefix):]
        for number, row in enumerate(values.tolist()):
            for position, value in enumerate(row):
                if isinstance(value, str) and repr(value) == quoted:
                    return f"instance {number}, feature {self.feature_label(position)}: "
        return ""

    def artifact_fault(self, error):
        """Whether `error`, raised by one of the estimator's methods, is the artifact's fault, not the input's.

        The artifact's faults: NotFittedError (a part never fitted), and an AttributeError raised on
        the estimator or one of its parts (AttributeError.obj), as a pickle from another scikit-learn
        lacking an attribute its methods now read ('LogisticRegression' object has no attribute
        'multi_class').  An AttributeError on anything else is the input's: numbers sent to a text
        model ('int' object has no attribute 'lower').
        """
        from sklearn.exceptions import NotFittedError

        if isinstance(error, NotFittedError):
            return True
        culprit = getattr(error, "obj", None) if isinstance(error, AttributeError) else None
        return culprit is not None and any(part is culprit for part in _estimator_parts(self.estimator, [], set()))

    def model_fault(self, method, error):
        """A ModelFault, logged with its traceback, when `error` is the artifact's fault (`artifact_fault`);
        else None."""
        if not self.artifact_fault(error):
            return None
        error_id = os.urandom(6).hex()
        logger.error("model %r version %s: %s failed on a fault of its artifact, not of the request (error_id %s)",
                     self.name, self.version, method, error_id, exc_info=(type(error), error, error.__traceback__),
                     extra={"model": self.name, "version": self.version})
        skew = f"; it was {self.version_skew}" if self.version_skew else ""
        return ModelFault(f"model {self.name!r} version {self.version} cannot answer {method}: its artifact is at "
                          f"fault, not the request: {type(error).__name__}: {_clip(str(error))}{skew}",
                          error_id=error_id, model=self.name, version=str(self.version))

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
    and waits for others only while requests of this model that have not joined are in flight
    (alone, it runs at once): the batch closes when it is full, when every request in flight has
    joined it, or `max_latency` after its first request.  One stacked
    call per model runs at a time, and the next batch gathers meanwhile: two at once would only
    take turns on the GIL.  (Waiting on while requests kept coming let a batch wait max_size ×
    max_latency, which became the tail once native predictors made calls cheap: p99 155 ms at
    c=32; waiting for a full batch when fewer requests were in flight made every batch at c=8
    wait max_latency, 8 requests per 5 ms.)  Rows are stacked in order and each request gets its
    own slice back.
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
        """This request's slice of the stacked call it joins (or leads); traced, in a "batch" span (its wait and
        the stacked call) that says how many requests the call served."""
        if not self.model.tracing.enabled:
            return self._join(method, _Pending(inputs))
        with self.model.tracing.span("batch", method=method) as span:
            mine = _Pending(inputs)
            try:
                return self._join(method, mine)
            finally:
                span.set_attribute("batch_size", mine.batch_size)

    def _join(self, method, mine):
        with self._lock:
            queue = self._waiting.setdefault(method, [])
            queue.append(mine)
            mine.leads = len(queue) == 1
            self._close_if_complete(queue)
        if not mine.leads:
            mine.done.wait()                 # until answered, or made the leader of what waits behind
            if not mine.leads:
                return mine.answer()
        mine.full.wait(self.max_latency)     # for those who may join, max_latency at most
        with self._turn:                     # while a stacked call runs, the next batch gathers
            with self._lock:
                queue = self._waiting[method]
                batch, rest = queue[:self.max_size], queue[self.max_size:]
                self._waiting[method] = rest
                if rest:                     # more than a batch waits: the next one leads them
                    rest[0].leads = True
                    self._close_if_complete(rest)
                    rest[0].done.set()
            self._execute(method, batch)
        return mine.answer()

    def _close_if_complete(self, queue):
        """Tell the leader of `queue` to stop waiting when it is full or every request of this model in flight
        has joined it.  Those of a running call count as ones that may join: under steady load their clients
        send again as soon as they are answered, and one call for all of them costs less than two (rf, c=32,
        2 cores).  A request that leaves without joining (another method's) is not seen: the leader then
        waits max_latency, as it would."""
        if len(queue) >= self.max_size or len(queue) >= self.model.inflight:
            queue[0].full.set()

    def _execute(self, method, batch):
        self.metrics.observe(BATCH_SIZE, (("model", self.model.name),), len(batch))
        for item in batch:
            item.batch_size = len(batch)
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
    __slots__ = ("inputs", "result", "error", "done", "full", "leads", "batch_size")

    def __init__(self, inputs):
        self.inputs, self.result, self.error, self.leads, self.batch_size = inputs, None, None, False, 1
        self.done, self.full = threading.Event(), threading.Event()

    def answer(self):
        if self.error is not None:
            raise self.error
        return self.result


def _stack(inputs):
    """Rows of several requests as one input (numbers and objects stack as objects)."""
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


_thread_bound = threading.local()       # .count: the bound _bound_threads set in this thread


def _bound_threads(count):
    """Bound the threads scikit-learn's compiled code may start, for calls from this thread, to `count` (0: leave
    them be): OpenMP's limit, which is each thread's own, and BLAS's, which is the process's.

    Set once per thread and left set: threadpoolctl's context manager would cost about 20 µs a
    call (4 for OpenMP alone) and restore BLAS's process-wide limit under other threads' feet.
    The native predictors start no threads of their own (histogram boosting's walk is told 1).
    """
    if not count or getattr(_thread_bound, "count", None) == count:
        return
    _threadpools().limit(limits=count)
    _thread_bound.count = count


@functools.cache
def _threadpools():
    """threadpoolctl's view of the OpenMP and BLAS libraries loaded (scikit-learn's, numpy's, scipy's): looking costs
    milliseconds, so once, with scikit-learn imported (which loads its OpenMP and numpy's and scipy's BLAS)."""
    import sklearn.base  # noqa: F401  (loads the libraries to see)
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def _frame_maker(names, text_columns):
    """rows -> a pandas DataFrame of columns `names`, as a model fitted on named columns wants them; None
    without pandas.

    The columns are made the way the model was fitted, whatever a batch holds: `text_columns` as
    Python objects (null being NaN, as pandas reads a missing value), the others as float64
    numbers; a number column holding text stays as sent, for scikit-learn to refuse in its own
    words.  (pandas would otherwise guess per batch: a text column of nulls alone made numbers.)
    """
    try:
        import pandas
    except ImportError:
        return None
    import numpy as np

    def make_frame(matrix):
        if matrix.dtype != object and not text_columns:
            return pandas.DataFrame(matrix, columns=names)
        columns = {}
        for position, name in enumerate(names):
            values = matrix[:, position]
            if position in text_columns:
                values = values.astype(object)
            else:
                with contextlib.suppress(TypeError, ValueError):
                    values = values.astype(np.float64)
            columns[name] = pandas.Series(values, dtype=values.dtype, copy=False)
        return pandas.DataFrame(columns)

    return make_frame


def _text_columns(estimator):
    """The input columns (positions) that hold text categories: those a ColumnTransformer hands to a part holding an
    encoder fitted on text, and those an encoder that takes the rows as they come fitted on text."""
    parts = _estimator_parts(estimator, [], set())
    selectors = [part for part in parts if hasattr(part, "_transformer_to_input_indices")]
    inside = {id(inner) for selector in selectors for _, transformer, _ in selector.transformers_
              for inner in _estimator_parts(transformer, [], set())}
    text, covered = set(), set()
    for selector in (part for part in selectors if id(part) not in inside):     # the outermost ones
        for name, transformer, _ in selector.transformers_:
            inner = _estimator_parts(transformer, [], set())
            covered.update(map(id, inner))
            if any(_text_categories(part) for part in inner):
                text.update(int(i) for i in selector._transformer_to_input_indices.get(name, ()))
    for part in parts:
        if id(part) not in covered:
            text.update(_text_categories(part))
    return frozenset(text)


def _text_categories(part):
    """The columns of an encoder fitted on text (its categories hold strings); none for anything else."""
    categories = part.__dict__.get("categories_")
    if not isinstance(categories, list):
        return []
    return [position for position, values in enumerate(categories)
            if getattr(values, "dtype", None) == object and any(isinstance(value, str) for value in values)]


def _selects_by_name(estimator):
    """Whether a ColumnTransformer inside `estimator` selects its columns by name, which scikit-learn does only in a
    DataFrame."""
    def named(columns):
        if isinstance(columns, slice):
            return isinstance(columns.start, str) or isinstance(columns.stop, str)
        return isinstance(columns, str) or isinstance(columns, (list, tuple)) and any(
            isinstance(column, str) for column in columns) or getattr(columns, "dtype", None) == object

    return any(named(columns) for part in _estimator_parts(estimator, [], set())
               if hasattr(part, "_transformer_to_input_indices") for _, _, columns in part.transformers_)


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
        expected = getattr(estimator, method)(model.make_frame(probe))
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


def _build_model(ref, options=None, native=True, sklearn_threads=0):
    """Load one artifact into a LoadedModel, with its native predictor unless `native` is false, its calls of
    scikit-learn bounded to `sklearn_threads` threads (_bound_threads; 0: unbounded).

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
    model.sklearn_threads = sklearn_threads
    _bound_threads(sklearn_threads)       # the proof's calls too
    if model.feature_names is not None and model.make_frame is None:    # no pandas: scikit-learn gets arrays
        if _selects_by_name(estimator):
            raise ArtifactError(f"{ref.file}: its ColumnTransformer selects columns by name, which scikit-learn "
                                "does only in a pandas DataFrame: install pandas (pip install pandas) to serve it")
        for part, _ in _named_parts(estimator):     # which the names' check would only warn about
            del part.feature_names_in_
    _refuse_faulty(model)
    if model.make_frame is not None and _serve_arrays(estimator, model):
        model.make_frame = None
    attach_native(model, native)
    return model


PROBE_FEATURES = 100_000      # the widest model _refuse_faulty probes: a row of 800 KB


def _refuse_faulty(model):
    """Refuse a model whose methods fail on a row of zeros (or an empty text) through a fault of the artifact,
    not of any input (LoadedModel.artifact_fault: a pickle from another scikit-learn lacking an attribute its
    methods read, a JSON model missing state): it would fail every request, so the load fails, saying why.

    One call of each method on one row, by scikit-learn, then one of each fitted part on a row of its own
    width that it accepts (_part_probes): a part that the whole model's row never reaches, because a
    sibling or an earlier step refuses zeros (an encoder's unknown category), is checked too.  Any other
    failure on zeros (a log transform, an unknown category) says nothing about the artifact and is left to
    the requests.  A JSON model without a fixed width (its allow-list's text and label models) is called on
    one empty text instead; any other model of no fixed width (sequences, a class of one's own) is checked
    by its requests, or by its "warmup" rows (see _warm), and so is one wider than PROBE_FEATURES (its row
    of zeros would cost memory a forged width can make unbounded).
    """
    import numpy as np

    if model.n_features is None and model.ref.format == "json":
        inputs, described = [""], "an empty text"
    elif model.n_features is None or not 0 < model.n_features <= PROBE_FEATURES:
        return
    else:
        inputs, described = model.sklearn_inputs(np.zeros((1, model.n_features))), "a row of zeros"
    probes = [(f"{method} fails on {described}", getattr(model.estimator, method), inputs) for method in model.methods]
    for what, call, rows in itertools.chain(probes, _part_probes(model)):
        try:
            with np.errstate(all="ignore"):     # log(0) of a probability is no news (numpy's state is per thread)
                call(rows)
        except Exception as error:  # only the artifact's own faults refuse it
            if model.artifact_fault(error):
                skew = f" (it was {model.version_skew})" if model.version_skew else ""
                raise ArtifactError(f"{model.ref.file}: its {what} through a fault of the artifact, not of "
                                    f"any input: {type(error).__name__}: "
                                    f"{_clip(str(error))}{skew}") from None


def _part_probes(model):
    """(what, call, rows) for each fitted part of the model (_fitted_parts) that transforms or predicts and
    knows its width: its transform (else predict) on one row that wide (_part_probe).  A structure that
    cannot even be walked, or a part whose row cannot be made, is left to the requests: the probe looks for
    the artifact's faults, and refuses nothing else."""
    try:
        parts = list(_fitted_parts(model.estimator))
    except Exception:  # e.g. steps that are not pairs: scikit-learn refuses them at every request, as a 4xx
        return
    for index, part in enumerate(parts):
        try:
            probe = _part_probe(part, itself=index == 0, frames=model.make_frame is not None)
        except Exception:  # noqa: S112 -- a row it cannot take says nothing about the artifact
            continue
        if probe is not None:
            yield probe


def _part_probe(part, itself, frames):
    """The probe of one part, or None: its transform (else predict) on a row of zeros, or for an encoder on
    the first of each column's categories, which it accepts, so that state read only for known categories
    (an ordinal encoder's infrequent mapping) is reached too; a DataFrame named as the part was fitted when
    `frames` (pandas at hand).  The model `itself` is probed here only as an encoder (its methods had their
    row of zeros)."""
    import numpy as np

    method = next((name for name in ("transform", "predict") if hasattr(part, name)), None)
    width, categories = part.__dict__.get("n_features_in_"), part.__dict__.get("categories_")
    if method is None or not isinstance(width, (int, np.integer)) or not 0 < width <= PROBE_FEATURES:
        return None
    known = isinstance(categories, list) and len(categories) == width and all(
        getattr(values, "ndim", 0) == 1 and values.size > 0 for values in categories)
    if itself and not known:
        return None
    rows = np.array([[values[0] for values in categories]], dtype=object) if known else np.zeros((1, int(width)))
    names = part.__dict__.get("feature_names_in_")
    if frames and names is not None and len(names) == width:
        rows = importlib.import_module("pandas").DataFrame(rows, columns=list(names))
    described = "its first categories" if known else "a row of zeros"
    return f"{type(part).__name__}'s {method} fails on {described}", getattr(part, method), rows


###############################################################################
# Agreement ###################################################################
###############################################################################
# How two versions' answers compare: a shadow's running counts (registry, HTTP application) and a
# replay's report (Replay).

REPLAY_WORST = 5        # examples kept, the most different first
REPLAY_REASONS = 10     # reasons shown for the lines of a log that are no logged request, the commonest first


class Agreement:
    """How two versions' answers to the same requests compare, request by request: a replay's report, and
    a shadow's running counts.  Its memory stays bounded however many requests it sees (sums, not lists;
    only the REPLAY_WORST most different examples), so a shadow can count for the life of the process."""

    def __init__(self):
        self.skipped = collections.Counter()    # reason -> lines not replayed
        self.bad = collections.Counter()        # replay: why -> lines that are no logged request
        self.bad_at = {}                        # replay: why -> where the first such line is
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
            if method == "predict" and model.classes is not None and isinstance(before, list) and \
                    isinstance(after, list) and len(before) == len(after):
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

    def bad_line(self, where, why):
        """Count a line of a replayed log that is no logged request, by why; the report shows the commonest
        reasons, each with where it was first seen."""
        why = _clip(why, 200)
        self.bad[why] += 1
        self.bad_at.setdefault(why, where)

    def share(self):
        return self.identical / self.replayed if self.replayed else 1.0

    def lines(self, name, version):
        """The printed report."""
        out = [f"replayed {self.replayed} request(s) on model {name!r} version {version}"]
        if self.skipped:
            out.append("skipped " + ", ".join(f"{count} {why}" for why, count in sorted(self.skipped.items())))
        if self.bad:
            out.append(f"bad lines (no logged request): {sum(self.bad.values())}")
            out += [f"  {count} x {why} (first: {self.bad_at[why]})" for why, count in self.bad.most_common(REPLAY_REASONS)]
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
            out += [f"  {request_id} ({','.join(methods)}): " + ("failed" if changed == math.inf else
                                                                   f"{changed} row(s) differ, max abs difference {gap:.6g}")
                    for changed, gap, request_id, methods in worst]
        return out


def _comparable_text(value):
    return value if isinstance(value, str) else dumps(value)


def _comparable_numbers(outputs):
    """Every number in nested JSON outputs, in order, as floats; None if any value is not a number, or is an
    integer beyond a float's range (a logged line may hold anything)."""
    flat, stack = [], [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif type(item) in (int, float) and -sys.float_info.max <= item <= sys.float_info.max:
            flat.append(float(item))
        else:
            return None
    return flat


###############################################################################
# Model registry ##############################################################
###############################################################################
# Holds the catalogue: for each model name a CatalogueEntry (its versions, those served, where each
# route points), for each version a VersionSlot with its state and its LoadedModel.  Four parts, each
# using those above it: the entries and what is in memory (Residency); the plan, a pure function from
# a store scan and the models' settings to the catalogue to serve and the loads that gets there; the
# Loader, which does every load (lazy and single-flight per version, a failed one retried only after
# a pause); and ModelRegistry, the facade the app uses, which scans, plans, hands the loads to the
# Loader and houses the watcher.  A request keeps the LoadedModel it got, so later swaps never
# disturb it.  A version is its number (an int) everywhere here; text only in what describe() returns.

UNLOADED, LOADING, AVAILABLE, UNLOADING, FAILED = "UNLOADED", "LOADING", "AVAILABLE", "UNLOADING", "FAILED"
RELOADED, DEFERRED = "RELOADED", "DEFERRED"     # how a replacement ended, besides FAILED


# -- versions, names, memory and settings ----------------------------------------------------------


class VersionSlot:
    """One version of a model in the registry: its artifact, state, loaded model and load history.

    `model` (a LoadedModel, or None) is what serves; a request that got it keeps it, so a
    swap or an unload never disturbs a request in flight.  `model` changes only under the
    registry's Residency lock.  While a changed artifact loads beside it, `replacing` is that
    artifact and `replaced` is clear; when it is set again, `replacement` says how it ended.
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
        self.loading = None            # the load requests wait on for at most a time (Loader.load_within)
        self.replacing = None          # ArtifactRef of a changed artifact loading beside the model that serves
        self.replaced = threading.Event()   # set while no replacement is under way
        self.replaced.set()
        self.replacement = None        # how the last replacement ended: RELOADED, FAILED or DEFERRED
        self.rejected = None           # fingerprint of a changed artifact that failed to load (not retried)
        self.pinned = False            # preloaded: loaded eagerly, never evicted or unloaded for idleness
        self.gone = False              # left the store or the version policy; never loaded again
        self.leaving = None            # the model UNLOADING: out of service, requests still use it

    def set(self, state, error=None):
        self.state, self.since = state, time.time()
        if error:
            self.error, self.error_at = error, self.since

    def begin_replacing(self, ref):
        self.replacing = ref
        self.replaced.clear()

    def end_replacing(self, outcome):
        self.replacement, self.replacing = outcome, None
        self.replaced.set()

    def load_failure(self, retry_after=None, **fields):
        """The 503 of a version whose last load failed."""
        return ModelUnavailable(f"model {self.ref.name!r} version {self.ref.version} failed to load: {self.error}",
                                retry_after=retry_after, **fields)

    def describe(self, clock):
        model = self.model
        info = {"version": str(self.ref.version), "state": self.state, "since": _utc_time(self.since),
                "format": self.ref.format,
                "artifact": {"file": self.ref.file, "size": self.ref.size,
                             "modified": _utc_time(self.ref.mtime_ns / 1e9),
                             "sha256": model.sha256 if model else None},
                "preloaded": self.pinned,
                "loaded_at": _utc_time(model.loaded_at) if model else None,
                "load_seconds": round(model.load_seconds, 6) if model else None,
                "idle_seconds": round(clock() - model.last_used, 3) if model else None,
                "in_flight": (model or self.leaving).inflight if (model or self.leaving) else 0,
                "loads": self.loads, "last_error": self.error, "last_error_at": _utc_time(self.error_at)}
        info.update(model.describe() if model else
                    {"estimator": None, "methods": None, "n_features_in_": None,
                     "feature_names_in_": None, "classes_": None, "sklearn_version_skew": None})
        return info


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogueEntry:
    """One name of the catalogue, as a plan left it: its versions' slots, those served, and where requests go.

    `routes` maps None (no version named) and each label to the VersionSlot that answers;
    `wanted` maps them to the version the settings ask for.  The two differ while a new target
    loads: the old one keeps answering until it is ready.  `split`, when the settings name a
    traffic split, is (cumulative shares, targets): a request naming no version goes to the
    target whose share covers its point in [0, 1).  An entry never changes: a scan, or a route
    pointed at its loaded target, makes a new one.
    """

    name: str
    versions: dict              # {version: VersionSlot}: every version on disk
    served: tuple               # the versions its policy serves, highest first
    settings: object            # the ModelSettings in force; None when none is valid (nothing serves)
    settings_error: str         # why its settings file was refused, or None
    wanted: dict                # {None or label: version}
    routes: dict                # {None or label: VersionSlot}
    split: tuple = None
    preloaded: bool = False     # named by --preload: its served versions load ahead and stay
    kept: dict = dataclasses.field(default_factory=dict)   # {version: [labels]}: served only because labels name it

    def with_route(self, key, slot):
        return dataclasses.replace(self, routes={**self.routes, key: slot})

    def pin(self):
        """Mark its versions pinned (loaded ahead, never evicted nor unloaded for idleness) when preloaded and
        served; an entry whose settings were refused leaves them as they were."""
        if self.settings is not None:
            for number, slot in self.versions.items():
                slot.pinned = self.preloaded and number in self.served

    def lookup(self, version=None, label=None, routing_key=None):
        """The VersionSlot that answers for a version or a label; 404 or 503 if none.

        Naming neither, the traffic split decides, by `routing_key` when there is one."""
        name, settings = self.name, self.settings
        if settings is None:
            raise ModelUnavailable(f"model {name!r} is not served: {self.settings_error}", model=name)
        if label is not None:
            slot = self.routes.get(label)
            if slot is None:
                known = label in settings.labels
                where = "which is not served" if settings.labels.get(label) in self.versions else \
                    "which is not in the store"
                raise NotFound(f"label {_clip(repr(label), 80)} of model {name!r} "
                               + (f"names version {settings.labels[label]}, {where}" if known else "is not defined"),
                               model=name, labels={k: str(v) for k, v in self.wanted.items() if k},
                               served_versions=self.served_versions())
            return slot
        if version is None:
            if self.split is not None:
                return self.routed(routing_key)
            slot = self.routes.get(None)
            if slot is None:
                raise NotFound(f"model {name!r} serves no version: none of "
                               f"{', '.join(map(str, sorted(self.versions)))} is in its version policy",
                               model=name, served_versions=self.served_versions())
            return slot
        slot = self.versions.get(version)
        if slot is None or version not in self.served:
            raise NotFound(f"model {name!r} " + (f"has no version {version}" if slot is None else
                                                 f"does not serve version {version} (see its version policy)"),
                           model=name, served_versions=self.served_versions())
        return slot

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

    def answers_with(self, slot):
        """Whether a request may still be answered by `slot`: a served version's, or a route's (the old target of a
        route answers while the new one loads), and not gone.  A request that looked a version up before a swap
        took it out of service looks again rather than load it back (it would stay loaded, unserved)."""
        return not slot.gone and (slot.ref.version in self.served or id(slot) in self.targets())

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
                                     "labels": sorted(k for k, v in labels.items() if v == str(number)),
                                     "kept_by_labels": self.kept.get(number, [])})
        return info

    def _describe_shadow(self, agreements):
        """The shadow in force and how its answers agree with the served ones so far, or None."""
        slot = self.shadow()
        if slot is None:
            return None
        agreement = agreements.get((self.name, slot.ref.version)) or Agreement()
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
        self.turnover = 0               # models that entered or left memory so far (the server settles its heap)

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
        self.turnover += 1
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
            self.turnover += 1
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
                self.turnover += slot is not None
                if slot is not None and slot.leaving is model:
                    slot.leaving = None
                    if slot.model is None and slot.state == UNLOADING:
                        slot.set(UNLOADED)
            self.changed()

    def announce(self):
        """Report what is in memory now, unasked: a worker forked with its parent's models holds them before
        anything changes it (under --workers, each worker's gauges are its own, summed by a scrape)."""
        with self.lock:
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


# A model's settings file as last read: its fingerprint (the file's and the versions on disk), the
# ModelSettings in force (None when no valid one was ever read) and why the file was refused (or None).
SettingsRecord = collections.namedtuple("SettingsRecord", "fingerprint settings error")


class SettingsFiles:
    """The models' settings files (model-settings.json) as last read: {name: SettingsRecord}.

    A file is read again only when it or the versions on disk change (a traffic split is valid
    only while the versions it names are served); a broken file keeps the last good settings
    in force, and shows why.
    """

    def __init__(self, store):
        self.store, self._records = store, {}

    def read(self, name, numbers):
        """The SettingsRecord of model `name`, with versions `numbers` on disk (after the store's scan)."""
        ref = self.store.settings_files.get(name)
        fingerprint = (ref.fingerprint if ref else None, tuple(sorted(numbers)))
        cached = self._records.get(name)
        if cached and cached.fingerprint == fingerprint:
            return cached
        if ref is None:
            settings, error = DEFAULT_SETTINGS, None
        else:
            try:
                settings, error = ModelSettings.read(ref, numbers), None
            except ValueError as problem:
                error = f"{ref.file}: {problem}"
                settings = cached.settings if cached else None
                logger.error("model %r: %s%s", name, error,
                             "; the previous settings stay" if settings else "; the model is not served")
        self._records[name] = record = SettingsRecord(fingerprint, settings, error)
        return record

    def settings_for(self, name):
        """The settings in force for `name`: the defaults when it has none (or none valid)."""
        record = self._records.get(name)
        return record.settings if record is not None and record.settings is not None else DEFAULT_SETTINGS


# -- planning: the catalogue a scan asks for -------------------------------------------------------

@dataclasses.dataclass
class Departures:
    """What leaves service when one catalogue replaces another (see `departures`)."""

    gone: list                  # slots no longer in the catalogue: never loaded again
    unserved: list              # [(name, version, slot, left the store?)]: their models leave memory
    forgotten: list             # [(name, version)]: gone for good, with their metrics and agreements


@dataclasses.dataclass
class Plan:
    """What a scan asks for (see `plan_catalogue`): the catalogue to serve, and the loads that get there."""

    catalogue: dict             # {name: CatalogueEntry}
    unsettled: dict             # {(name, version): fingerprint} seen once, to be seen again before use
    replace: list               # [(slot, ArtifactRef)]: a changed artifact to load beside the model that serves
    promote: list               # [(name, route key, slot)]: a route's new target, to load before it answers
    departures: Departures


def plan_catalogue(found, old_catalogue, records, unsettled, settle, preloaded):
    """The catalogue a scan asks for, and the loads that get there, from what is given alone.

    `found` is the store's scan ({name: {version: ArtifactRef}}), `records` each found name's
    SettingsRecord, `unsettled` what the previous plan left unsettled, and `preloaded(name)` says
    whether --preload names a model.  With `settle`, a new or changed artifact is used only once
    two scans in a row saw the same size and mtime (a file still being written changes between
    them).  A version in use is replaced only after its new artifact has loaded, and a model whose
    versions all left the store stays while a new one settles (`mv m/1 m/2`).  It reads the slots'
    states and makes slots for new artifacts; it takes no lock, starts no thread, reads no file
    and no clock: ModelRegistry carries the plan out.
    """
    catalogue, settling, replace, promote = {}, {}, [], []
    for name, refs in found.items():
        previous = old_catalogue.get(name)
        try:
            planned = _plan_model(name, refs, previous, records[name], unsettled, settle, preloaded(name))
        except Exception:  # a fault with one model leaves it as it was; the rest of the scan goes on
            logger.exception("model %r: planning the store's scan failed on it; it stays as it was", name)
            planned = (previous, {}, [], [])
        entry, its_settling, its_replace, its_promote = planned
        if entry is not None:
            catalogue[name] = entry
        settling.update(its_settling)
        replace += its_replace
        promote += its_promote
    return Plan(catalogue, settling, replace, promote, departures(old_catalogue, catalogue))


def _plan_model(name, refs, previous, record, unsettled, settle, preloaded):
    """plan_catalogue for one model: (its CatalogueEntry or None, its unsettled artifacts, replacements,
    promotions)."""
    settling, replace, slots, pending = {}, [], {}, set()
    for number, ref in refs.items():
        slot = previous.versions.get(number) if previous else None
        if slot is not None and slot.ref.fingerprint == ref.fingerprint:
            slots[number] = slot
        elif settle and unsettled.get((name, number)) != ref.fingerprint:
            settling[(name, number)] = ref.fingerprint
            if slot is not None:
                slots[number] = slot        # the old artifact serves until the new one settles
            else:
                pending.add(number)
        elif slot is None or slot.model is None:
            slots[number] = VersionSlot(ref)
        else:
            slots[number] = slot
            if slot.replacing is None and slot.rejected != ref.fingerprint:
                replace.append((slot, ref))
    if not (slots or (previous and pending)):
        return None, settling, replace, []
    entry, promote = _plan_entry(name, slots, previous, record, pending, preloaded)
    return entry, settling, replace, promote


def _plan_entry(name, slots, previous, record, pending, preloaded):
    """(CatalogueEntry, promotions) of one model: its settings applied to its versions, what is served, and where
    each route points.  `pending` are the version numbers whose new artifacts have not settled yet."""
    settings = record.settings
    if settings is None:
        return CatalogueEntry(name, slots, (), None, record.error, {}, {}, preloaded=preloaded), []
    selected, kept = settings.select(slots), settings.kept_by_labels(slots)
    served = settings.served(slots)
    wanted = {None: selected[0]} if selected else {}        # a version kept by labels only is never the default
    wanted.update({label: n for label, n in settings.labels.items() if n in served})
    routes, promotions = {}, []
    for key, current in (previous.routes.items() if previous else ()):
        if key not in wanted and _holds(current, slots, pending):
            routes[key] = current
    for key, number in wanted.items():
        current = previous.routes.get(key) if previous else None
        routes[key], waits = _route_target(current, slots[number], slots, pending)
        if waits and slots[number].state != LOADING:       # else a load of it is under way already
            promotions.append((name, key, slots[number]))
    return CatalogueEntry(name, slots, served, settings, record.error, wanted, routes,
                          _traffic_split(settings, served), preloaded, kept), promotions


def _route_target(current, wanted, slots, pending):
    """(the slot a route answers with now, whether it waits for `wanted` to load): `wanted`, unless it must
    load first.

    TF Serving's availability-preserving rule: what answers keeps answering until its
    successor has loaded, even after its artifact left the store (its model is still in
    memory), and a route never falls back to an older version because its own version's
    successor has not settled yet.
    """
    if wanted is current or current is None:
        return wanted, False
    if _holds(current, slots, pending):
        return current, False
    if wanted.model is not None:
        return wanted, False
    departed = slots.get(current.ref.version) is not current
    if current.model is None and (departed or wanted.state != FAILED):
        return wanted, False       # nothing in memory to protect: its next request loads the new one
    return current, True


def _holds(current, slots, pending):
    """Whether a route stays on `current`, which left the store, while a version as high is settling.

    Renaming the serving version's folder to a higher number (`mv m/5 m/6`) is, for one
    scan, a removal of 5 and an unsettled 6: the route keeps answering with 5 from memory
    (or 503 with Retry-After if 5 is not loaded), never with 4.
    """
    return current is not None and slots.get(current.ref.version) is not current and \
        any(number >= current.ref.version for number in pending)


def _traffic_split(settings, served):
    """The traffic split, resolved once per scan: (cumulative shares, targets), over the targets served now.

    A target can stop being served only while previous settings stay in force (the file
    that would serve it was refused): its share then goes to the others, never to a 404.
    """
    split = [(target, weight) for target, weight in settings.traffic.items() if weight > 0 and
             (settings.labels[target] if isinstance(target, str) else target) in served]
    if not split:
        return None
    largest = max(weight for _, weight in split)        # scaled by it first, no sum overflows (1e308 twice)
    scaled = [weight / largest for _, weight in split]
    total = sum(scaled)
    return tuple(itertools.accumulate(weight / total for weight in scaled)), tuple(t for t, _ in split)


def departures(old_catalogue, catalogue):
    """What left the store, left the policy or stopped being a route's target when `catalogue` replaced
    `old_catalogue`.

    A version that left the store while a route still answers with it (see _holds) is gone
    but not unserved: it stays in memory until no route points at it.
    """
    keep = set()
    for entry in catalogue.values():
        keep |= entry.targets()
        keep.update(id(entry.versions[n]) for n in entry.served)
    gone, unserved, forgotten = [], [], []
    for name, entry in old_catalogue.items():
        current = catalogue.get(name)
        slots = {id(slot): (slot.ref.version, slot) for slot in entry.routes.values()}
        slots.update((id(slot), (number, slot)) for number, slot in entry.versions.items())
        for number, slot in slots.values():
            removed = current is None or current.versions.get(number) is not slot
            if removed:
                gone.append(slot)
                if id(slot) not in keep and (current is None or number not in current.versions):
                    forgotten.append((name, number))
            if id(slot) not in keep:
                unserved.append((name, number, slot, removed))
    return Departures(gone, unserved, forgotten)


# -- loading ---------------------------------------------------------------------------------------


def _warm(model, rows):
    """Run every method of a freshly loaded model once, before it serves, so no client pays a first call's cost.

    The rows take the requests' own path (model_inputs, then LoadedModel.call: the native
    predictor where it answers).  They are the model's "warmup" rows when its settings give
    some; a failure then fails the load, as a bad warm-up record does in TF Serving: the operator
    said this model takes those rows, so a model that refuses them is not the one they meant.
    Without them a tabular model is warmed on one row of zeros, and a failure there is only
    logged (the guess may not suit it: categories, a log transform); a model without a fixed
    width (text, sequences) is not warmed, nor one whose settings say "warmup": false.  A method that
    fails on any rows through a fault of the artifact (a ModelFault: never fitted, written by another
    scikit-learn) fails the load: that version cannot serve it.  What was done, and how long it took,
    goes in `model.warmup` for the load's log line.
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
    except ModelFault as fault:
        raise ArtifactError(f"warming it up failed: {fault.message}") from None
    except Exception as error:
        if given:
            raise ArtifactError(f'the "warmup" rows of its {SETTINGS_FILE} failed: {error}') from None
        model.warmup = f"not warmed: a row of zeros failed: {_clip(str(error), 200)}"
        logger.warning("model %r version %s %s; its first request pays the first call's cost", model.name,
                       model.version, model.warmup)
        return
    model.warmup = (f"warmed {', '.join(model.methods)} on {len(rows)} row{'s' if len(rows) > 1 else ''} "
                    f"{'from its settings' if given else 'of zeros'} in {(time.perf_counter() - started) * 1000:.1f} ms")


class Loader:
    """Every load of a model version: on demand, for a request (`load_for_request`: `load`, single-flight per
    version, the other requests waiting on the slot's lock, a failed load tried again only after
    --load-retry-seconds; or `load_within` when --max-predict-seconds bounds the wait), a changed artifact
    beside the model that serves (`replace`), a route's new
    target before the route turns to it (`promote`), the preloaded versions one after another
    (`preload`), and all of them before a pre-fork host forks (`load_before_fork`).

    A load counts against --max-loaded (Residency), follows the flags and the model's settings in
    force (`settings_for(name)`), and is counted in the metrics.  A model loaded ahead of its
    requests is warmed first (_warm); what runs beside the requests runs on a thread of its own.
    """

    def __init__(self, config, store, clock, residency, metrics, tracing, settings_for):
        self.config, self.store, self.clock = config, store, clock
        self.residency, self.metrics, self.tracing, self.settings_for = residency, metrics, tracing, settings_for
        self.preloading = False             # a preload pass is under way (one at a time)

    def options_for(self, ref):
        """How to load `ref` now: the service's flags, its model's settings and the digests listed for it."""
        settings = self.settings_for(ref.name)
        digests = []
        if ref.version in settings.sha256:
            digests.append((settings.sha256[ref.version], f"{ref.name}/{SETTINGS_FILE}"))
        if ref.file in self.store.sha256sums:
            digests.append((self.store.sha256sums[ref.file], SHA256SUMS_FILE))
        return LoadOptions(safe_pickle=self.config.safe_pickle or settings.safe_pickle, trust=self.config.trust,
                           sha256=tuple(digests), strict_versions=self.config.strict_versions,
                           json_limits=JsonLimits.of(self.config))

    def build(self, ref, warm):
        """_build_model with these load options, counted in the metrics; warmed (_warm) when no request waits
        for it: a request that loads a model is its first call, and would only pay for every other method's
        too."""
        labels = (("model", ref.name), ("version", str(ref.version)))
        started = time.perf_counter()
        settings = self.settings_for(ref.name)
        try:
            with _logging_about(model=ref.name, version=ref.version):
                model = _build_model(ref, self.options_for(ref), native=self.config.native and settings.native,
                                     sklearn_threads=self.config.sklearn_threads)
                if warm:
                    _warm(model, settings.warmup)
                else:
                    model.warmup = "not warmed: loaded for a request, which is its first call"
        except Exception:
            self.metrics.count(MODEL_LOADS_TOTAL, labels + (("outcome", "failure"),))
            raise
        self.metrics.count(MODEL_LOADS_TOTAL, labels + (("outcome", "success"),))
        self.metrics.observe(MODEL_LOAD_DURATION_SECONDS, labels, time.perf_counter() - started)
        model.metrics, model.tracing = self.metrics, self.tracing    # from now on: the warm-up's calls were no client's
        batching = settings.batching
        size, latency = batching if batching else (self.config.max_batch_size, self.config.max_latency_ms)
        if batching is not False and size > 1 and model.n_features is not None:
            model.batcher = Batcher(model, size, latency / 1000, self.metrics)
        return model

    def load(self, slot, warm=False):
        """The slot's model, loaded now if it holds none; 503 when the load fails (or failed lately)."""
        with slot.lock:
            if slot.model is not None:
                return slot.model
            ref = slot.ref
            wait = slot.retry_at - self.clock()
            if slot.state == FAILED and wait > 0:
                raise slot.load_failure(math.ceil(wait), model=ref.name, version=str(ref.version))
            self.residency.reserve()
            slot.set(LOADING)
            slot.loads += 1
            try:
                model = self.build(ref, warm)
            except Exception as error:
                self.residency.cancel()
                slot.set(FAILED, str(error) or type(error).__name__)
                slot.retry_at = self.clock() + self.config.load_retry_seconds
                logger.error("model %r version %s failed to load: %s", ref.name, ref.version, slot.error,
                             extra={"model": ref.name, "version": ref.version})
                raise slot.load_failure(math.ceil(self.config.load_retry_seconds) or None,
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

    _waited = threading.Lock()          # guards VersionSlot.loading

    def load_for_request(self, slot, warm=False):
        """Every request that waits on a load waits here: at most --max-predict-seconds when it is set (then 503,
        and the load goes on: load_within), else until the load ends."""
        seconds = self.config.max_predict_seconds
        return self.load_within(slot, seconds, warm) if seconds else self.load(slot, warm)

    def load_within(self, slot, seconds, warm=False):
        """load() for a request that may wait at most `seconds` (--max-predict-seconds): the load runs in the
        background, one per version however many requests wait on it, and goes on past their wait, which
        ends in a 503 with Retry-After (a load is not a prediction: its successors find the model loaded)."""
        with self._waited:
            if slot.loading is None or slot.loading.done():
                slot.loading = concurrent.futures.Future()
                _in_background(self._load_into, slot, slot.loading, warm)
            loading = slot.loading
        try:
            return loading.result(timeout=seconds)
        except concurrent.futures.TimeoutError:
            raise ModelUnavailable(f"model {slot.ref.name!r} version {slot.ref.version} is still loading after "
                                   f"{seconds:g} s (--max-predict-seconds); try again", retry_after=1,
                                   model=slot.ref.name, version=str(slot.ref.version)) from None

    def _load_into(self, slot, future, warm):
        try:
            future.set_result(self.load(slot, warm))
        except BaseException as error:      # handed to the requests that wait on it
            future.set_exception(error)

    def replace(self, slot, ref, background=False):
        """Load `ref`, a changed artifact of `slot`, beside the model that serves, then swap; a failure keeps
        the old one.  Returns RELOADED, FAILED or DEFERRED (no room under --max-loaded now; the next rescan
        tries again); in the background, None: `slot.replacement` says once `slot.replaced` is set."""
        slot.begin_replacing(ref)
        if background:
            _in_background(self._replacing, slot, ref)
            return None
        return self._replacing(slot, ref)

    def _replacing(self, slot, ref):
        outcome = FAILED
        try:
            outcome = self._replace(slot, ref)
        finally:
            slot.end_replacing(outcome)
        return outcome

    def _replace(self, slot, ref):
        try:
            self.residency.reserve()
        except ModelUnavailable:
            return DEFERRED
        try:
            model = self.build(ref, warm=True)
        except Exception as error:
            self.residency.cancel()
            slot.rejected = ref.fingerprint
            slot.error = f"changed artifact not loaded, the previous one still serves: {error}"
            slot.error_at = time.time()
            logger.error("model %r version %s: %s", ref.name, ref.version, slot.error)
            return FAILED
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
        return RELOADED

    def promote(self, slot, then):
        """Load a route's new target in the background, then call `then()` (which points the route at it); a
        failure is recorded in the slot's status, and the route's previous version keeps answering."""
        _in_background(self._promote, slot, then)

    def _promote(self, slot, then):
        try:
            self.load(slot, warm=True)
        except ServiceError:
            return
        then()

    def preload(self, slots):
        """Load `slots` one after another in the background, unless a preload pass is under way already."""
        if slots and not self.preloading:
            self.preloading = True
            _in_background(self._preload, slots)

    def _preload(self, slots):
        try:
            self.load_all(slots)
        finally:
            self.preloading = False

    def load_all(self, slots):
        """Load (and warm) each of `slots` still in the catalogue, in this thread; a failure shows in its status
        and in readiness, and is tried again later."""
        for slot in slots:
            if not slot.gone:
                with contextlib.suppress(ServiceError):
                    self.load(slot, warm=True)

    def load_before_fork(self, slots):
        """In a pre-fork host's parent: import the numeric stack and load `slots` now, in this thread.

        The workers forked next share these modules' and models' memory (copy on write) instead of
        each loading its own.  No thread is started, and none runs at the fork: threads do not
        survive it, and a lock one of them held would stay held in every worker.
        """
        for module in ("numpy", "sklearn", "joblib"):      # imported once, shared by every worker
            importlib.import_module(module)
        self.load_all(slots)


# -- the registry: what the app uses ---------------------------------------------------------------

# What a request naming no model, or any model, is told when the store holds none (the log names the folder,
# which clients are not shown).
EMPTY_STORE = "the model store has no models: add one as NAME.joblib or NAME/1/model.joblib"


class ModelRegistry:
    """Every model in the store, the state of each of its versions, and their lifecycle: the app's one handle.

    Each scan of the store is planned (plan_catalogue) and carried out here: the catalogue
    ({name: CatalogueEntry}) is replaced whole, so a request reads a consistent view without a
    lock, and the loads the plan asks for go to the Loader.  Housekeeping (rescans every
    `poll_interval`, idle unloads, preloads) runs in `refresh()`, which both requests and a
    watcher thread call.  The watcher is started lazily, in the process that serves: one started
    before a pre-fork host forks would not survive the fork.  Loads run in background threads
    beside the requests, except a first load on demand, which its requests wait for.  A request
    gets its model with `using`, or with acquire and release paired (the predict core, see `using`).
    """

    # A rescan may replace a request's slot, or --max-loaded evict its model, between the lookup and its use:
    # the request looks again, this many times in all, before it says which of the two kept happening.
    ACQUIRE_TRIES = 3

    def __init__(self, config, clock=time.monotonic, watch=True, tracing=None):
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
        self.settings = SettingsFiles(self.store)
        self.settings_for = self.settings.settings_for     # the settings in force for a model name
        self.metrics = Metrics({MODELS_LOADED: self.loaded_count,
                                REQUESTS_IN_FLIGHT: self.in_flight,
                                LABEL_VERSION: lambda: label_versions(self._catalogue)})
        self.residency = Residency(config.max_loaded, clock, self.metrics.changed)
        self.tracing = Tracing.from_environment() if tracing is None else tracing
        self.loader = Loader(config, self.store, clock, self.residency, self.metrics, self.tracing, self.settings_for)
        self.agreements = {}            # (name, shadow version) -> Agreement, filled by the app's Shadow
        self._watcher_pid = None
        self._tick_seconds = min(config.poll_interval or math.inf,
                                 1.0 if config.idle_unload or config.preload else math.inf)

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
        if self.config.preload and not self.loader.preloading:
            self.loader.preload(self._unloaded_preloads())
        if self.watch and self._tick_seconds < math.inf and self._watcher_pid != os.getpid():
            self._watcher_pid = os.getpid()
            threading.Thread(target=_watch, args=(weakref.ref(self), os.getpid(), self._tick_seconds),
                             name="model-watcher", daemon=True).start()

    def stop_watching(self):
        """End this process's watcher thread (requests still refresh); for tests and embedders."""
        self._watcher_pid = None

    # -- scanning: scan, plan, carry the plan out -------------------------------
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
        if first:
            _warn_of_missing_preloads(self.config.preload, found, self.store.root)

    def _apply(self, found, settle):
        """Make the catalogue what the store and the models' settings ask for, then start the loads that needs.

        The settings are read first: a load the plan starts reads them."""
        records = {name: self.settings.read(name, refs) for name, refs in found.items()}
        plan = plan_catalogue(found, self._catalogue, records, self._unsettled, settle, self._preloaded)
        for entry in plan.catalogue.values():
            entry.pin()
        previous = self._catalogue
        self._unsettled, self._catalogue = plan.unsettled, plan.catalogue
        _log_kept_by_labels(previous, plan.catalogue)
        self._retire(plan.departures)
        if label_versions(plan.catalogue) != label_versions(previous):
            self.residency.announce()           # shared between workers, the label gauge is written now
        for slot, ref in plan.replace:
            self.loader.replace(slot, ref, background=True)
        for name, key, slot in plan.promote:
            self.loader.promote(slot, functools.partial(self._point, name, key, slot))

    def _point(self, name, key, slot):
        """A promoted target has loaded: point its route at it, if the catalogue still wants that."""
        with self._scan_lock:
            entry = self._catalogue.get(name)
            if entry is None or entry.wanted.get(key) != slot.ref.version or \
                    entry.versions.get(slot.ref.version) is not slot:
                return
            previous = self._catalogue
            self._catalogue = {**previous, name: entry.with_route(key, slot)}
            self._retire(departures(previous, self._catalogue))
            if key is not None:
                self.residency.announce()
        logger.info("model %r %s now answers with version %s", name,
                    f"label {key!r}" if key else "(latest)", slot.ref.version)

    def _retire(self, departed):
        """Carry out Departures: mark the gone slots, unload the unserved models, forget the versions that left."""
        with self.residency.lock:
            for slot in departed.gone:
                slot.gone = True
            for name, number, slot, removed in departed.unserved:
                if slot.model is not None:
                    logger.info("model %r version %s %s: unloaded", name, number,
                                "left the store" if removed else "is no longer served")
                    self.residency.retire(slot.model, slot)
        for name, number in departed.forgotten:   # its series end, so a store that keeps publishing stays bounded
            self.metrics.forget(name, number)
            self.agreements.pop((name, number), None)

    def _preloaded(self, name):
        return self.config.preload == ALL_MODELS or name in self.config.preload

    def _unloaded_preloads(self):
        now = self.clock()
        return [slot for entry in self._catalogue.values() for slot in entry.versions.values()
                if slot.pinned and slot.model is None and slot.state != LOADING
                and not (slot.state == FAILED and slot.retry_at > now)]

    # -- requests -----------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, name, version=None, label=None, slot=None, routing_key=None):
        """`with registry.using(name, version, label) as model:` the model that answers a request, loaded if
        need be and counted in flight for the block: how a handler, the shadow and replay get a model.  The
        predict core pairs acquire() and release() itself: past --max-predict-seconds its releases pass to
        the computation still running (TimeLimit), and a with block on its path costs the request 3 µs."""
        model = self.acquire(name, version, label, slot, routing_key)
        try:
            yield model
        finally:
            self.release(model)

    def acquire(self, name, version=None, label=None, slot=None, routing_key=None):
        """The model that answers a request (in `slot` when the caller resolved it), loaded if need be; pair with
        release()."""
        for _ in range(self.ACQUIRE_TRIES):
            slot = slot or self.slot(name, version, label, routing_key)
            model = self.residency.use(slot)
            if model is not None:
                return model
            last = slot
            if self.entry(name).answers_with(slot):
                self.loader.load_for_request(slot)
            if not self.entry(name).answers_with(slot):
                slot = None     # replaced, or out of service since it was looked up: look the request up again
        if last.gone:          # held by _holds while its successor settles: never an older version instead
            raise ModelUnavailable(f"model {name!r} version {last.ref.version} left the store and the version "
                                   "that follows it is not ready yet", retry_after=1, model=name)
        raise ModelUnavailable(f"model {name!r} version {last.ref.version} was unloaded as soon as it loaded; "
                               "is --max-loaded too small for the traffic?", retry_after=1, model=name)

    def release(self, model):
        self.residency.release(model)

    def get(self, name, version=None, label=None):
        """The model of a version, loaded (and warmed) now if need be, one load however many callers wait: to
        load ahead of requests (V2's repository load, embedders), waiting as a request does.  Not counted in
        flight: a request for a prediction uses `using`."""
        slot = self.slot(name, version, label)
        model = slot.model
        return model if model is not None else self.loader.load_for_request(slot, warm=True)

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
            near = closest(name, self._catalogue)
            raise NotFound(f"model {name!r} not found" + (f": {EMPTY_STORE}" if not self._catalogue else "") +
                           (f"; did you mean {near!r}?" if near else ""), model=name, models=self.names())
        return entry

    def slot(self, name, version=None, label=None, routing_key=None):
        """The VersionSlot that answers for a name and a version or label (CatalogueEntry.lookup); 4xx/503 if
        none."""
        return self.entry(name).lookup(version, label, routing_key)

    def shadow_slot(self, name):
        """The VersionSlot of model `name`'s shadow version; None when it has none (or is gone: a request
        answered before a rescan removed the model is not a 404 for its shadow)."""
        entry = self._catalogue.get(name)
        return entry.shadow() if entry is not None else None

    def require_store(self):
        """503 unless the store has been scanned (it may be missing or unreadable)."""
        if not self._scanned:
            raise ModelUnavailable(self._store_unavailable())

    def _store_unavailable(self):
        return "model store unavailable: " + (self._scan_error or "it has not been scanned yet")

    @property
    def ready(self):
        return self.not_ready_reason() is None

    def not_ready_reason(self):
        """None when ready: store scanned and every preloaded model's routes loaded; else why not."""
        if self.draining:
            return "shutting down"
        if not self._scanned:
            return self._store_unavailable()
        catalogue, reasons = self._catalogue, []
        if self.config.preload != ALL_MODELS:
            reasons += [f"preloaded model {name!r} is not in the store" for name in self.config.preload
                        if name not in catalogue]
        for name in sorted(catalogue):
            entry = catalogue[name]
            if not entry.preloaded:
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

    def describe_all(self):
        catalogue = self._catalogue
        return [catalogue[name].describe(self.clock, self.agreements) for name in sorted(catalogue)]

    def agreement(self, name, version):
        """The Agreement of model `name`'s shadow version `version` with the versions that answer (made once)."""
        key = (name, version)
        agreement = self.agreements.get(key)
        if agreement is None:
            agreement = self.agreements.setdefault(key, Agreement())
        return agreement

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
            raise ModelUnavailable(self._store_unavailable())
        return self.names()

    def reload(self, name):
        """Rescan, then load every loaded served version of `name` again, swapping each once loaded.

        Returns {version: outcome}; a version not in memory is left to load on its next
        use, and a failed one is tried again then, without waiting for its pause.  Like any request's, the
        wait for each load ends at --max-predict-seconds when set: a load still under way then is LOADING
        (it goes on, and swaps once loaded).
        """
        self.rescan()
        entry = self.entry(name)
        results = {}
        for number in entry.served:
            slot = entry.versions[number]
            if slot.replacing is None and slot.model is None:
                slot.retry_at = 0.0
                results[str(number)] = slot.state
                continue
            if slot.replacing is None:             # else the rescan found it changed and is loading it already
                self.loader.replace(slot, slot.ref, background=True)
            done = slot.replaced.wait(self.config.max_predict_seconds or None)
            results[str(number)] = slot.replacement if done else LOADING
        return results

    def load_before_fork(self):
        """In a pre-fork host's parent: scan and load the preloaded versions now, in this thread (see
        Loader.load_before_fork).  Each worker's first refresh() starts its own watcher, which loads what the
        store publishes later."""
        with self._scan_lock:
            self._scan(settle=False)
        self.loader.load_before_fork(self._unloaded_preloads() if self.config.preload else [])


def label_versions(catalogue):
    """{(model, label, version): 1} for each label and the version it answers with now (a metric's series)."""
    return {(name, label, str(slot.ref.version)): 1 for name, entry in catalogue.items()
            for label, slot in entry.routes.items() if label is not None}


def _warn_of_missing_preloads(preload, found, root):
    """A warning for each model --preload names that the store's first scan did not find (a typo: `irs`)."""
    for name in () if preload == ALL_MODELS else preload:
        if name not in found:
            near = closest(name, found)
            logger.warning("--preload names %r, which is not in the model store %s%s", name, root,
                           f"; did you mean {near!r}?" if near else "")


def _log_kept_by_labels(old_catalogue, catalogue):
    """Log each version that labels start or stop keeping in service (see ModelSettings.kept_by_labels): a label
    that held its version against the version policy is worth a warning; one that lets it go, a note why."""
    for name in sorted(set(old_catalogue) | set(catalogue)):
        before = old_catalogue[name].kept if name in old_catalogue else {}
        entry = catalogue.get(name)
        after = entry.kept if entry is not None else {}
        for number, labels in sorted(after.items()):
            if before.get(number) != labels:
                logger.warning("model %r version %s stays served although its version policy does not select it: "
                               "label(s) %s name it (move or remove them in its %s to let it go)", name, number,
                               ", ".join(labels), SETTINGS_FILE, extra={"model": name, "version": number})
        for number in sorted(set(before) - set(after)):
            why = ("it left the store" if entry is None or number not in entry.versions else
                   "its version policy selects it" if number in entry.served else "no label names it now")
            logger.info("model %r version %s is no longer kept in service by label(s) %s: %s", name, number,
                        ", ".join(before[number]), why, extra={"model": name, "version": number})


def _watch(registry_ref, pid, tick):
    """A registry's watcher thread: keep housekeeping going while no request comes (idle unloads, new
    versions preloaded).  It holds the registry weakly, so a registry nobody uses any more ends its watcher.
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
    body is then malformed JSON, and when the body looks like JSON ("{" or "[" first) whatever
    the header says: a typo sent with plain `curl -d` gets the parse error and its position
    first, not a complaint about a header that was never the problem.  Either way the message
    shows JSON the route takes.
    """
    media_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    message, refusal = error.message, BadRequest
    if error.media_type:
        refusal = UnsupportedMediaType
    elif error.looks_like_json and not _claims_json(media_type):
        message += f" (it came as Content-Type {media_type}, as curl -d sends it: the body is read as JSON all the same)"
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
    written in JSON.  A missing value is null.  An object naming a member twice is refused at any
    depth: parsers disagree on which one counts.
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
        raise NotJSON(f"{what} is not valid JSON: {error}", looks_like_json=data.lstrip()[:1] in ("{", "[")) \
            from None
    except DuplicateMember as error:
        raise BadRequest(f"{what} is ambiguous: {error}") from None
    except ValueError as error:                 # JSON's syntax, with NaN or a number beyond a float
        raise BadRequest(f"{what} is not valid JSON: {error}") from None
    if _nested_deeper_than(max_depth, raw):
        raise BadRequest(f"{what} is nested deeper than {max_depth} levels")
    return value


def parse_literal(text, max_depth, max_length=100_000):
    """A JSON value or Python literal from a URL (the seed's GET /predict/<sen>), parsed safely."""
    if len(text) > max_length:
        raise BadRequest(f"input is longer than {max_length} characters")
    raw = text.encode("utf-8", "surrogatepass")
    try:
        value = _strict_json(text)
    except (json.JSONDecodeError, RecursionError):
        return _parse_python_literal(text, raw, max_depth)
    except DuplicateMember as error:
        raise BadRequest(f"input is ambiguous: {error}") from None
    except ValueError as error:                 # JSON, but NaN or a number beyond a float: as parse_json says
        raise BadRequest(f"input is not valid JSON: {error}") from None
    if _nested_deeper_than(max_depth, raw):
        raise BadRequest(f"input is nested deeper than {max_depth} levels")
    return value


def _parse_python_literal(text, raw, max_depth):
    """A Python literal, measured before ast.literal_eval recurses into it; its numbers as JSON's must be,
    and its dicts, like JSON's objects, name each key once."""
    if _nested_deeper_than(max_depth, raw, PYTHON_STRING, PYTHON_PAIRS):
        raise BadRequest(f"input is nested deeper than {max_depth} levels")
    try:
        tree = ast.parse(text.lstrip(" \t"), mode="eval")       # as ast.literal_eval(text) parses it
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                _members([(ast.literal_eval(key), None) for key in node.keys if key is not None])
        value = _tuples_to_lists(ast.literal_eval(tree))
    except DuplicateMember as error:
        raise BadRequest(f"input is ambiguous: {error}") from None
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


# -- what a log may quote of a request ------------------------------------------------------------------
# One rule for every sink that writes a request's features: a model's "redact" setting.  The payload
# log nulls the redacted features; every other log line about a prediction request of a model that
# redacts features quotes nothing taken from the request's inputs: its path is written as its route's
# template with only the model's name, version and label filled in (the seed's GET /predict/{sentence}
# carries the features in the path), and an error as its kind, without its message (scikit-learn's and
# numpy's messages quote values: "could not convert string to float: '078-05-1120'").

PATH_NAMES = ("name", "version", "label")      # the path parameters that name what is called, never inputs


def mark_redacting(environ, redact):
    """Note, once the request's model is named, whether it redacts features (`redact`: its feature names)."""
    environ["service.redacting"] = bool(redact)


def logged_path(environ):
    """The request's path as a log line may write it (see the rule above)."""
    path = environ.get("PATH_INFO", "")
    if not environ.get("service.redacting"):
        return path
    template, values = environ.get("service.route_path"), environ.get("route.url_args") or {}
    if template is None:
        return "(path withheld: its model redacts features)"
    return re.sub(r"\{(\w+)\}", lambda match: str(values.get(match[1], match[0])) if match[1] in PATH_NAMES
                  else match[0], template)


def logged_error(error, redacting):
    """An error's message as a log line may write it: for a request of a model that redacts features, its
    kind alone."""
    if redacting:
        return f"{type(error).__name__} (message withheld: the model redacts features)"
    return _clip(getattr(error, "message", None) or str(error))


def logged_traceback(environ):
    """The exception being handled, as a log line may write it: whole, or for a request of a model that
    redacts features, its frames (code, no values) and its kind."""
    if not environ.get("service.redacting"):
        return traceback.format_exc()
    error = sys.exc_info()[1]
    return "".join(traceback.format_tb(error.__traceback__)) + logged_error(error, True)


###############################################################################
# Protocols ###################################################################
###############################################################################
# Each protocol in one block: the native API, the seed course's routes, TF Serving REST (KServe V1),
# the Open Inference Protocol (V2) and MLflow scoring.  A block holds the protocol's helpers (bodies
# into estimator inputs, outputs into its JSON), its request record, and its Protocol: route rows,
# handlers, OpenAPI schemas and examples.  ROUTES (HTTP application) is the service's rows plus every
# protocol's in PROTOCOLS: adding a protocol is one block here and one entry there.

# -- what every protocol shares: route rows, the Protocol base, rows into estimator inputs ---------

JSON_TYPE = "application/json"
EXPLAIN = "explain"     # the method an explanation is asked by: one more for `inputs` to name (see explain_model)
OPEN, TOKEN, ADMIN = "open", "token", "admin"    # who may call a route: anyone, --auth-tokens, --admin-token


def version_number(text, model):
    """A version of `model` as a URL or a flag writes it, as the number the service uses inside; 400 for any
    other text."""
    if not VERSION.fullmatch(text):
        raise BadRequest(f"invalid version {_clip(repr(text), 40)}: versions are positive integers", model=model)
    return int(text)


@dataclasses.dataclass(frozen=True)
class Route:
    """One row of ROUTES.

    `path` is OpenAPI's template ({name}, {version}, {label}; a TF verb follows a colon).
    `handler` names the method that answers, called with the path's parameters and `args`: the
    `protocol`'s (given the app first) on a protocol's row, else the app's.  `access`: OPEN
    routes are for probes and load balancers; TOKEN ones need one of --auth-tokens when it is
    set; ADMIN ones are off without --admin-token and need it.  `answer` and `body` name OpenAPI
    schemas (see the OpenAPI section); `link` names the route in GET /'s links; a `per_model` row
    is also documented once per model whose feature names are known, with its own row schema.
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
    link: str = None
    per_model: bool = False
    protocol: object = None     # the Protocol whose row it is (set when PROTOCOLS registers it)

    @property
    def rule(self):
        """Bottle's rule: a parameter before a colon or at the end of a TF path admits no colon, and the
        colon of a TF verb is matched by an anonymous wildcard (Bottle reads a bare ":name" as a wildcard):
        "/v1/models/{name}:predict" is "/v1/models/<name:re:[^/:]+><:re::predict>"."""
        path = self.path
        if path.startswith("/v1/"):
            path = re.sub(r"\{(\w+)\}(?=:|$)", r"<\1:re:[^/:]+>", path)
        path = re.sub(r":(\w+)$", r"<:re::\1>", path)
        return re.sub(r"\{(\w+)\}", lambda m: f"<{m[1]}:path>" if m[1] == "sentence" else f"<{m[1]}>", path)


# The ways a model route names a version: none (the latest, or the traffic split), a number, a label.
VERSION_WAYS = (("", "", None), ("/versions/{version}", " with a version", "version"),
                ("/labels/{label}", " with a label", "label"))


def for_each_version(rows, labels=True):
    """The rows `rows(suffix, what, way)` makes for each of VERSION_WAYS (without labels: the first two)."""
    return tuple(row for suffix, what, way in VERSION_WAYS if labels or way != "label"
                 for row in rows(suffix, what, way))


# OpenAPI's building blocks, for the protocols' schemas and the OpenAPI section.
def _schema_ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


_ANY = {}
_OBJECT = {"type": "object", "additionalProperties": True}
_ROWS = {"type": "array", "minItems": 1, "items": _ANY}


class Protocol:
    """One protocol, whole: its route rows, how it reads a request, answers and refuses, its handlers, and
    its OpenAPI schemas and examples.

    Every prediction goes through the app's one core (ServiceApp.predict), which calls `read`
    (what can be checked before the model is known: the body, the URL) for the protocol's
    request record, `routing_key`, then `inputs` (what needs the model: the methods to call, the
    estimator's inputs), then `encode`; resolving the model, admission, batching, the time limit
    and the metrics are done there once for every protocol.  An explanation is one more method
    for `inputs` to name and `encode` to shape.  A protocol that is not HTTP (V2 over gRPC) reads
    its own messages into its record and calls the core's `ServiceApp.answer`.  A protocol's other
    rows name its own handlers, called with the app first, or the service's answers every
    protocol shares (below).
    """

    name = None         # how the payload log names it
    routes = ()         # its Route rows, bound to it by registered_routes()
    schemas = {}        # its OpenAPI component schemas
    examples = {}       # a request body of each kind its rows take (Route.body): OpenAPI shows them, and a
    #                     body that is not JSON is answered with its route's (not_json_refusal)
    bodies = {}         # OpenAPI request bodies that are not one JSON schema, by Route.body

    def registered_routes(self):
        return tuple(dataclasses.replace(route, protocol=self) for route in self.routes)

    def read(self, request, config, **route):
        """The request record: what the request asks for, as far as it can be checked without the model."""
        raise NotImplementedError

    def routing_key(self, environ, asked):
        """The request's routing key for sticky traffic splits: its X-Routing-Key header; None if empty."""
        return environ.get("HTTP_X_ROUTING_KEY") or None

    def inputs(self, model, asked, config):
        """(methods to call, estimator inputs)."""
        raise NotImplementedError

    def encode(self, model, asked, results):
        """The answer for {method: outputs}: a JSON value, or a bottle.HTTPResponse for other bodies."""
        raise NotImplementedError

    def error(self, error):
        """The JSON body of a refusal in this protocol."""
        return error.to_dict()

    # The service's answers a protocol's rows may name: the same in every protocol.
    def predict(self, app, **route):
        return app.predict(self, **route)

    def alive(self, app):
        return SERVICE_ANSWERS.alive(app)

    def ready(self, app):
        return SERVICE_ANSWERS.ready(app)

    def model_names(self, app):
        return SERVICE_ANSWERS.model_names(app)


def choose_method(model, requested, unknown=NotFound):
    """The method to call: `unknown` (404) for a name that is no prediction method, 400 for one the model lacks."""
    method = requested or "predict"
    if method not in model.methods:
        error = unknown if method not in PREDICT_METHODS else BadRequest
        raise error(f"model {model.name!r} has no method {_clip(repr(method), 60)}; it has: "
                    f"{', '.join(model.methods)}", model=model.name, methods=list(model.methods))
    return method


def encode_explanation(model, explanations):
    """The answer every protocol's explanation route gives: the model, its version and explain_model's
    "explanations" (shap's layout: contributions [rows][features][outputs], expected_value [outputs])."""
    return {"model": model.name, "version": str(model.version), "explanations": explanations}


_EXPLANATION_SCHEMAS = {
    "Explanations": {"type": "object", "required": ["expected_value", "contributions", "feature_names",
                                                    "output_names"], "properties": {
        "method": {"type": "string", "description": "the method explained: predict_proba, decision_function, "
                                                    "predict"},
        "output": {"type": "string", "description": "what that method's outputs are"},
        "expected_value": {"type": "array", "items": {"type": "number"}, "description": "per output"},
        "contributions": {"type": "array", "description": "[rows][features][outputs]; with expected_value they "
                                                          "add up to the method's answer for each row",
                          "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
        "feature_names": {"type": "array", "items": {"type": "string"}},
        "output_names": {"type": "array", "items": {"type": "string"}}}},
    "ExplainResponse": {"type": "object", "required": ["model", "version", "explanations"], "properties": {
        "model": {"type": "string"}, "version": {"type": "string"}, "explanations": _schema_ref("Explanations")}},
}


def _instances_or_inputs(payload):
    """(rows, columnar?) from a body holding exactly one of "instances" (rows) or "inputs" (TF's wording)."""
    has_instances, has_inputs = "instances" in payload, "inputs" in payload
    if has_instances and has_inputs:
        raise BadRequest("expecting only one of 'inputs' or 'instances' keys")
    if not has_instances and not has_inputs:
        raise BadRequest("Missing 'inputs' or 'instances' key")
    return (payload["inputs"], True) if has_inputs else (payload["instances"], False)


def model_inputs(model, rows, max_rows):
    """Turn decoded JSON into what the estimator takes.

    Tabular models (those that know `n_features_in_`) get a 2-D array of their columns
    in feature order (LoadedModel makes it a DataFrame for scikit-learn where the model
    wants one); rows may be lists or objects keyed by feature name, and columns may
    come as {feature: [values]}.  Every other model
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
        else:
            matrix[np.equal(matrix, None)] = math.nan        # null is a missing value, as in rows of numbers
    if matrix is None or matrix.ndim != 2:
        raise BadRequest(f"each instance must be a list of {model.n_features} feature values", model=model.name)
    if matrix.shape[1] != model.n_features:
        raise BadRequest(f"expected {model.n_features} features, got {matrix.shape[1]}", model=model.name)
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
                raise BadRequest(f"instance {number}, feature {model.feature_label(position)}: "
                                 f"{_clip(json.dumps(value), 40)} is "
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


# -- the native API --------------------------------------------------------------------------------


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


def encode_prediction(model, method, outputs):
    answer = {"model": model.name, "version": str(model.version), "method": method,
              "predictions": to_jsonable(outputs)}
    if method in ("predict_proba", "predict_log_proba") and model.classes is not None:
        answer["classes"] = model.classes
    return answer


@dataclasses.dataclass(frozen=True)
class NativeRequest:
    """What a native (or seed) predict request asks for: its parsed body, and ?method= (decode_payload reads
    them once the model is known)."""

    payload: object
    method: str = None
    explain: bool = False       # the explain route: the rows' explanations, not a prediction


def _native_routes(suffix, what, way):
    prefix = "/models/{name}" + suffix
    return (Route("POST", prefix + "/predict", "predict", TOKEN, f"predict (native API){what}", "predict",
                  "PredictResponse", "PredictRequest", link="predict" + (f"_{way}" if way else ""),
                  per_model=way is None),
            Route("GET", prefix + "/predict", "predict", TOKEN, f"predict with ?instances=<JSON>{what}", "predict",
                  "PredictResponse", query=("instances",), per_model=way is None),
            Route("POST", prefix + "/explain", "predict", TOKEN, f"explain predictions: each feature's contribution"
                  f"{what} (501 for a model that cannot be explained exactly)", "predict", "ExplainResponse",
                  "ExplainRequest", args=(("explain", True),)))


class NativeAPI(Protocol):
    """The native API: {"instances" | "inputs": rows, "method": name}, or ?instances=<JSON> on a GET."""

    name = "native"
    routes = for_each_version(_native_routes)
    schemas = {
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
        "ExplainRequest": {"oneOf": [
            {"type": "object", "required": ["instances"], "properties": {"instances": _ROWS}},
            {"type": "object", "required": ["inputs"], "properties": {
                "inputs": {"oneOf": [_ROWS, {"type": "object"}]}}},
            _ROWS]},
        **_EXPLANATION_SCHEMAS,
    }
    examples = {"PredictRequest": {"instances": [[5.1, 3.5, 1.4, 0.2]]},      # iris's rows, as in README
                "ExplainRequest": {"instances": [[5.1, 3.5, 1.4, 0.2]]}}

    def read(self, request, config, explain=False):
        environ = request.environ
        if explain:
            return NativeRequest(json_body(environ, config), explain=True)
        if environ["REQUEST_METHOD"] != "GET":
            return NativeRequest(json_body(environ, config), _query_method(request))
        text = request.query.get("instances")
        if text is None:
            raise BadRequest("GET predict needs ?instances=<JSON list of instances>")
        return NativeRequest({"instances": parse_json(text, config.max_depth, "?instances")}, _query_method(request))

    def inputs(self, model, asked, config):
        rows, method = decode_payload(asked.payload, asked.method)
        if asked.explain and method is not None:
            raise BadRequest("an explanation names no method: it explains the method its model's family is "
                             "explained by (see the answer's \"method\")", model=model.name)
        return [EXPLAIN if asked.explain else choose_method(model, method)], model_inputs(model, rows, config.max_rows)

    def encode(self, model, asked, results):
        (method, outputs), = results.items()
        return encode_explanation(model, outputs) if asked.explain else encode_prediction(model, method, outputs)


def _query_method(request):
    """?method=NAME, read only when there is a query string (parsing one costs a few microseconds)."""
    return request.query.get("method") if request.environ.get("QUERY_STRING") else None


# -- the seed course's routes ----------------------------------------------------------------------


class SeedRoutes(NativeAPI):
    """The seed course's routes on the default model: GET /predict/<sentence> and POST /predict."""

    name = "seed"
    routes = (
        Route("POST", "/predict", "predict", TOKEN, "predict with the default model", "predict", "PredictResponse",
              "PredictRequest"),
        Route("GET", "/predict/{sentence}", "predict", TOKEN,
              "predict with the default model: the seed course's route, instances as JSON or a Python literal",
              "predict", "PredictResponse"),
    )
    schemas, examples = {}, {}          # the native API's

    def read(self, request, config, sentence=None):
        if sentence is None:
            return super().read(request, config)
        return NativeRequest({"instances": parse_literal(sentence, config.max_depth)}, _query_method(request))


# -- TensorFlow Serving REST and KServe V1 ---------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class TFRequest:
    """What a TF Serving request asks for: its verb, its rows, whether they came as columns, the method."""

    verb: str
    rows: object
    columnar: bool
    method: str


def _tf_routes(suffix, what, way):
    prefix = "/v1/models/{name}" + suffix
    rows = [Route("GET", prefix, "v1_status", TOKEN, f"TF Serving status merged with KServe V1 readiness{what}",
                  "tf-serving", "TFStatus"),
            Route("GET", prefix + "/metadata", "v1_metadata", TOKEN, f"TF Serving signatures{what}", "tf-serving")]
    for verb, body, answer in (("predict", "TFPredictRequest", "TFPredictResponse"),
                               ("classify", "TFExamples", "TFResults"), ("regress", "TFExamples", "TFResults"),
                               ("explain", "TFPredictRequest", "ExplainResponse")):
        rows.append(Route("POST", f"{prefix}:{verb}", "predict", TOKEN,
                          f"{'KServe V1' if verb == 'explain' else 'TF Serving'} {verb}{what}" +
                          (" (501 for a model that cannot be explained exactly)" if verb == "explain" else ""),
                          "tf-serving", answer, body, args=(("verb", verb),)))
    return rows


class TFServing(Protocol):
    """TF Serving REST and KServe V1: :predict (rows or columns), :classify and :regress (examples), KServe's
    :explain (a :predict body; its signature_name is not read), a model's status and signatures."""

    name = "tf"
    routes = (Route("GET", "/v1/models", "model_names", TOKEN, "model names (KServe V1)", "tf-serving"),) + \
        for_each_version(_tf_routes)
    schemas = {
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
    }
    examples = {
        "TFPredictRequest": {"signature_name": "serving_default", "instances": [[5.1, 3.5, 1.4, 0.2]]},
        "TFExamples": {"examples": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                                     "petal_width": 0.2}]},
    }

    def read(self, request, config, verb):
        payload = json_body(request.environ, config)
        if verb == "predict":
            return TFRequest(verb, *tf_predict_request(payload))
        if verb == "explain":
            rows, columnar, _ = tf_predict_request(payload)
            return TFRequest(verb, rows, columnar, EXPLAIN)
        return TFRequest(verb, tf_examples(payload), False, "predict_proba" if verb == "classify" else "predict")

    def inputs(self, model, asked, config):
        verb = asked.verb
        method = EXPLAIN if verb == "explain" else choose_method(model, asked.method, unknown=BadRequest)
        if verb == "classify" and model.classes is None:
            raise BadRequest(f"model {model.name!r} does not name its classes, so it cannot classify",
                             model=model.name)
        if verb == "regress" and model.classes is not None:
            raise BadRequest(f"model {model.name!r} is a classifier: use :classify or :predict, not :regress",
                             model=model.name)
        return [method], model_inputs(model, asked.rows, config.max_rows)

    def encode(self, model, asked, results):
        if asked.verb == "explain":
            return encode_explanation(model, results[EXPLAIN])
        outputs = to_jsonable(results[asked.method])
        if asked.verb == "predict":
            return {"outputs" if asked.columnar else "predictions": outputs}
        if asked.verb == "regress":
            return {"results": outputs}
        return {"results": [[[str(label), score] for label, score in zip(model.classes, row)] for row in outputs]}

    def v1_status(self, app, name, version=None, label=None):
        """TF's model_version_status merged with KServe V1's {"name", "ready"}; 503 when nothing can serve."""
        entry = app.registry.entry(name)
        slots = ([app.registry.slot(name, version, label)] if version is not None or label is not None else
                 [entry.versions[number] for number in entry.served])
        ready = any(slot.state != FAILED for slot in slots)
        status = {"name": name, "ready": ready, "model_version_status": [tf_version_status(s) for s in slots]}
        if not ready:
            raise ModelUnavailable(f"model {name!r} has no version that can serve", **status)
        return status

    def v1_metadata(self, app, name, version=None, label=None):
        with app.registry.using(name, version, label) as model:        # its metadata needs the estimator
            return {"model_spec": {"name": name, "signature_name": "", "version": str(model.version)},
                    "metadata": {"signature_def": {"signature_def": tf_signatures(model)}}}


# -- Open Inference Protocol (V2) ------------------------------------------------------------------

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
        where, count = _v2_tensor(number, name, shape, max_rows)
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
    parameters = _v2_parameters(request, "the request")
    everything_binary = bool(parameters.get("binary_data_output"))
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
    explain = parameters.get("explain", False)          # the rows' explanations, as the "explain" output
    if not isinstance(explain, bool):
        raise BadRequest('"parameters": {"explain"} must be a boolean')
    if explain:
        wanted[EXPLAIN] = True
        if everything_binary:
            binary_outputs.add(EXPLAIN)
    return arrays, list(wanted), binary_outputs


def _v2_tensor(number, name, shape, max_rows):
    """(how messages name input `number`, its element count), once its name and shape are checked."""
    if not isinstance(name, str) or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"inputs[{number}] needs a \"name\" and a \"shape\" of sizes")
    where = f"input {_clip(repr(name), 60)}"
    if shape and shape[0] > max_rows:
        raise BadRequest(f"{where}: {shape[0]} rows is over the limit of {max_rows}")
    return where, math.prod(shape)


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
    return array.astype(np.float64)


def v2_tensors(results):
    """(name, method, array, datatype) of each output tensor of {method: result}: one per method, or one per
    output of a multi-output classifier's list of arrays ("<method>_<output>"); a list of values (a model of
    your own may answer so) is one tensor.  An explanation is one BYTES element, its JSON text, as MLServer's
    explainer runtime answers it (an output named "explain", content type "str")."""
    import numpy as np

    for method, result in results.items():
        if method == EXPLAIN:
            text = np.empty(1, dtype=object)
            text[0] = dumps(result)
            yield EXPLAIN, EXPLAIN, text, "BYTES"
            continue
        per_output = isinstance(result, list) and all(hasattr(part, "shape") for part in result)
        for number, part in enumerate(result if per_output else [result]):
            array = np.asarray(part.toarray() if hasattr(part, "toarray") else part)
            yield f"{method}_{number}" if per_output else method, method, array, v2_datatype(array)


def v2_bytes(array, datatype):
    """A tensor's binary form: little-endian values, or BYTES as 4-byte lengths each followed by UTF-8 text."""
    import numpy as np

    if datatype == "BYTES":
        return b"".join(len(b).to_bytes(4, "little") + b
                        for b in (str(item).encode("utf-8") for item in array.reshape(-1).tolist()))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def v2_outputs(model, results, binary_outputs):
    """(JSON outputs, binary tail) for {method: result}; binary for the outputs asked that way."""
    outputs, chunks = [], []
    for name, method, array, datatype in v2_tensors(results):
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if method == EXPLAIN:
            entry["parameters"] = {"content_type": "str"}
        if method in binary_outputs:
            data = v2_bytes(array, datatype)
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = to_jsonable(array.reshape(-1))
        outputs.append(entry)
    return outputs, b"".join(chunks)


V2_REPOSITORY_STATES = {UNLOADED: "UNAVAILABLE", LOADING: "LOADING", AVAILABLE: "READY", UNLOADING: "UNLOADING",
                        FAILED: "UNAVAILABLE"}


@dataclasses.dataclass(frozen=True)
class V2Request:
    """What a V2 infer request asks for: its input tensors [(name, array)], the outputs (methods) it wants,
    those it wants binary, its "id" (None: it sent none) and parameters.routing_key as sent."""

    arrays: list
    outputs: list
    binary_outputs: set
    id: str = None
    routing_key: object = None


def _v2_routes(suffix, what, way):
    prefix = "/v2/models/{name}" + suffix
    return (Route("GET", prefix, "v2_model_metadata", TOKEN, f"V2 model metadata{what}", "v2", "V2Metadata"),
            Route("GET", prefix + "/ready", "v2_model_ready", TOKEN, f"V2 model readiness{what}", "v2"),
            Route("POST", prefix + "/infer", "predict", TOKEN,
                  f"V2 inference{what} (JSON; binary tensors with Inference-Header-Content-Length)", "v2",
                  "V2InferResponse", "V2InferRequest"))


class OpenInference(Protocol):
    """The Open Inference Protocol (KServe V2): JSON tensors, or binary ones after
    Inference-Header-Content-Length; server and model metadata, readiness, and the model repository."""

    name = "v2"
    routes = (
        Route("GET", "/v2", "v2_server", TOKEN, "server metadata", "v2"),
        Route("GET", "/v2/health/live", "v2_live", OPEN, "liveness", "v2"),
        Route("GET", "/v2/health/ready", "ready", OPEN, "readiness", "v2"),
        Route("GET", "/v2/models", "model_names", TOKEN, "model names", "v2"),
        Route("POST", "/v2/repository/index", "v2_repository_index", TOKEN, "every served version and its state",
              "v2", "array", "Optional"),
        Route("POST", "/v2/repository/models/{name}/load", "v2_repository_action", ADMIN,
              "load a model of the store (admin token)", "v2", body="Optional", args=(("action", "load"),)),
        Route("POST", "/v2/repository/models/{name}/unload", "v2_repository_action", ADMIN,
              "unload a model of the store (admin token)", "v2", body="Optional", args=(("action", "unload"),)),
    ) + for_each_version(_v2_routes, labels=False)
    schemas = {
        "V2Tensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": list(V2_DTYPES) + ["BYTES"]},
            "parameters": {"type": "object"}, "data": {"type": "array"}}},
        "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object", "properties": {
                "explain": {"type": "boolean", "description": "also answer the \"explain\" output: one BYTES "
                                                             "element, the rows' explanations as JSON text"},
                "routing_key": {"type": "string"}, "binary_data_output": {"type": "boolean"}}},
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
    }
    examples = {"V2InferRequest": {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                               "data": [5.1, 3.5, 1.4, 0.2]}]}}

    def read(self, request, config):
        environ = request.environ
        check_content_type(environ)
        header, binary = v2_split_body(environ, read_body(environ, config.max_body_bytes))
        payload = parse_json(header, config.max_depth)
        arrays, outputs, binary_outputs = v2_request(payload, binary, config.max_rows)
        return V2Request(arrays, outputs, binary_outputs, payload.get("id"),
                         (payload.get("parameters") or {}).get("routing_key"))

    def routing_key(self, environ, asked):
        """The X-Routing-Key header, or the request's "parameters": {"routing_key": "..."} (V2's requests
        carry parameters); None if empty."""
        key = environ.get("HTTP_X_ROUTING_KEY")
        if key is None:
            key = asked.routing_key
            if key is not None and not isinstance(key, str):
                raise BadRequest('"parameters": {"routing_key"} must be a string')
        return key or None

    def inputs(self, model, asked, config):
        """The outputs asked are methods, "explain" among them (as an output or a parameter)."""
        return ([method if method == EXPLAIN else choose_method(model, method, unknown=BadRequest)
                 for method in asked.outputs], v2_inputs(model, asked.arrays, config.max_rows))

    def encode(self, model, asked, results):
        outputs, tail = v2_outputs(model, results, asked.binary_outputs)
        answer = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
        if asked.id is not None:
            answer["id"] = asked.id
        if not tail:
            return answer
        text = dumps(answer).encode("utf-8")
        return bottle.HTTPResponse(text + tail, headers={"Content-Type": "application/octet-stream",
                                                         "Inference-Header-Content-Length": str(len(text))})

    def v2_server(self, app):
        return {"name": SERVICE_NAME, "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}

    def v2_live(self, app):
        return {"live": True}

    def v2_model_ready(self, app, name, version=None):
        slot = app.registry.slot(name, version)
        if slot.state == FAILED:
            raise slot.load_failure(name=name, ready=False)
        return {"name": name, "ready": True}

    def v2_model_metadata(self, app, name, version=None):
        with app.registry.using(name, version) as model:               # its metadata needs the estimator
            return v2_metadata(model, app.registry.entry(name).served_versions())

    def v2_repository_index(self, app):
        asked = json_body(bottle.request.environ, app.config, required=False)
        return v2_repository_index(app.registry, isinstance(asked, dict) and asked.get("ready") is True)

    def v2_repository_action(self, app, name, action):
        asked = json_body(bottle.request.environ, app.config, required=False)
        parameters = asked.get("parameters") if isinstance(asked, dict) else None
        v2_repository_action(app.registry, name, action, parameters if isinstance(parameters, dict) else ())
        return {}


def v2_repository_index(registry, only_ready):
    """Every served version with its V2 state (and why it cannot serve), or only the READY ones."""
    index = []
    for info in registry.describe_all():
        for version in info["versions"]:
            state = V2_REPOSITORY_STATES[version["state"]]
            if version["served"] and (not only_ready or state == "READY"):
                index.append({"name": info["name"], "version": version["version"], "state": state,
                              "reason": _clip(version["last_error"] or "", 300)})
    return index


def v2_repository_action(registry, name, action, parameters):
    """The repository's load (again) or unload of a model already in the store; the parameters with which
    other servers load a model from elsewhere (a config, files) are refused."""
    if any(key == "config" or key.startswith("file:") for key in parameters):
        raise BadRequest("models are loaded only from the model store: \"config\" and \"file:\" parameters "
                         "are refused")
    if action == "load":
        registry.reload(name)
        for number in registry.entry(name).served:
            registry.get(name, number)
    else:
        registry.unload(name)


# -- The Open Inference Protocol over gRPC -------------------------------------------------------

# KServe's grpc_predict_v2.proto (the service and messages of the Open Inference Protocol), with the model
# repository extension's messages as Triton defines them, which tritonclient.grpc and MLServer's clients use.
# The descriptor is built from this text when the gRPC server starts (grpc_messages): no generated code
# to keep beside the one file, and no protoc.  Only the parts the parser reads: messages (nested ones
# too), scalar, message, repeated, map<string, T> and oneof fields, and one service of unary RPCs.
GRPC_PROTO = """
service GRPCInferenceService {
  rpc ServerLive(ServerLiveRequest) returns (ServerLiveResponse);
  rpc ServerReady(ServerReadyRequest) returns (ServerReadyResponse);
  rpc ModelReady(ModelReadyRequest) returns (ModelReadyResponse);
  rpc ServerMetadata(ServerMetadataRequest) returns (ServerMetadataResponse);
  rpc ModelMetadata(ModelMetadataRequest) returns (ModelMetadataResponse);
  rpc ModelInfer(ModelInferRequest) returns (ModelInferResponse);
  rpc RepositoryIndex(RepositoryIndexRequest) returns (RepositoryIndexResponse);
  rpc RepositoryModelLoad(RepositoryModelLoadRequest) returns (RepositoryModelLoadResponse);
  rpc RepositoryModelUnload(RepositoryModelUnloadRequest) returns (RepositoryModelUnloadResponse);
}
message ServerLiveRequest {}
message ServerLiveResponse { bool live = 1; }
message ServerReadyRequest {}
message ServerReadyResponse { bool ready = 1; }
message ModelReadyRequest { string name = 1; string version = 2; }
message ModelReadyResponse { bool ready = 1; }
message ServerMetadataRequest {}
message ServerMetadataResponse { string name = 1; string version = 2; repeated string extensions = 3; }
message ModelMetadataRequest { string name = 1; string version = 2; }
message ModelMetadataResponse {
  message TensorMetadata { string name = 1; string datatype = 2; repeated int64 shape = 3; }
  string name = 1; repeated string versions = 2; string platform = 3;
  repeated TensorMetadata inputs = 4; repeated TensorMetadata outputs = 5;
}
message ModelInferRequest {
  message InferInputTensor {
    string name = 1; string datatype = 2; repeated int64 shape = 3;
    map<string, InferParameter> parameters = 4; InferTensorContents contents = 5;
  }
  message InferRequestedOutputTensor { string name = 1; map<string, InferParameter> parameters = 2; }
  string model_name = 1; string model_version = 2; string id = 3; map<string, InferParameter> parameters = 4;
  repeated InferInputTensor inputs = 5; repeated InferRequestedOutputTensor outputs = 6;
  repeated bytes raw_input_contents = 7;
}
message ModelInferResponse {
  message InferOutputTensor {
    string name = 1; string datatype = 2; repeated int64 shape = 3;
    map<string, InferParameter> parameters = 4; InferTensorContents contents = 5;
  }
  string model_name = 1; string model_version = 2; string id = 3; map<string, InferParameter> parameters = 4;
  repeated InferOutputTensor outputs = 5; repeated bytes raw_output_contents = 6;
}
message InferParameter {
  oneof parameter_choice { bool bool_param = 1; int64 int64_param = 2; string string_param = 3;
                           double double_param = 4; uint64 uint64_param = 5; }
}
message InferTensorContents {
  repeated bool bool_contents = 1; repeated int32 int_contents = 2; repeated int64 int64_contents = 3;
  repeated uint32 uint_contents = 4; repeated uint64 uint64_contents = 5; repeated float fp32_contents = 6;
  repeated double fp64_contents = 7; repeated bytes bytes_contents = 8;
}
message ModelRepositoryParameter {
  oneof parameter_choice { bool bool_param = 1; int64 int64_param = 2; string string_param = 3;
                           bytes bytes_param = 4; }
}
message RepositoryIndexRequest { string repository_name = 1; bool ready = 2; }
message RepositoryIndexResponse {
  message ModelIndex { string name = 1; string version = 2; string state = 3; string reason = 4; }
  repeated ModelIndex models = 1;
}
message RepositoryModelLoadRequest {
  string repository_name = 1; string model_name = 2; map<string, ModelRepositoryParameter> parameters = 3;
}
message RepositoryModelLoadResponse {}
message RepositoryModelUnloadRequest {
  string repository_name = 1; string model_name = 2; map<string, ModelRepositoryParameter> parameters = 3;
}
message RepositoryModelUnloadResponse {}
"""
GRPC_PACKAGE, GRPC_SERVICE = "inference", "inference.GRPCInferenceService"
_PROTO_TOKEN = re.compile(r"map<\s*\w+\s*,\s*\w+\s*>|\w+|[{}();=]")
_PROTO_SCALARS = ("bool", "string", "bytes", "int32", "int64", "uint32", "uint64", "float", "double")


@functools.lru_cache(maxsize=None)
def grpc_messages():
    """{message name: generated class} and the service's methods {name: (request, response)}, from GRPC_PROTO."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="grpc_predict_v2.proto", package=GRPC_PACKAGE, syntax="proto3")
    methods = _ProtoReader(_PROTO_TOKEN.findall(GRPC_PROTO), descriptor_pb2.FieldDescriptorProto).read(file)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    classes = {message.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{GRPC_PACKAGE}.{message.name}"))
               for message in file.message_type}
    return classes, methods


class _ProtoReader:
    """Reads GRPC_PROTO's tokens into a FileDescriptorProto (message, field and service declarations)."""

    def __init__(self, tokens, field_type):
        self.tokens, self.position, self.F = tokens, 0, field_type

    def take(self, expected=None):
        token = self.tokens[self.position]
        self.position += 1
        if expected is not None and token != expected:
            raise ValueError(f"GRPC_PROTO: {expected!r} expected, not {token!r}")
        return token

    def read(self, file):
        methods = {}
        while self.position < len(self.tokens):
            if self.take() == "message":
                self.message(file.message_type, f".{GRPC_PACKAGE}")
                continue
            service = file.service.add(name=self.take())
            self.take("{")
            while self.take() != "}":                   # rpc Name(Request) returns (Response);
                name = self.take()
                request = self.take("(") and self.take()
                response = self.take(")") and self.take("returns") and self.take("(") and self.take()
                self.take(")"), self.take(";")
                service.method.add(name=name, input_type=f".{GRPC_PACKAGE}.{request}",
                                   output_type=f".{GRPC_PACKAGE}.{response}")
                methods[name] = (request, response)
        return methods

    def message(self, into, scope):
        message = into.add(name=self.take())
        scope = f"{scope}.{message.name}"
        self.take("{")
        while (token := self.take()) != "}":
            if token == "message":
                self.message(message.nested_type, scope)
            elif token == "oneof":
                message.oneof_decl.add(name=self.take())
                self.take("{")
                while self.tokens[self.position] != "}":
                    self.field(message, scope, self.take(), oneof=len(message.oneof_decl) - 1)
                self.take("}")
            else:
                self.field(message, scope, token)

    def field(self, message, scope, kind, oneof=None):
        F = self.F
        label = F.LABEL_REPEATED if kind == "repeated" else F.LABEL_OPTIONAL
        kind = self.take() if kind == "repeated" else kind
        name = self.take()
        self.take("=")
        field = message.field.add(name=name, number=int(self.take()), label=label)
        self.take(";")
        if oneof is not None:
            field.oneof_index = oneof
        if kind.startswith("map<"):                     # a repeated entry message with map_entry set
            key, value = re.findall(r"\w+", kind)[1:]
            entry = message.nested_type.add(name="".join(part.title() for part in name.split("_")) + "Entry")
            entry.options.map_entry = True
            self.typed(entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL), key, scope)
            self.typed(entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL), value, scope)
            field.label, field.type, field.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f"{scope}.{entry.name}"
        else:
            self.typed(field, kind, scope, nested={nested.name for nested in message.nested_type})

    def typed(self, field, kind, scope, nested=()):
        if kind in _PROTO_SCALARS:
            field.type = getattr(self.F, f"TYPE_{kind.upper()}")
        else:                                           # a message: nested in this one, or the file's
            field.type = self.F.TYPE_MESSAGE
            field.type_name = f"{scope}.{kind}" if kind in nested else f".{GRPC_PACKAGE}.{kind}"


# Which InferTensorContents field holds a datatype's values (FP16 travels only raw, as the proto says).
GRPC_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                 "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                 "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                 "FP64": "fp64_contents", "BYTES": "bytes_contents"}
# A refusal's gRPC status by its HTTP status (an overload is RESOURCE_EXHAUSTED: see grpc_status).
GRPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 414: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
               501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def grpc_status(error):
    """The name of the grpc.StatusCode a refusal is answered with (INTERNAL for the service's own faults)."""
    return "RESOURCE_EXHAUSTED" if isinstance(error, Overloaded) else GRPC_STATUS.get(error.status, "INTERNAL")


def _v2_from_contents(contents, datatype, count, where):
    """A tensor from its typed InferTensorContents (the field its datatype names), checked against its shape."""
    import numpy as np

    field = GRPC_CONTENTS.get(datatype)
    if field is None:
        _v2_dtype(datatype, where)              # BF16 and unknown names: refused as over HTTP
        raise BadRequest(f"{where}: {datatype} values travel only in raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(f"{where}: {len(values)} values in {field} do not fill its shape ({count} expected)")
    if datatype == "BYTES":
        try:
            items = [value.decode("utf-8") for value in values]
        except UnicodeDecodeError:
            raise BadRequest(f"{where}: BYTES elements must be UTF-8 text") from None
        array = np.empty(count, dtype=object)
        array[:] = items
        return array
    try:
        return np.array(values, dtype=V2_DTYPES[datatype])
    except OverflowError:
        raise BadRequest(f"{where}: a value does not fit datatype {datatype}") from None


@dataclasses.dataclass(frozen=True)
class GrpcCall:
    """One gRPC call as the service sees it: the RPC, its metadata (lower-case keys) and its peer."""

    rpc: str
    metadata: dict
    peer: str

    def environ(self, protocol):
        """A WSGI-like environ for the predict core and the records every request leaves (metrics, payload log,
        access log): the RPC as the path, the metadata's authorization, request id and routing key as headers."""
        headers = {f"HTTP_{key.upper().replace('-', '_')}": value for key, value in self.metadata.items()
                   if key in ("authorization", "x-request-id", "x-routing-key") and isinstance(value, str)}
        return {"REQUEST_METHOD": "POST", "PATH_INFO": f"/{GRPC_SERVICE}/{self.rpc}", "REMOTE_ADDR": self.peer,
                "service.protocol": protocol, **headers}


class OpenInferenceGrpc(OpenInference):
    """The Open Inference Protocol over gRPC (inference.GRPCInferenceService, with the repository extension):
    no HTTP rows, its RPCs served by the gRPC server (Serving: start_grpc_server) on --grpc-port.

    A ModelInfer request becomes the same V2Request the HTTP route reads (typed `contents` or
    `raw_input_contents`, checked by the same rules and limits) and goes through the same core; its answer
    carries raw_output_contents when the request sent raw inputs (as Triton answers), else typed contents.
    Every RPC is (handler, access) in RPCS: access is the HTTP routes' (OPEN, TOKEN, ADMIN), tokens
    coming from the call's `authorization` metadata."""

    name = "grpc"
    routes = ()
    RPCS = {"ServerLive": ("server_live", OPEN), "ServerReady": ("server_ready", OPEN),
            "ModelReady": ("model_ready", TOKEN), "ServerMetadata": ("server_metadata", TOKEN),
            "ModelMetadata": ("model_metadata", TOKEN), "ModelInfer": ("model_infer", TOKEN),
            "RepositoryIndex": ("repository_index", TOKEN), "RepositoryModelLoad": ("repository_load", ADMIN),
            "RepositoryModelUnload": ("repository_unload", ADMIN)}

    def read_message(self, request, config):
        """The V2Request of a ModelInferRequest."""
        raw = list(request.raw_input_contents)
        if not request.inputs:
            raise BadRequest("a ModelInferRequest needs inputs")
        if raw and len(raw) != len(request.inputs):
            raise BadRequest(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs")
        arrays = []
        for number, tensor in enumerate(request.inputs):
            shape = list(tensor.shape)
            where, count = _v2_tensor(number, tensor.name, shape, config.max_rows)
            array = _v2_from_bytes(raw[number], tensor.datatype, count, where) if raw else \
                _v2_from_contents(tensor.contents, tensor.datatype, count, where)
            arrays.append((tensor.name, array.reshape(shape)))
        outputs = list(dict.fromkeys(output.name for output in request.outputs)) or ["predict"]
        explain = request.parameters["explain"] if "explain" in request.parameters else None
        if explain is not None and explain.WhichOneof("parameter_choice") != "bool_param":
            raise BadRequest('parameters["explain"] must be a bool_param')
        if explain is not None and explain.bool_param and EXPLAIN not in outputs:
            outputs.append(EXPLAIN)
        key = request.parameters["routing_key"] if "routing_key" in request.parameters else None
        if key is not None and key.WhichOneof("parameter_choice") != "string_param":
            raise BadRequest('parameters["routing_key"] must be a string_param')
        return V2Request(arrays, outputs, set(outputs) if raw else set(), request.id or None,
                         None if key is None else key.string_param)

    def encode_message(self, model, asked, results, response):
        """Fill a ModelInferResponse with {method: outputs}: raw where the request was raw, else typed."""
        response.model_name, response.model_version, response.id = model.name, str(model.version), asked.id or ""
        for name, method, array, datatype in v2_tensors(results):
            tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            if method == EXPLAIN:
                tensor.parameters["content_type"].string_param = "str"
            if method in asked.binary_outputs:
                response.raw_output_contents.append(v2_bytes(array, datatype))
            elif datatype == "BYTES":
                tensor.contents.bytes_contents.extend(str(item).encode("utf-8") for item in array.reshape(-1).tolist())
            else:
                getattr(tensor.contents, GRPC_CONTENTS[datatype]).extend(array.reshape(-1).tolist())
        return response

    # -- the RPCs: (app, request message, response message, environ) -> the response -------------------------
    def server_live(self, app, request, response, environ):
        response.live = True
        return response

    def server_ready(self, app, request, response, environ):
        response.ready = app.registry.not_ready_reason() is None
        return response

    def model_ready(self, app, request, response, environ):
        slot = app.registry.slot(request.name, _grpc_version(request.version, request.name))
        response.ready = slot.state != FAILED
        return response

    def server_metadata(self, app, request, response, environ):
        response.name, response.version = SERVICE_NAME, __version__
        response.extensions.append("model_repository")
        return response

    def model_metadata(self, app, request, response, environ):
        with app.registry.using(request.name, _grpc_version(request.version, request.name)) as model:
            metadata = v2_metadata(model, app.registry.entry(request.name).served_versions())
        response.name, response.platform = metadata["name"], metadata["platform"]
        response.versions.extend(metadata["versions"])
        for spec in metadata["inputs"]:
            response.inputs.add(**spec)
        for spec in metadata["outputs"]:
            response.outputs.add(**spec)
        return response

    def model_infer(self, app, request, response, environ):
        model, asked, results = app.predicted(self, lambda: self.read_message(request, app.config), environ,
                                              request.model_name,
                                              _grpc_version(request.model_version, request.model_name), None)
        with app.tracing.span("encode") if app.tracing.enabled else _NO_SPAN:
            return self.encode_message(model, asked, results, response)

    def repository_index(self, app, request, response, environ):
        for entry in v2_repository_index(app.registry, request.ready):
            response.models.add(**entry)
        return response

    def repository_load(self, app, request, response, environ):
        v2_repository_action(app.registry, request.model_name, "load", request.parameters)
        return response

    def repository_unload(self, app, request, response, environ):
        v2_repository_action(app.registry, request.model_name, "unload", request.parameters)
        return response


def _grpc_version(text, name):
    """A message's version ("" for none) as the number the service uses inside."""
    return version_number(text, name) if text else None


# -- MLflow scoring --------------------------------------------------------------------------------

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


class MLflowScoring(Protocol):
    """MLflow's scoring server: POST /invocations (JSON or CSV) on the default model, its error fields, and its
    probes.  The request record is the rows, or an MLflowTable."""

    name = "mlflow"
    routes = (
        Route("GET", "/ping", "alive", OPEN, "liveness (MLflow)", "mlflow"),
        Route("GET", "/health", "alive", OPEN, "liveness (MLflow)", "mlflow"),
        Route("GET", "/version", "mlflow_version", TOKEN, "the service version (MLflow)", "mlflow", "text"),
        Route("POST", "/invocations", "predict", TOKEN, "predict with the default model (MLflow scoring)", "mlflow",
              "Predictions", "MLflowRequest"),
    )
    schemas = {
        "MLflowRequest": {"type": "object", "properties": {
            "dataframe_split": {"type": "object", "properties": {"columns": {"type": "array"},
                                                                 "data": {"type": "array"}}},
            "dataframe_records": {"type": "array", "items": {"type": "object"}},
            "instances": _ROWS, "inputs": _ANY, "params": {"type": "object"}}},
        "Predictions": {"type": "object", "required": ["predictions"],
                        "properties": {"predictions": {"type": "array"}}},
    }
    examples = {"MLflowRequest": {"dataframe_split": {
        "columns": ["sepal_length", "sepal_width", "petal_length", "petal_width"], "data": [[5.1, 3.5, 1.4, 0.2]]}}}
    bodies = {"MLflowRequest": {"required": True, "content": {
        JSON_TYPE: {"schema": _schema_ref("MLflowRequest"), "example": examples["MLflowRequest"]},
        "text/csv": {"schema": {"type": "string"}}}}}

    def read(self, request, config):
        return mlflow_rows(request.environ, read_body(request.environ, config.max_body_bytes), config.max_depth)

    def inputs(self, model, rows, config):
        return ["predict"], mlflow_inputs(model, rows, config.max_rows)

    def encode(self, model, rows, results):
        return {"predictions": to_jsonable(results["predict"])}

    def error(self, error):
        return {**error.to_dict(), "error_code": MLFLOW_ERROR_CODES.get(error.status, "BAD_REQUEST"),
                "message": error.message}

    def mlflow_version(self, app):
        return bottle.HTTPResponse(__version__, headers={"Content-Type": "text/plain; charset=utf-8"})


# -- registration ----------------------------------------------------------------------------------

GRPC = OpenInferenceGrpc()
PROTOCOLS = (NativeAPI(), SeedRoutes(), TFServing(), OpenInference(), GRPC, MLflowScoring())
BODY_EXAMPLES = {kind: example for protocol in PROTOCOLS for kind, example in protocol.examples.items()}


###############################################################################
# Background work #############################################################
###############################################################################
# What runs beside the requests, off their path: predictions bounded in time (TimeLimit), and what a
# request hands over after its answer (a Backlog each for the payload log and the shadow); the payload
# log's rows also feed the live drift gauges (LiveDrift).


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
        if self._pid != os.getpid():
            self._start()
        deadline = time.monotonic() + self.seconds
        future, handed = concurrent.futures.Future(), held[:]
        held.clear()
        context = contextvars.copy_context()        # the request's span and log fields, on the predict thread

        def task():
            try:
                if time.monotonic() >= deadline:
                    raise PredictionTimeout("not started: the predict threads were busy past the time limit")
                future.set_result(context.run(compute))
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


_SCALARS = frozenset((int, float, bool, str, bytes, type(None)))


def held_bytes(*values, limit=math.inf):
    """The bytes of memory `values` hold, counted from the objects themselves, never from what a request
    claimed (a Content-Length, a shape): a numpy array by its buffer (a view by its base's; an object
    array's items too), a DataFrame by its values, other objects by sys.getsizeof and what they hold.
    Each container is counted once; the numbers and texts of one list or array are summed at C speed, so
    one object they repeat counts each time (an estimate from above).  The walk stops once past `limit`:
    the caller refuses what is that large."""
    seen, stack, total = set(), list(values), 0
    while stack and total <= limit:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        kind, items = type(value), ()
        if kind in (list, tuple):
            total += sys.getsizeof(value)
            items = value
        elif kind is dict:
            total += sys.getsizeof(value)
            items = [*value, *value.values()]
        elif kind in _SCALARS:
            total += sys.getsizeof(value)
        elif hasattr(value, "memory_usage"):                # pandas: its values (its block's buffer, if one dtype)
            stack.append(value.to_numpy())                  # (memory_usage(deep=True) costs 0.2 ms a frame)
        elif hasattr(value, "nbytes") and hasattr(value, "dtype"):    # numpy arrays and scalars
            base = value
            while getattr(base, "base", None) is not None and hasattr(base.base, "nbytes"):
                base = base.base
            if base is value or id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
            items = value.ravel().tolist() if value.dtype.kind == "O" else ()
        else:                                               # a sparse matrix's arrays, any other object's parts
            total += sys.getsizeof(value)
            items = list(getattr(value, "__dict__", {}).values())
        if items and set(map(type, items)) <= _SCALARS:     # rows of numbers or texts: one pass in C
            total += sum(map(sys.getsizeof, items))
        else:
            stack.extend(items)
    return total


class Backlog:
    """Work for one daemon thread, off the request path: what a request hands over after its answer.

    Bounded twice, as what waits holds requests' inputs and outputs: by count, and by the bytes the
    items hold (`held_bytes`: measured, whatever the request's headers said, so a chunked body counts
    as what was decoded from it).  A full backlog refuses an item at once rather than make a request
    wait (each refusal is counted by its user).  The thread runs `work(items)` on what waits: the
    oldest item and up to `burst` - 1 more, taken at one wake-up; it starts in the process that uses
    the backlog (a pre-fork host forks after building the app), and an exception from `work` is
    logged, never fatal to it.  Then it sleeps `rest(cpu_seconds)`, given the CPU time that took:
    waking once per item would cost requests the interpreter more than the work itself, and work
    that must not compete with them paces itself.  With `idle` seconds, it also runs `work([])` after
    that long with nothing offered (for work its user deferred, such as the live drift's next score).
    """

    ITEMS = 1000
    BYTES = 64 * 1024 * 1024
    ITEM_BYTES = 1024       # an item's own fields (request id, labels, times), beside the inputs and outputs

    def __init__(self, name, work, rest, burst=1, idle=None):
        self.name, self._work, self._rest, self._burst, self._idle = name, work, rest, burst, idle
        self._lock = threading.Lock()
        self._pid, self._queue, self._bytes = None, None, 0

    def offer(self, item, size):
        """Hand `item`, which holds `size` bytes of inputs and outputs, to the thread; False when the backlog
        is full."""
        if self._pid != os.getpid():
            self._start()
        size += self.ITEM_BYTES
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
            try:
                taken = [self._queue.get(timeout=self._idle)]
            except queue.Empty:
                taken = []
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


def payload_bytes(environ):
    """The bytes a prediction request's decoded inputs and outputs hold (its "service.payload"), measured
    once for every backlog that takes them; 0 for a request refused before it had any."""
    size = environ.get("service.payload_bytes")
    if size is None:
        payload = environ.get("service.payload")
        size = environ["service.payload_bytes"] = held_bytes(*payload[1:], limit=Backlog.BYTES) if payload else 0
    return size


# -- live drift: the payload log's rows against the models' reference profiles ---------------------
# The statistics of "Drift" (`python service.py drift`) live here, where both it and the live gauges
# reach them: KS (numbers) or chi-squared (categories) and PSI, one column against its profile.

PSI_FLOOR = 1e-4                # a bin's share where it holds nothing, as Evidently's PSI takes it
DRIFT_WINDOW_ROWS = 1000        # the served rows per model the live drift gauges score: the newest
DRIFT_SCORE_SECONDS = 1.0       # a model's gauges are scored again at most this often (and only after new rows)


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _psi(reference, served):
    """Population stability index of two distributions over the same bins (shares floored at PSI_FLOOR)."""
    import numpy as np

    reference, served = np.maximum(reference, PSI_FLOOR), np.maximum(served, PSI_FLOOR)
    return float(((served - reference) * np.log(served / reference)).sum())


def compare_column(reference, values):
    """One column's test against its reference profile: {"kind", "rows", "missing", "test", "statistic",
    "p_value", "psi", "distance": (name, value)}, the tests None when either side has no values."""
    import numpy as np
    from scipy import stats
    from scipy.spatial.distance import jensenshannon

    present = [value for value in values if not _missing(value)]
    result = {"kind": reference["kind"], "rows": len(values), "missing": len(values) - len(present),
              "test": None, "statistic": None, "p_value": None, "psi": None, "distance": None}
    if not present or not (reference.get("values") or reference.get("counts")):
        return result
    if reference["kind"] == "numeric":
        if any(isinstance(value, (str, bool)) for value in present):
            raise ValueError("the log holds text where the reference holds numbers")
        ref, served = np.asarray(reference["values"], dtype=float), np.asarray(present, dtype=float)
        test = stats.ks_2samp(ref, served)
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, 11))[1:-1])           # the reference's deciles
        shares = [np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1) / len(x)
                  for x in (ref, served)]
        return {**result, "test": "KS", "statistic": float(test.statistic), "p_value": float(test.pvalue),
                "psi": _psi(*shares), "distance": ("wasserstein", float(stats.wasserstein_distance(ref, served)))}
    counts = collections.Counter(str(value) for value in present)
    categories = sorted(set(reference["counts"]) | set(counts))
    table = np.array([[reference["counts"].get(c, 0) for c in categories], [counts.get(c, 0) for c in categories]],
                     dtype=float)
    statistic, p_value = (0.0, 1.0) if len(categories) < 2 else stats.chi2_contingency(table)[:2]
    ref, served = table[0] / table[0].sum(), table[1] / table[1].sum()
    return {**result, "test": "chi2", "statistic": float(statistic), "p_value": float(p_value),
            "psi": _psi(ref, served), "distance": ("jensen-shannon", float(jensenshannon(ref, served, base=2)))}


def _read_profile(path):
    """A stored reference profile, checked enough that a test can read it; ValueError says what is wrong."""
    with open(path, "rb") as handle:
        profile = parse_json(handle.read(), max_depth=8, what=path)
    features = profile.get("features") if isinstance(profile, dict) else None
    columns = (features or []) + ([profile["prediction"]] if profile.get("prediction") else [])
    if not features or not all(isinstance(column, dict) and isinstance(column.get("name", ""), str) and (
            column.get("kind") == "numeric" and isinstance(column.get("values"), list) and
            all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in column["values"]) or
            column.get("kind") == "categorical" and isinstance(column.get("counts"), dict) and
            all(type(count) is int and count >= 0 for count in column["counts"].values())) for column in columns):
        raise ValueError(f"{path} is not a reference profile (python service.py profile TRAIN --model NAME "
                         "writes one)")
    return profile


@dataclasses.dataclass
class _Watched:
    """A model LiveDrift scores: its reference profile (as read at `mtime`), its feature names and newest rows."""

    profile: dict
    mtime: int
    names: list
    rows: collections.deque
    fresh: bool = False         # rows came since the last score
    scored: float = -math.inf   # time.monotonic() of the last score


class LiveDrift:
    """Per-feature drift gauges of the rows each model answered lately (--payload-log with a stored reference
    profile), scored on the payload log's thread, off the request path.

    A model is watched while its folder of the store holds PROFILE_FILE (`python service.py profile`):
    the newest DRIFT_WINDOW_ROWS rows it answered (with 200; redacted cells count as missing) are tested
    feature by feature against the profile as the drift command tests them, at most every
    DRIFT_SCORE_SECONDS and only after new rows.  The gauges are labelled by the model and the profile's
    feature names, so their labels are bounded by the features of served models that have a profile; a
    model whose profile goes is forgotten.  Under --workers each process scores the rows it answered (a
    sample of the same traffic), and a scrape shows the lowest p-value and the highest PSI among them.
    """

    SERIES = (DRIFT_P_VALUE, DRIFT_PSI, DRIFT_ROWS_SCORED)

    def __init__(self, store, metrics):
        self.store, self.metrics = store, metrics
        self._watched = {}          # model name -> _Watched
        self._looked = {}           # model name -> time.monotonic() its profile was last looked for

    def add(self, name, rows, now):
        """Keep a logged request's rows (lists of a profile's width) for the model's next score."""
        watched = self._watch(name, now)
        if watched is not None and isinstance(rows, list) and rows and all(
                isinstance(row, list) and len(row) == len(watched.names) for row in rows):
            watched.rows.extend(rows)
            watched.fresh = True

    def score(self, now):
        """Score the models with new rows whose last score is DRIFT_SCORE_SECONDS old, and set their gauges (a
        watched model's profile is looked at again here too, so one removed is forgotten without new rows)."""
        for name in list(self._watched):
            watched = self._watch(name, now)
            if watched is None or not watched.fresh or now - watched.scored < DRIFT_SCORE_SECONDS:
                continue
            watched.fresh, watched.scored = False, now
            rows = list(watched.rows)
            for index, (feature, reference) in enumerate(zip(watched.names, watched.profile["features"])):
                try:
                    result = compare_column(reference, [row[index] for row in rows])
                except ValueError:          # text logged where the profile holds numbers: no score
                    result = {"p_value": None, "psi": None}
                labels = (("model", name), ("feature", feature))
                for series, key in ((DRIFT_P_VALUE, "p_value"), (DRIFT_PSI, "psi")):
                    self.metrics.set(series, labels, math.nan if result[key] is None else result[key])
            self.metrics.set(DRIFT_ROWS_SCORED, (("model", name),), len(rows))

    def _watch(self, name, now):
        """The model's _Watched while it has a readable profile (looked for at most every DRIFT_SCORE_SECONDS),
        else None."""
        watched = self._watched.get(name)
        if now - self._looked.get(name, -math.inf) < DRIFT_SCORE_SECONDS:
            return watched
        self._looked[name] = now
        path = os.path.join(self.store, name, PROFILE_FILE)
        try:
            mtime = os.stat(path).st_mtime_ns
            if watched is None or watched.mtime != mtime:
                profile = _read_profile(path)
                names = [feature.get("name") or f"x{i}" for i, feature in enumerate(profile["features"])]
                watched = self._watched[name] = _Watched(profile, mtime, names,
                                                         collections.deque(maxlen=DRIFT_WINDOW_ROWS))
        except (OSError, ValueError) as error:
            if watched is not None or not isinstance(error, FileNotFoundError):
                logger.warning("live drift of model %r: not scored: %s", name, _clip(str(error), 200))
            if self._watched.pop(name, None) is not None:
                self.metrics.drop(self.SERIES, name)
            return None
        return watched


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
                               burst=Backlog.ITEMS, idle=DRIFT_SCORE_SECONDS)
        self.drift = LiveDrift(registry.config.store, self.metrics)
        self._file, self._written, self._serial, self._failing = None, 0, itertools.count(1), False
        atexit.register(PayloadLog._drain_at_exit, weakref.ref(self), registry.config.shutdown_timeout)

    def offer(self, environ, status, elapsed):
        """Queue one prediction request if it is sampled; never blocks."""
        if self.sample < 1 and random.random() >= self.sample:
            return
        record = (time.time(), _request_id(environ), environ["service.labels"], environ.get("service.payload"),
                  environ["service.protocol"].name, int(status), elapsed)
        if not self.backlog.offer(record, payload_bytes(environ)):
            self.metrics.count(PAYLOAD_LOG_DROPPED_TOTAL, ())

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
        """Write the records' lines, hand their rows to the live drift, and let it score what is due (also
        when the backlog wakes with no records)."""
        now = time.monotonic()
        for line in self._write_lines(records) if records else ():
            if line["status"] == 200 and line.get("inputs") is not None:
                self.drift.add(line["model"], line["inputs"], now)
        self.drift.score(now)

    def _write_lines(self, records):
        """The records' lines, written (a failed write is counted and logged, and its lines still returned)."""
        lines = []
        try:
            lines = [self._line(record) for record in records]
            for line in lines:
                self._write(dumps(line) + "\n")
            self._file.flush()           # whole lines on disk: a reader, or a drain at shutdown, sees them
        except Exception as error:   # a full disk, an unwritable folder: logged once, counted each time
            self.metrics.count(PAYLOAD_LOG_DROPPED_TOTAL, (), len(records))
            if not self._failing:
                logger.error("payload log: cannot write to %s: %s", self.folder, error)
            self._failing = True
            return lines if len(lines) == len(records) else []
        self._failing = False
        self.metrics.count(PAYLOAD_LOG_RECORDS_TOTAL, (), len(records))
        return lines

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
        """A record's line, as the object it is written as."""
        at, request_id, labels, payload, protocol, status, elapsed = record
        (_, name), (_, version), (_, method) = labels
        line = {"time": _utc_time(at, millis=True),
                "request_id": request_id, "model": name, "version": version, "method": method,
                "protocol": protocol, "status": status, "latency_ms": round(elapsed * 1000, 3)}
        if payload is not None:
            model, inputs, results = payload
            line["features"] = model.feature_names
            line["inputs"], line["redacted"] = self._redacted(model, to_jsonable(inputs))
            line["outputs"] = {method: to_jsonable(outputs) for method, outputs in results.items()}
        return line

    def _redacted(self, model, rows):
        """(rows with the model's "redact" features nulled, the names redacted); all rows withheld (None)
        when a listed name is not one of the model's features: a redaction that cannot be placed fails closed."""
        hidden = self.registry.settings_for(model.name).redact
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
        if slot is None or slot.ref.version == model.version:
            return
        if not self.backlog.offer((name, slot, _request_id(environ), methods, inputs, results,
                                   environ.get("service.redacting", False)), payload_bytes(environ)):
            self.registry.agreement(name, slot.ref.version).dropped += 1
            self.metrics.count(SHADOW_DROPPED_TOTAL,
                               (("model", name), ("version", str(slot.ref.version))))

    def _compare(self, name, slot, request_id, methods, inputs, results, redacting):
        """Run the methods on the shadow version and count how its outputs compare with the client's."""
        version = slot.ref.version
        labels = (("model", name), ("version", str(version)))
        agreement = self.registry.agreement(name, version)
        try:
            with self.registry.using(name, version, slot=slot) as model:     # (re-resolved by version, not split)
                shadowed = {method: to_jsonable(model.call(method, inputs)) for method in methods}
        except Exception as failure:  # it cannot load, or refuses the inputs: counted and logged, never returned
            agreement.fail(request_id, methods, type(failure).__name__)
            self.metrics.count(SHADOW_ERRORS_TOTAL, labels)
            logger.warning("shadow version %s of model %r failed on request %s: %s", version, name, request_id,
                           logged_error(failure, redacting))
            return
        identical = agreement.identical
        differences = agreement.compare(model, request_id, {m: to_jsonable(r) for m, r in results.items()}, shadowed)
        self.metrics.count(SHADOW_COMPARED_TOTAL, labels)
        self.metrics.count(SHADOW_IDENTICAL_TOTAL, labels, agreement.identical - identical)
        if differences:
            self.metrics.count(SHADOW_ABS_DIFFERENCE_TOTAL, labels, sum(differences))
            self.metrics.count(SHADOW_NUMERIC_VALUES_TOTAL, labels, len(differences))


###############################################################################
# HTTP application ############################################################
###############################################################################
# One table, ROUTES, names every route: its path, the method that answers (the service's own,
# ServiceAnswers, or its protocol's), who may call it, and how OpenAPI documents it: the service's own
# rows here, each protocol's in its block.  Every prediction, of every protocol, goes through one core
# (ServiceApp.predict) with the protocol; every refusal is a ServiceError, turned into an answer in
# one place (ServiceApp.refusal), Bottle's own 404, 405 and 500 included, so no answer is HTML.

UNRESOLVED = "(unknown)"                         # the metrics' model and version of a request that named none
UNRESOLVED_LABELS = (("model", UNRESOLVED), ("version", UNRESOLVED), ("method", ""))

SERVICE_ROUTES = (
    Route("GET", "/", "index", OPEN, "service name, version, model names and links (a browser gets the web console)",
          "service"),
    Route("GET", "/healthz", "alive", OPEN, "liveness", "service", link="health"),
    Route("GET", "/readyz", "ready", OPEN, "readiness: 503 with the reason until ready", "service",
          args=(("counts", True),), link="ready"),
    Route("GET", "/openapi.json", "openapi", TOKEN, "this document", "service"),
    Route("GET", "/metrics", "prometheus_metrics", TOKEN, "Prometheus metrics (text format)", "service", "text"),
    Route("GET", "/models", "list_models", TOKEN, "every model and the state of its versions", "models",
          link="models"),
    Route("GET", "/models/{name}", "show_model", TOKEN, "one model's versions, policy and labels", "models",
          "ModelStatus"),
    Route("GET", "/models/{name}/versions/{version}", "show_version", TOKEN, "one version's state and metadata",
          "models"),
    Route("GET", "/models/{name}/labels/{label}", "show_label", TOKEN, "the version a label names", "models"),
    Route("POST", "/models/{name}/reload", "reload_model", ADMIN, "load a model's versions again (admin token)",
          "admin"),
    Route("POST", "/admin/rescan", "rescan", ADMIN, "rescan the store now (admin token)", "admin"),
)
ROUTES = SERVICE_ROUTES + tuple(route for protocol in PROTOCOLS for route in protocol.registered_routes())


def nearest_route(method, path):
    """"POST /models/iris/predict": the route closest to a path no route has, or None when none comes close.

    Each route's template is filled with the request's own path segments where it takes parameters
    (so /model/iris/predict is compared with /models/iris/predict, not with /models/{name}/predict),
    and the closest filled path wins, a route of the request's method before another's."""
    segments = path.strip("/").split("/")
    best, suggestion = 0.75, None
    for route in ROUTES:
        template = route.path.strip("/").split("/")
        filled = "/" + "/".join(
            re.sub(r"\{\w+\}", lambda _: segments[index].partition(":")[0], part)
            if "{" in part and index < len(segments) else part for index, part in enumerate(template))
        score = difflib.SequenceMatcher(None, path, filled).ratio() + (0.01 if route.method == method else 0)
        if score > best and filled != path:
            best, suggestion = score, f"{route.method} {filled}"
    return suggestion

access_logger = logging.getLogger("service.access")


class ServiceApp:
    """The WSGI application: a Bottle app routing ROUTES to their handlers, over one ModelRegistry.

    `config` is the service's Config and `registry` its one handle on the models; Bottle is held,
    not extended (`bottle`), so neither competes with Bottle's own attributes.

    What every answer gets (nosniff, X-Request-ID, CORS, the request metrics, the access log)
    is added at the WSGI boundary to the plain header list rather than through Bottle's
    after_request hook and response object, which cost about a quarter of the service's own
    time per request (40 of 165 µs, measured in-process on a small model).
    """

    def __init__(self, config, registry, misconfigured=None):
        self.config, self.registry, self.metrics, self.tracing = config, registry, registry.metrics, registry.tracing
        self.misconfigured = misconfigured      # why the MODEL_SERVICE_* settings were refused, if they were
        self._misconfigured_logged = False
        self._logs_shared = False               # _share_logs ran, at the first request
        self._first_request = threading.Lock()
        self.bottle = bottle.Bottle()
        self.bottle.uninstall(bottle.JSONPlugin)    # it would write NaN tokens; every body goes through dumps()
        self.bottle.install(self._json_answers)
        self.bottle.default_error_handler = self._bottle_error
        self.bottle.add_hook("before_request", self._admit)
        self.admission = threading.BoundedSemaphore(config.max_inflight) if config.max_inflight else None
        self.time_limit = TimeLimit(config.max_predict_seconds, config.threads) if config.max_predict_seconds \
            else None
        self.payload_log = PayloadLog(config.payload_log, config.payload_log_sample, registry) \
            if config.payload_log and config.payload_log_sample else None
        self.predicting = UnderWay()                 # predict() calls
        self.shadow = Shadow(registry, busy=lambda: self.predicting.count > 0)
        for route in ROUTES:
            self.bottle.route(route.rule, method=route.method, callback=self._endpoint(route), service_route=route)

    # -- the WSGI boundary ---------------------------------------------------------------
    def __call__(self, environ, start_response):
        return self.wsgi(environ, start_response)

    def wsgi(self, environ, start_response):
        if not self.tracing.enabled:
            return self._wsgi(environ, start_response)
        headers = {name: environ[key] for name, key in (("traceparent", "HTTP_TRACEPARENT"),
                                                         ("tracestate", "HTTP_TRACESTATE")) if key in environ}
        with self.tracing.request(environ["REQUEST_METHOD"], headers, **{
                "http.request.method": environ["REQUEST_METHOD"], "url.path": environ.get("PATH_INFO", "")}) as span:
            environ["service.span"] = span
            fields = _log_fields.set({**_log_fields.get(), "trace_id": f"{span.get_span_context().trace_id:032x}"})
            try:
                return self._wsgi(environ, start_response)
            finally:
                _log_fields.reset(fields)

    def _wsgi(self, environ, start_response):
        """The request itself (inside its server span when traced)."""
        started = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        if path.startswith("//"):               # waitress and wsgiref merge them, gunicorn does not
            environ["PATH_INFO"] = "/" + path.lstrip("/")
        config = self.config
        status_line = []

        def respond(status, headers, exc_info=None):
            status_line.append(status)
            headers.append(("X-Content-Type-Options", "nosniff"))
            headers.append(("X-Request-ID", _request_id(environ)))
            if "service.span" in environ:
                headers.append(("traceparent", traceparent(environ["service.span"])))
            if config.cors_origins:
                origin = environ.get("HTTP_ORIGIN")
                if origin and (config.cors_origins == ("*",) or origin in config.cors_origins):
                    headers += [("Access-Control-Allow-Origin", "*" if config.cors_origins == ("*",) else origin),
                                ("Access-Control-Expose-Headers", "Retry-After, Inference-Header-Content-Length")]
                headers.append(("Vary", "Origin"))      # every answer: a shared cache must not mix origins
            return start_response(status, headers, exc_info)

        body = self.bottle.wsgi(environ, respond)
        self.record(environ, status_line[-1][:3] if status_line else "500", time.perf_counter() - started)
        return body

    def record(self, environ, status, elapsed):
        """What every answered request leaves behind, whatever its protocol or transport: its server span's
        status, the request metrics and the payload log (predictions only), the access log."""
        if "service.span" in environ:
            _end_server_span(environ["service.span"], int(status))
        labels = environ.get("service.labels")
        if labels is not None:
            protocol = environ["service.protocol"].name
            self.metrics.count(REQUESTS_TOTAL, labels + (("protocol", protocol), ("status", status)))
            self.metrics.observe(REQUEST_DURATION_SECONDS, labels[::2], elapsed)
            if self.payload_log is not None:
                self.payload_log.offer(environ, status, elapsed)
        if self.config.access_log and access_logger.isEnabledFor(logging.INFO):
            access_logger.info("%s %s %s %s %.2fms id=%s", environ.get("REMOTE_ADDR", "-"), environ["REQUEST_METHOD"],
                               _clip(logged_path(environ), 200), status, elapsed * 1000,
                               _request_id(environ), extra={"request_id": _request_id(environ)})
        # the model, the rows and the answers go with the request: the environ outlives it (Bottle's request of
        # the thread keeps it until the thread's next one), and a retired version must not stay in memory for it
        environ.pop("service.payload", None)

    def _admit(self):
        """Before routing: the checks every request passes (host, size of the target), then housekeeping.

        A refusal here is answered at once; an OPTIONS request is a CORS preflight, answered here too.
        """
        environ, config = bottle.request.environ, self.config
        if not self._logs_shared:
            with self._first_request:
                if not self._logs_shared:
                    _share_logs(config)
                    if self.tracing.problem:
                        logger.error("traces are off: %s", self.tracing.problem)
                    warn_of_stray_variables(os.environ)
                    self._logs_shared = True
        try:
            if self.misconfigured:
                if not self._misconfigured_logged:     # once: a line per request would bury it
                    self._misconfigured_logged = True
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
            raw = environ.get("bottle.raw_path", "")
            if not raw.isascii():
                try:
                    raw.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    raise BadRequest("the request path is not valid UTF-8") from None
        except ServiceError as error:
            raise self.refusal(error) from None
        self.registry.refresh()

    def _unrouted_access(self, environ, http_error):
        """Who may learn that no route answers a request: a path no route has is told with a token (as a model
        route would be); a method the path's route does not take, as that row's access allows, but an admin
        route's by anyone (the admin token guards what the route does, not that it exists)."""
        if http_error.status_code != 405:
            return TOKEN
        other = {"PATH_INFO": environ["PATH_INFO"], "REQUEST_METHOD": http_error.headers["Allow"].split(",")[0]}
        access = self.bottle.router.match(other)[0].config["service_route"].access
        return OPEN if access == ADMIN else access

    def _preflight(self, environ):
        """A CORS preflight, answered before routing (a catch-all OPTIONS route would turn every unknown
        path's 404 into a 405): allowed origins learn what they may send; others are refused."""
        config = self.config
        origin = environ.get("HTTP_ORIGIN")
        if origin and not (config.cors_origins == ("*",) or origin in config.cors_origins):
            raise Forbidden(f"origin {_clip(repr(origin), 80)} may not call this service (--cors-origins)")
        methods = []
        for method in ("GET", "POST"):
            try:
                self.bottle.router.match({"PATH_INFO": environ.get("PATH_INFO", "/"), "REQUEST_METHOD": method})
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
        """The callback of one route: its access checked, its protocol noted for refusals, the URL's version
        made a number, then its handler (its protocol's or the service's own, given the app); a body that is not
        JSON, on a route that takes one, is answered with the route's example."""
        protocol, args, access, config = route.protocol, dict(route.args), route.access, self.config
        owner = protocol if protocol is not None else SERVICE_ANSWERS
        handler = functools.partial(getattr(owner, route.handler), self, **args)
        takes_body, example = route.body is not None, BODY_EXAMPLES.get(route.body)

        def endpoint(**parameters):
            environ = bottle.request.environ
            environ["service.route_path"] = route.path      # what logs write for a redacted path
            if access != OPEN:
                _check_access(environ, access, config)
            if protocol is not None:
                environ["service.protocol"] = protocol
            if "service.span" in environ:
                environ["service.span"].update_name(f"{route.method} {route.path}")
                environ["service.span"].set_attribute("http.route", route.path)
            if "version" in parameters:                 # the one place a version is text: the URL
                parameters["version"] = version_number(parameters["version"], parameters["name"])
            try:
                return handler(**parameters)
            except NotJSON as error:
                if not takes_body:
                    raise
                raise not_json_refusal(error, environ, example) from None

        return endpoint

    # -- the one error path ---------------------------------------------------------------
    def refusal(self, error):
        """The answer to a ServiceError: the protocol's JSON body, the error's status and headers."""
        protocol = bottle.request.environ.get("service.protocol")
        body = error.to_dict() if protocol is None else protocol.error(error)
        return bottle.HTTPResponse(_utf8(dumps(body)), error.status,
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
                environ = bottle.request.environ
                return self.refusal(_internal_error(f"on {environ['REQUEST_METHOD']} {logged_path(environ)}",
                                                    logged_traceback(environ)))
            bottle.response.content_type = JSON_TYPE
            return body

        return wrapper

    def _bottle_error(self, http_error):
        """Bottle's own errors (no route, wrong method, a fault outside a route) as ServiceErrors."""
        status, request = http_error.status_code, bottle.request
        if status in (404, 405):
            try:
                _check_access(request.environ, self._unrouted_access(request.environ, http_error), self.config)
            except ServiceError as refused:
                return self._answer_error(refused)
        if status == 404:
            near = nearest_route(request.method, request.path)
            error = NotFound(f"no route for {request.method} {_clip(request.path, 200)}"
                             + (f"; did you mean {near}?" if near else "") + " (every route is listed in /openapi.json)")
        elif status == 405:
            allowed = http_error.headers.get("Allow", "")
            error = MethodNotAllowed(f"method {request.method} is not allowed here; allowed: {allowed}",
                                     {"Allow": allowed})
        elif status >= 500:
            error = _internal_error("outside a route", http_error.traceback or http_error.body)
        else:
            error = error_for_status(status)(str(http_error.body))
        return self._answer_error(error)

    def _answer_error(self, error):
        """A refusal as Bottle's error handler returns it: applied to its response, the body returned."""
        answer = self.refusal(error)
        answer.apply(bottle.response)
        return answer.body

    # -- the predict core -------------------------------------------------------------------
    def predict(self, protocol, name=None, version=None, label=None, **route):
        """Every protocol's prediction over HTTP: resolve → read → admit → load → decode → run → encode.

        The request is labelled for the metrics only with what exists: the model and version
        once resolved (UNRESOLVED before), the methods once the model has them.  It is counted
        in `predicting` (the shadow rests while that is not 0)."""
        request = bottle.request
        model, asked, results = self.predicted(protocol, lambda: protocol.read(request, self.config, **route),
                                               request.environ, name, version, label)
        with self.tracing.span("encode") if self.tracing.enabled else _NO_SPAN:
            return protocol.encode(model, asked, results)

    def predicted(self, protocol, read, environ, name, version, label):
        """(model, request record, {method: outputs}) of a prediction whose record `read()` gives, over any
        transport: counted in `predicting` (the shadow rests while that is not 0), labelled for the metrics
        as unresolved until answer() knows more."""
        environ["service.labels"] = UNRESOLVED_LABELS
        with self.predicting:
            if name is None:
                name = self.registry.default_model_name()
            mark_redacting(environ, self.registry.settings_for(name).redact)
            with self.tracing.span("read") if self.tracing.enabled else _NO_SPAN:
                asked = read()
            model, results = self.answer(protocol, asked, environ, name, version, label)
        return model, asked, results

    def answer(self, protocol, asked, environ, name, version, label):
        """(model, {method: outputs}) for a request record `asked`: admit → resolve → load → decode → run.

        `environ` is the request's WSGI environ; a protocol that is not HTTP passes a dict of its
        own, where the metrics' labels, the payload log's record and the request id are noted."""
        registry, config = self.registry, self.config
        held = []                                   # what the prediction holds, released when it is over
        fields = None
        try:
            if self.admission is not None:
                if not self.admission.acquire(blocking=False):
                    raise Overloaded(f"overloaded: {config.max_inflight} predictions are already being "
                                           "answered (--max-inflight); try again", retry_after=1)
                held.append(self.admission.release)
            routing_key = protocol.routing_key(environ, asked)
            slot = registry.slot(name, version, label, routing_key)
            environ["service.labels"] = (("model", name), ("version", str(slot.ref.version)), ("method", ""))
            fields = _log_fields.set({**_log_fields.get(), "request_id": _request_id(environ), "model": name,
                                      "version": slot.ref.version})          # for the lines logged meanwhile
            model = registry.acquire(name, version, label, slot, routing_key)
            held.append(functools.partial(registry.release, model))
            with self.tracing.span("decode") if self.tracing.enabled else _NO_SPAN:
                methods, inputs = protocol.inputs(model, asked, config)
            environ["service.labels"] = model.labels + (("method", ",".join(sorted(methods))),)
            if "service.span" in environ:
                environ["service.span"].set_attributes({"model": name, "version": str(model.version),
                                                        "protocol": protocol.name, "method": ",".join(methods),
                                                        "rows": _row_count(inputs)})

            reference = registry.settings_for(name).explain_reference      # where an explanation is measured from

            def compute():
                return {method: explain_model(model, inputs, reference) if method == EXPLAIN else
                        model.predict(method, inputs) for method in methods}

            results = compute() if self.time_limit is None else self.time_limit.run(compute, held)
            # the payload log and the shadow get the predictions: an explanation is derived from them
            predictions = {method: outputs for method, outputs in results.items() if method != EXPLAIN}
            environ["service.payload"] = (model, inputs, predictions)    # for the payload log, after the answer
            if predictions:
                self.shadow.offer(environ, name, model, list(predictions), inputs, predictions)
        finally:
            for release in reversed(held):
                release()
            if fields is not None:
                _log_fields.reset(fields)
        return model, results


class ServiceAnswers:
    """The service's own routes (SERVICE_ROUTES): the index, health, metrics, OpenAPI, the catalogue and
    administration.  Each handler is called with the app first, as a protocol's are, so that the app
    holds only what every request goes through."""

    # -- service ------------------------------------------------------------------------------
    def index(self, app):
        if "text/html" in bottle.request.environ.get("HTTP_ACCEPT", ""):
            return bottle.HTTPResponse(CONSOLE_HTML, headers={"Content-Type": "text/html; charset=utf-8",
                                                             "Content-Security-Policy": CONSOLE_CSP})
        return {"name": SERVICE_NAME, "version": __version__, "status": "alive",
                "models": app.registry.names(),
                "links": {route.link: route.path for route in ROUTES if route.link}}

    def alive(self, app):
        return {"status": "alive"}

    def ready(self, app, counts=False):
        reason = app.registry.not_ready_reason()
        if reason:
            raise ModelUnavailable(f"not ready: {reason}", ready=False)
        if not counts:
            return {"ready": True}
        return {"ready": True, "models": len(app.registry.names()), "loaded": app.registry.loaded_count()}

    def prometheus_metrics(self, app):
        text = app.metrics.render()
        return bottle.HTTPResponse(text, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def openapi(self, app):
        return openapi_document(app.registry)

    # -- models -------------------------------------------------------------------------------
    def model_names(self, app):
        app.registry.require_store()
        return {"models": app.registry.names()}

    def list_models(self, app):
        app.registry.require_store()
        return {"models": app.registry.describe_all()}

    def show_model(self, app, name):
        return app.registry.describe(name)

    def show_version(self, app, name, version):
        for info in app.registry.describe(name)["versions"]:
            if info["version"] == str(version):
                return {"name": name, **info}
        app.registry.slot(name, version)         # the 400 or 404 that explains why
        raise NotFound(f"model {name!r} has no version {version}", model=name)

    def show_label(self, app, name, label):
        return {"name": name, "label": label, "version": str(app.registry.slot(name, label=label).ref.version)}

    # -- administration: only what is already in the store ----------------------------------
    def reload_model(self, app, name):
        outcome = app.registry.reload(name)
        return {**app.registry.describe(name), "reload": outcome}

    def rescan(self, app):
        return {"models": app.registry.rescan()}


SERVICE_ANSWERS = ServiceAnswers()


def _check_access(environ, access, config):
    """The one access check, of a request's row of ROUTES (its endpoint's, or its path's when no route
    answers it): OPEN for anyone; TOKEN needs one of --auth-tokens when it is set; ADMIN is off without
    --admin-token and needs it."""
    if access == ADMIN:
        if not config.admin_token:
            raise Forbidden(f"administration is off: set {ENV_PREFIX}ADMIN_TOKEN (or --admin-token) to enable it")
        _require_token(environ, (config.admin_token,), "model-service admin",
                       "this route needs the admin token: Authorization: Bearer <token>")
    elif access == TOKEN and config.auth_tokens:
        _require_token(environ, config.auth_tokens, "model-service")


def _row_count(inputs):
    """How many rows an estimator's input holds (a matrix, a DataFrame, a list of texts), for a span."""
    shape = getattr(inputs, "shape", None)
    return int(shape[0]) if shape else len(inputs) if isinstance(inputs, list) else 1


def _end_server_span(span, status):
    """The answer's status on its server span; a fault of the service's own (5xx) marks the span an error."""
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR))


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
             "schema": {"type": "string", "pattern": f"^{MODEL_NAME.pattern}$"}},
    "version": {"name": "version", "in": "path", "required": True, "description": "version number",
                "schema": {"type": "string", "pattern": f"^{VERSION.pattern}$"}},
    "label": {"name": "label", "in": "path", "required": True, "description": "version label",
              "schema": {"type": "string", "pattern": f"^{LABEL.pattern}$"}},
    "sentence": {"name": "sentence", "in": "path", "required": True, "schema": {"type": "string"},
                 "description": "the instances, as JSON or a Python literal"},
}
_QUERY_PARAMETERS = {
    "instances": {"name": "instances", "in": "query", "required": True, "schema": {"type": "string"},
                  "description": "a JSON list of instances"},
}

OPENAPI_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "additionalProperties": True,
              "properties": {"error": {"type": "string"}, "code": {"type": "string"},
                             "model": {"type": "string"}, "error_code": {"type": "string"},
                             "message": {"type": "string"}}},
    "ModelStatus": {"type": "object", "required": ["name", "versions"], "additionalProperties": True,
                    "properties": {"name": {"type": "string"}, "latest_version": {"type": ["string", "null"]},
                                   "versions": {"type": "array", "items": _OBJECT}}},
    **{name: schema for protocol in PROTOCOLS for name, schema in protocol.schemas.items()},
}


OPENAPI_BODIES = {   # Route.body: what each request body may be, where it is not one JSON schema
    "Optional": {"required": False, "content": {JSON_TYPE: {"schema": _OBJECT}}},
    **{name: body for protocol in PROTOCOLS for name, body in protocol.bodies.items()},
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
    for name, features in registry.known_features().items():
        schemas[f"{name}.row"] = {"type": "object", "required": features, "additionalProperties": False,
                                  "properties": {feature: {"type": ["number", "null"]} for feature in features}}
        rows = {"type": "object", "required": ["instances"], "properties": {
            "instances": {"type": "array", "minItems": 1, "items": _schema_ref(f"{name}.row")},
            "method": {"type": "string"}}}
        for route in ROUTES:
            if route.per_model:
                own = dataclasses.replace(route, summary=f"predict with {name}: rows keyed by its feature names") \
                    if route.body else route
                paths.setdefault(route.path.replace("{name}", name), {})[route.method.lower()] = _operation(
                    own, _schema_ref(route.answer), _json_body(rows) if route.body else None, query=route.query)
    return {"openapi": "3.1.0",
            "info": {"title": SERVICE_NAME, "version": __version__,
                     "description": "scikit-learn models over HTTP: a native JSON API, TF Serving REST, KServe "
                                    "V1, the Open Inference Protocol (V2) and MLflow scoring."},
            "paths": paths, "components": {"schemas": schemas}}


###############################################################################
# Serving #####################################################################
###############################################################################


def serve(app, config):
    """Run a server until SIGTERM or SIGINT: waitress (tuned, and drained on exit) or any Bottle adapter.

    Whichever it was, SIGTERM's and SIGINT's handlers are the caller's again when it returns."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the service is reachable from other machines", config.host)
    with _signal_handlers_kept():
        if config.workers > 1:
            _serve_workers(app, config)         # each worker serves gRPC too, once forked
            return
        grpc_server = start_grpc_server(app, config) if config.grpc_port is not None else None
        drained = []                            # the gRPC server's drain: an Event set once it has stopped
        try:
            if config.server == "waitress":
                _serve_waitress(app, config, grpc_server, drained)
            else:
                # gunicorn and the like handle signals themselves; for the rest, SIGTERM stops like Ctrl-C
                if threading.current_thread() is threading.main_thread():
                    signal.signal(signal.SIGTERM, signal.default_int_handler)
                bottle.run(app, server=config.server, host=config.host, port=config.port, quiet=True)
        finally:
            if grpc_server is not None:
                (drained or [grpc_server.stop(config.shutdown_timeout)])[0].wait(config.shutdown_timeout)


@contextlib.contextmanager
def _signal_handlers_kept():
    """Give SIGTERM and SIGINT back the handlers they had (only the main thread may set them, and has)."""
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:             # None: set outside Python, nothing to give back
                signal.signal(number, handler)


def _serve_waitress(app, config, grpc_server=None, drained=None):
    """waitress, tuned, until SIGTERM or SIGINT; then requests in flight finish within --shutdown-timeout.

    The gRPC server beside it, if any, stops taking calls at the same signal; its drain (the Event its
    stop() returns) goes into `drained`, for serve() to wait on.  The loop settles the heap (_settle_heap)
    when it starts and after each model that entered or left memory."""
    import waitress
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer
    from waitress.wasyncore import close_all, dispatcher, loop

    # waitress refuses bodies far over our limit itself (as plain text); below that the
    # service's own check answers 413 in JSON.
    # Slow clients: a connection idle for channel_timeout is closed (looked for every cleanup_interval
    # seconds), and past connection_limit open connections waitress stops accepting until some close,
    # so trickling clients cannot exhaust it.
    server = waitress.create_server(app, host=config.host, port=config.port, threads=config.threads,
                                    max_request_body_size=2 * config.max_body_bytes, ident=SERVICE_NAME,
                                    expose_tracebacks=False, clear_untrusted_proxy_headers=True,
                                    channel_timeout=config.connection_timeout, connection_limit=256,
                                    cleanup_interval=min(10, config.connection_timeout),
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
        app.registry.draining = True
        if grpc_server is not None:
            drained.append(grpc_server.stop(config.shutdown_timeout))
        logger.info("%s: finishing requests in flight (at most %g s)", signal.Signals(signum).name,
                    config.shutdown_timeout)

    def busy():
        """Connections with a request arriving, running or still being sent; idle keep-alives are not."""
        return [c for c in list(sockets.values())
                if isinstance(c, HTTPChannel) and (c.request is not None or c.requests or c.total_outbufs_len)]

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stop)
    settled, next_settle = None, 0.0        # the residency turnover when the heap was last settled; when next
    try:
        while not deadline or (busy() and time.monotonic() < deadline[0]):
            if app.registry.residency.turnover != settled and time.monotonic() >= next_settle:
                settled = app.registry.residency.turnover
                next_settle = _settle_heap()
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
        server.task_dispatcher.shutdown(timeout=1)
        close_all(sockets)
        gc.unfreeze()                       # the caller's objects are the collector's to walk again


def _settle_heap():
    """Collect what is garbage, then freeze the rest (gc.freeze): later collections skip it.

    A full collection walks every object the process holds with every thread stopped: with
    scikit-learn, scipy and a forest loaded, about 135,000 objects and 45-70 ms on the
    benchmark's machine.  Under load the objects of the requests in flight are promoted fast
    enough to start one every two seconds or so, and those passes were the tail: the forest with
    batching at c=32 had p99 40-60 ms with p50 8 ms, every slow request caught in a pass
    (measured in the process); frozen, full passes cost under 1 ms and p99 was 14 ms.  The
    server settles once it starts and again whenever a model enters or leaves memory: the
    collection first unfreezes, so a retired version's reference cycles are freed, not kept
    frozen.  Not done where a host embeds `app` (its process, its collector) nor in a --workers
    worker, whose frozen objects stay shared with its parent only while untouched.

    Returns the earliest time (time.monotonic) for the next: models that load and leave all the
    time (--max-loaded below the versions in use) would otherwise stop the process for a
    collection each, so settling takes at most 5 % of the time, and what loads meanwhile waits.
    """
    began = time.monotonic()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    ended = time.monotonic()
    return ended + 19 * (ended - began)


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
    registry = app.registry

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
            """In each worker, after the fork: start its watcher, load what the parent could not, count the
            models it holds from the start (else its gauges were written at its first request), and serve gRPC
            on the shared --grpc-port (SO_REUSEPORT), drained from SIGTERM on like the worker's HTTP."""
            registry.refresh()
            registry.residency.announce()
            if config.grpc_port is not None:
                grpc_server, terminate = start_grpc_server(app, config), signal.getsignal(signal.SIGTERM)

                def stop(signum, frame):
                    grpc_server.stop(config.shutdown_timeout)
                    terminate(signum, frame)
                signal.signal(signal.SIGTERM, stop)
                atexit.register(lambda: grpc_server.stop(config.shutdown_timeout).wait(config.shutdown_timeout))
            return app

    Workers().run()


def start_grpc_server(app, config):
    """The Open Inference Protocol over gRPC on --grpc-port (bound to --host, as HTTP), started: each RPC of
    GRPC_PROTO answered by the GRPC protocol's handler through the app (grpc_call).  Messages over
    --max-body-bytes are refused by gRPC itself (RESOURCE_EXHAUSTED); --threads threads answer calls.
    Under --workers every worker binds the same port (SO_REUSEPORT) and the kernel spreads connections."""
    import grpc

    classes, methods = grpc_messages()
    handlers = {rpc: grpc.unary_unary_rpc_method_handler(
                    functools.partial(grpc_call, app, rpc, classes[response]),
                    request_deserializer=classes[request].FromString,
                    response_serializer=classes[response].SerializeToString)
                for rpc, (request, response) in methods.items()}
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(config.threads, thread_name_prefix="grpc"),
                         handlers=[grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers)],
                         options=[("grpc.so_reuseport", int(config.workers > 1)),
                                  ("grpc.max_receive_message_length", config.max_body_bytes),
                                  ("grpc.max_send_message_length", -1)])
    host = f"[{config.host}]" if ":" in config.host else config.host
    port = server.add_insecure_port(f"{host}:{config.grpc_port}")
    server.start()
    logger.info("Serving V2 over gRPC on %s:%d", host, port)
    return server


def grpc_call(app, rpc, response_class, request, context):
    """One gRPC call, as ServiceApp answers an HTTP request: a server span (the caller's traceparent), the
    service's checks and the RPC's access (its token from the `authorization` metadata), its handler, then
    the records every request leaves; a refusal is the gRPC status of its HTTP one (grpc_status), with its
    message; the request id and traceparent go back as initial metadata."""
    import grpc

    started, metadata = time.perf_counter(), dict(context.invocation_metadata())
    environ = GrpcCall(rpc, metadata, context.peer()).environ(GRPC)
    handler, access = GRPC.RPCS[rpc]
    traced = app.tracing.request(rpc, metadata, **{"rpc.system": "grpc", "rpc.service": GRPC_SERVICE,
                                                   "rpc.method": rpc}) if app.tracing.enabled else _NO_SPAN
    with traced as span:
        if span is not None:
            environ["service.span"] = span
        context.send_initial_metadata([("x-request-id", _request_id(environ))] +
                                      ([("traceparent", traceparent(span))] if span is not None else []))
        refusal = answer = None
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise PredictionTimeout("the call's deadline passed before it could be answered")
            if app.misconfigured:
                raise Misconfigured(f"the service is misconfigured: {app.misconfigured}")
            _check_access(environ, access, app.config)
            app.registry.refresh()
            answer = getattr(GRPC, handler)(app, request, response_class(), environ)
        except ServiceError as error:
            refusal = error
        except Exception:
            refusal = _internal_error(f"on gRPC {rpc}", logged_traceback(environ))
        app.record(environ, str(refusal.status if refusal else 200), time.perf_counter() - started)
    if refusal is not None:
        error_id = refusal.fields.get("error_id")
        context.abort(getattr(grpc.StatusCode, grpc_status(refusal)),
                      refusal.message + (f" (error_id {error_id})" if error_id else ""))
    return answer


def _metrics_across_workers():
    """--workers: the processes count into one fresh folder (prometheus_client's multiprocess mode), so a
    scrape of any worker sums them all; returns gunicorn's hooks that keep its gauges to the live workers.

    Made here, in the parent before the fork and before prometheus_client is imported (it reads the
    variable then), and removed when the parent exits.  A folder the environment already names is not
    used: counts left there by an earlier run would be added to this one's.
    """
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

class _OneLineErrors(argparse.ArgumentParser):
    """argparse whose refusals are one line: the usage of forty options would bury it (--help shows them).
    An unknown option is answered with the closest one, when one is close."""

    def error(self, message):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [word.partition("=")[0] for word in unknown if word.startswith("--")]
        near = next(filter(None, (closest(flag, self._option_string_actions) for flag in flags)), None)
        hint = f"; did you mean {near}?" if near else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} ({self.prog} --help lists the options)\n")


REPLAY_LINE_BYTES = 64 * 1024 * 1024    # a line longer than a payload file's size is none the service wrote
REPLAY_RAN, REPLAY_BELOW, REPLAY_FAILED = 0, 1, 2    # its exit codes: ran / under --fail-under / could not run


def _payload_lines(paths, report):
    """(where, record) of every line of the logs that holds a JSON object; a folder stands for its payload
    files.  Other lines are counted in report.bad, by why."""
    for path in paths:
        files = sorted(os.path.join(path, entry) for entry in os.listdir(path)
                       if PayloadLog.FILE_NAME.fullmatch(entry)) if os.path.isdir(path) else [path]
        for file in files:
            if not os.path.isfile(file):
                raise OSError(f"{file}: not a file")        # a FIFO or a device would block, or never end
            with open(file, "rb") as handle:
                for number, line in _numbered_lines(handle):
                    where = f"{file}:{number}"
                    try:
                        if line is None:
                            raise BadRequest(f"the line is longer than {REPLAY_LINE_BYTES} bytes")
                        record = parse_json(line, max_depth=64, what="the line")
                        if not isinstance(record, dict):
                            raise BadRequest("the line is no JSON object")
                    except ServiceError as error:
                        report.bad_line(where, error.message)
                        continue
                    yield where, record


def _numbered_lines(handle):
    """(number, line) of a binary file; None for a line over REPLAY_LINE_BYTES, which is skipped unread."""
    number = 0
    while True:
        line = handle.readline(REPLAY_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > REPLAY_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = handle.readline(1 << 20)
            line = None
        yield number, line


def _logged_request(record, name):
    """Why a record is not replayed (a reason for report.skipped), None if it is; BadRequest for a record
    that is no payload log's (a field of the wrong type)."""
    if record.get("model") != name:
        return "for other models"
    if record.get("status") != 200:
        return "not answered 200"
    inputs, outputs = record.get("inputs"), record.get("outputs")
    if inputs is None or record.get("redacted"):
        return "without (complete) inputs"
    if not isinstance(inputs, (list, dict)):
        raise BadRequest('"inputs" is no list of rows (nor an object of columns)')
    if outputs == {}:
        return "explained, not predicted"      # an explanation's outputs are not logged: nothing to compare
    if not isinstance(outputs, dict) or not outputs or not all(isinstance(v, list) for v in outputs.values()):
        raise BadRequest('"outputs" does not map the methods called to their outputs')
    if not isinstance(record.get("request_id", ""), str):
        raise BadRequest('"request_id" is no string')
    return None


def command_registry(store):
    """A registry of the store for a command that runs once (replay, drift, profile): scanned now, not watched,
    and its model waited for however long it takes to load (no --max-predict-seconds from the environment)."""
    config = dataclasses.replace(Config.load({"store": store}), poll_interval=0.0, max_predict_seconds=0.0)
    registry = ModelRegistry(config, watch=False)
    registry.refresh()
    return registry


def replay(registry, name, paths, version=None, label=None):
    """Replay the logged requests of model `name` on one of its versions; (report, version replayed on)."""
    if version is None and label is None:
        served = registry.entry(name).served
        version = served[0] if served else None          # the highest served: never the split's random pick
    report = Agreement()
    with registry.using(name, version, label) as model:
        for where, record in _payload_lines(paths, report):
            try:
                skipped = _logged_request(record, name)
            except BadRequest as error:
                report.bad_line(where, error.message)
                continue
            if skipped:
                report.skipped[skipped] += 1
            else:
                _replay_request(model, registry.config, record, report)
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
    """`model-service replay LOG... --model NAME [--version V | --label L]`; returns the exit code: REPLAY_RAN
    once it has run (whatever it found, bad lines included), REPLAY_BELOW under --fail-under, REPLAY_FAILED
    when it could not run.  Whatever the logs hold, it ends in a report or one line, never a traceback."""
    parser = _OneLineErrors(
        prog="model-service replay",
        description="Score the requests of payload logs (--payload-log) again on one version of a model, "
                    "in-process, and report how its predictions compare with the logged ones.",
        epilog=f"Exit status: {REPLAY_RAN} once it has run, whatever it found (lines that are no logged request "
               f"are counted and the first few shown); {REPLAY_BELOW} with --fail-under when the share of "
               f"identical predictions is below it; {REPLAY_FAILED} when it could not run (a bad option, no such "
               "model, version or label, a log that cannot be read).")
    parser.add_argument("logs", metavar="LOG", nargs="+", help="payload log file, or a folder of them")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model whose requests are replayed")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", metavar="V", help="version to replay on (default: the highest served)")
    which.add_argument("--label", metavar="L", help="label naming the version to replay on")
    parser.add_argument("--store", metavar="DIR", help=f"model store (env {ENV_PREFIX}STORE; default: model_store)")
    parser.add_argument("--fail-under", metavar="FRACTION",
                        help=f"exit {REPLAY_BELOW} when the share of identical predictions is below FRACTION (for CI)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        fail_under = arguments.fail_under
        try:
            fail_under = fail_under if fail_under is None else _fraction(fail_under)
        except ValueError as error:
            raise ValueError(f"--fail-under: {error}") from None
        registry = command_registry(arguments.store)
        version = None if arguments.version is None else version_number(arguments.version, arguments.model)
        report, version = replay(registry, arguments.model, arguments.logs, version, arguments.label)
    except (ServiceError, OSError, ValueError) as error:
        print(f"model-service replay: error: {getattr(error, 'message', None) or error}", file=sys.stderr)
        return REPLAY_FAILED
    except Exception as error:  # a fault of the service's own: still one line, and "could not run"
        print(f"model-service replay: error: unexpected {type(error).__name__}: {_clip(str(error))}", file=sys.stderr)
        return REPLAY_FAILED
    print("\n".join(report.lines(arguments.model, version)))
    if fail_under is not None and report.share() < fail_under:
        print(f"identical share {report.share():.1%} is below --fail-under {fail_under:g}", file=sys.stderr)
        return REPLAY_BELOW
    return REPLAY_RAN


###############################################################################
# Drift #######################################################################
###############################################################################
# `python service.py drift LOG... --model NAME`: how the rows a model was asked about (its payload
# log, read as replay reads it) compare with the rows it was trained on, feature by feature, and how
# its logged predictions compare with its predictions on those rows.  Numeric features get the
# two-sample Kolmogorov-Smirnov test and the Wasserstein distance, categorical ones (text values)
# the chi-squared test of the two samples' counts and the Jensen-Shannon distance; both the
# population stability index (PSI) over the reference's deciles or categories.  A feature drifts
# when its p-value is below --p-value divided by the number of tests (Bonferroni, the correction
# alibi-detect's TabularDrift applies by default).  Missing values (null, NaN, redacted) are counted
# and left out of the tests.  The tests themselves (compare_column) are in "Background work", which
# scores the live drift gauges with them.
#
# The reference is a training file (CSV, JSON lines, Parquet where pandas and pyarrow are installed)
# or a profile of one that `python service.py profile TRAIN --model NAME` stores beside the model
# (PROFILE_FILE in its folder): per numeric feature at most PROFILE_SAMPLE of its sorted values
# (evenly spaced quantiles of a larger sample, so a test's reference size is at most that), per
# categorical feature its counts, and the model's predictions on it the same way.

PROFILE_SAMPLE = 2000           # values kept per numeric column of a reference profile
DRIFT_MAX_ROWS = 100_000        # logged rows compared at most: a uniform sample of them beyond
DRIFT_SEED = 16                 # the sample of a larger log is the same at every run


def _cell(text):
    """A CSV field as JSON would hold it: a number where it spells one, None where empty or NaN, else text."""
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return None if math.isnan(number) else number


def read_table(path):
    """(column names or None, rows as lists) of a .csv (with a header), .jsonl (a row or a record per line) or
    .parquet file (with pandas and pyarrow); ValueError says what is wrong, in one line."""
    import csv

    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        try:
            import pandas

            frame = pandas.read_parquet(path)
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pandas and pyarrow (pip install pandas pyarrow); "
                             "or give the reference as .csv or .jsonl") from None
        frame = frame.astype(object).where(frame.notna(), None)
        return [str(name) for name in frame.columns], frame.to_numpy().tolist()
    if extension == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
        if not lines:
            raise ValueError(f"{path}: empty; a CSV reference starts with a header of feature names")
        return lines[0], [[_cell(text) for text in line] for line in lines[1:] if line]
    if extension in (".jsonl", ".ndjson"):
        return _read_json_lines(path)
    raise ValueError(f"{path}: a reference is a .csv, .jsonl or .parquet file, or a {PROFILE_FILE}")


def _read_json_lines(path):
    names, rows = None, []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            value = parse_json(line, max_depth=8, what=f"{path}:{number}")
            if isinstance(value, dict):
                names = names or list(value)
                rows.append(value)
            elif isinstance(value, list):
                rows.append(value)
            else:
                raise ValueError(f"{path}:{number}: each line holds a row (a list) or a record (an object)")
    if names is not None:
        rows = [[row.get(name) if isinstance(row, dict) else None for name in names] for row in rows]
    return names, rows


def _model_columns(names, rows, features, n_features, where):
    """The rows' columns in the model's feature order: by name where the model has names, else the first
    n_features columns."""
    if features:
        missing = [feature for feature in features if feature not in (names or ())]
        if missing:
            raise ValueError(f"{where} has no column {missing[0]!r} (the model takes {', '.join(features)})")
        index = [names.index(feature) for feature in features]
    else:
        index = list(range(n_features))
    if any(len(row) < len(index) for row in rows):
        raise ValueError(f"{where}: a row has fewer than the model's {len(index)} features")
    return [[row[i] for row in rows] for i in index]


def profile_column(values, kind=None):
    """A column summarised for drift tests: {"kind", "count", "missing"} with, when numeric, "values" (sorted,
    at most PROFILE_SAMPLE of them: the column's quantiles) or, when categorical, "counts" by value."""
    present = [value for value in values if not _missing(value)]
    if kind is None:
        kind = "categorical" if any(isinstance(value, (str, bool)) for value in present) else "numeric"
    column = {"kind": kind, "count": len(values), "missing": len(values) - len(present)}
    if kind == "categorical":
        column["counts"] = dict(collections.Counter(str(value) for value in present).most_common())
        return column
    present.sort()
    if len(present) > PROFILE_SAMPLE:
        last = len(present) - 1
        present = [present[round(i * last / (PROFILE_SAMPLE - 1))] for i in range(PROFILE_SAMPLE)]
    column["values"] = [float(value) for value in present]
    return column


def _predictions(model, rows):
    """The model's `predict` on reference rows (by model_inputs, in batches), or None when it has none."""
    if "predict" not in model.methods:
        return None
    answers = []
    for start in range(0, len(rows), 10_000):
        inputs = model_inputs(model, rows[start:start + 10_000], 10_000)
        answers.extend(to_jsonable(model.call("predict", inputs)))
    return None if any(isinstance(answer, list) for answer in answers) else answers


def build_profile(model, names, rows, source):
    """The reference profile of training rows for a loaded model (what PROFILE_FILE holds)."""
    columns = _model_columns(names, rows, model.feature_names, model.n_features, source)
    predictions = _predictions(model, [list(row) for row in zip(*columns)])
    kind = "categorical" if model.classes is not None else None
    return {"model": model.name, "version": model.version, "source": os.path.basename(source), "rows": len(rows),
            "features": [{"name": name, **profile_column(column)} for name, column in
                         zip(model.feature_names or [f"x{i}" for i in range(len(columns))], columns)],
            "prediction": None if predictions is None else profile_column(predictions, kind)}


def _served(paths, name, version, since, until, report):
    """(feature names, columns, logged predictions or None) of one model's logged rows, a uniform sample of
    DRIFT_MAX_ROWS of them beyond that; the lines left out are counted in report.skipped."""
    rng, names, kept, seen = random.Random(DRIFT_SEED), None, [], 0
    for _, record in _payload_lines(paths, report):
        inputs, at = record.get("inputs"), _log_time(record.get("time"))
        if record.get("model") != name or (version is not None and str(record.get("version")) != version):
            report.skipped["for other models or versions"] += 1
        elif record.get("status") != 200:
            report.skipped["not answered 200"] += 1
        elif at is None or (since is not None and at < since) or (until is not None and at >= until):
            report.skipped["outside --since/--until (or without a time)"] += 1
        elif not isinstance(inputs, list) or not all(isinstance(row, list) for row in inputs) or \
                record.get("redacted") == "all":
            report.skipped["without tabular inputs"] += 1
        elif any(len(row) != len((kept[0][0] if kept else inputs[0])) for row in inputs):
            report.skipped["with rows of another width"] += 1
        else:
            names = names or record.get("features")
            logged = (record.get("outputs") or {}).get("predict")
            logged = logged if isinstance(logged, list) and len(logged) == len(inputs) else [None] * len(inputs)
            for pair in zip(inputs, logged):
                seen += 1
                if len(kept) < DRIFT_MAX_ROWS:
                    kept.append(pair)
                elif (slot := rng.randrange(seen)) < DRIFT_MAX_ROWS:
                    kept[slot] = pair
    report.logged_rows = seen
    columns = [[row[i] for row, _ in kept] for i in range(len(kept[0][0]) if kept else 0)]
    predictions = [prediction for _, prediction in kept]
    return names, columns, predictions if any(not _missing(p) for p in predictions) else None


def _log_time(text):
    """A payload log's "time" (or a --since/--until) as seconds since the epoch, UTC unless it says; None if
    it is no ISO 8601 date or time."""
    import datetime

    try:
        moment = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


class DriftReport:
    """The tests of one drift run: a line per feature (and the predictions), a summary, and the HTML report.

    `skipped` counts the log lines left out, by why (the payload log reader's convention)."""

    def __init__(self, name, version, reference_name, alpha):
        self.name, self.version, self.reference_name, self.alpha = name, version, reference_name, alpha
        self.skipped, self.logged_rows, self.rows = collections.Counter(), 0, []    # (name, profile, values, result)

    def bad_line(self, where, why):
        """A line of the logs that is no logged request: counted with the lines left out."""
        self.skipped["that are no logged request"] += 1

    def add(self, name, reference, values):
        try:
            result = compare_column(reference, values)
        except ValueError as error:
            raise ValueError(f"feature {name!r}: {error}") from None
        self.rows.append((name, reference, values, result))

    @property
    def threshold(self):
        """The p-value under which a test says drift: --p-value over the number of tests run (Bonferroni)."""
        return self.alpha / max(1, sum(result["test"] is not None for *_, result in self.rows))

    def drifted(self, result):
        return result["p_value"] is not None and result["p_value"] < self.threshold

    @property
    def found(self):
        return [name for name, *_, result in self.rows if self.drifted(result)]

    def lines(self):
        which = "all versions" if self.version is None else f"version {self.version}"
        width = max([7] + [len(name) for name, *_ in self.rows])
        out = [f"drift of model {self.name!r} ({which}): {self.logged_rows} logged row(s) against "
               f"{self.reference_name}",
               f"{'feature':<{width}}  test  statistic  p-value     PSI  distance                 missing  drift"]
        for name, _, _, result in self.rows:
            if result["test"] is None:
                out.append(f"{name:<{width}}  -     no values on one side{'':<33}{result['missing']:>7}  -")
                continue
            distance = f"{result['distance'][0]} {result['distance'][1]:.4g}"
            out.append(f"{name:<{width}}  {result['test']:<4}  {result['statistic']:>9.4f}  {result['p_value']:<9.3g}"
                       f"  {result['psi']:>6.3f}  {distance:<23}  {result['missing']:>7}  "
                       f"{'yes' if self.drifted(result) else 'no'}")
        tests = sum(result["test"] is not None for *_, result in self.rows)
        rule = f"p < {self.alpha:g} / {tests} test(s) = {self.threshold:.3g}, Bonferroni"
        found = self.found
        out.append(f"drift found in {len(found)} of {tests}: {', '.join(found)} ({rule})" if found else
                   f"no drift ({rule})")
        if self.skipped:
            out.append("skipped: " + ", ".join(f"{count} {why}" for why, count in sorted(self.skipped.items())))
        return out


_REFERENCE_COLOUR, _SERVED_COLOUR = "#7f9cc6", "#e0793a"


def _histogram(reference, values):
    """(bin labels, reference shares, served shares) for a chart: 20 equal bins over both samples' range for a
    numeric column, the 12 most frequent categories (and "other") for a categorical one."""
    import numpy as np

    present = [value for value in values if not _missing(value)]
    if reference["kind"] == "numeric":
        ref, served = np.asarray(reference["values"], dtype=float), np.asarray(present, dtype=float)
        both = np.concatenate([ref, served])
        low, high = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
        high = high if high > low else low + 1.0
        edges = np.linspace(low, high, 21)
        shares = [np.histogram(x, bins=edges)[0] / max(1, len(x)) for x in (ref, served)]
        return [f"{edge:.4g}" for edge in edges[:-1]] + [f"{high:.4g}"], shares[0], shares[1]
    ref, served = collections.Counter(reference["counts"]), collections.Counter(str(value) for value in present)
    ref_total, served_total = max(1, sum(ref.values())), max(1, len(present))
    top = [category for category, _ in (collections.Counter({c: n / ref_total for c, n in ref.items()}) +
                                         collections.Counter({c: n / served_total for c, n in served.items()}))
           .most_common(12)]
    rest = lambda counts, total: (total - sum(counts[c] for c in top)) / total
    labels = top + (["other"] if rest(ref, ref_total) or rest(served, served_total) else [])
    shares = [[counts[c] / total for c in top] + ([rest(counts, total)] if len(labels) > len(top) else [])
              for counts, total in ((ref, ref_total), (served, served_total))]
    return labels, np.array(shares[0]), np.array(shares[1])


def _histogram_svg(name, reference, values):
    """An inline SVG bar chart of a column's reference and served shares, side by side per bin."""
    import html

    labels, ref, served = _histogram(reference, values)
    bins = len(ref)
    width, height, left, bottom = 440, 180, 36, 34
    plot_width, plot_height = width - left - 8, height - bottom - 10
    top = max(float(max(ref.max(initial=0), served.max(initial=0))), 1e-9)
    step = plot_width / max(1, bins)
    bars = []
    for i in range(bins):
        for j, (shares, colour) in enumerate(((ref, _REFERENCE_COLOUR), (served, _SERVED_COLOUR))):
            h = plot_height * float(shares[i]) / top
            bars.append(f'<rect x="{left + i * step + 1 + j * (step - 2) / 2:.1f}" y="{10 + plot_height - h:.1f}" '
                        f'width="{max(0.5, (step - 2) / 2):.1f}" height="{h:.1f}" fill="{colour}"/>')
    if reference["kind"] == "numeric":
        ticks = [(left, labels[0], "start"), (left + plot_width, labels[-1], "end")]
    else:
        ticks = [(left + (i + 0.5) * step, label[:10], "middle") for i, label in enumerate(labels)]
    axis = "".join(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="{anchor}">{html.escape(text)}</text>'
                   for x, text, anchor in ticks)
    return (f'<svg class="histogram" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(name)}: reference and served shares</title>'
            f'<line x1="{left}" y1="{10 + plot_height}" x2="{left + plot_width}" y2="{10 + plot_height}" '
            f'stroke="#999"/><text x="{left - 4}" y="16" text-anchor="end">{top:.0%}</text>'
            f'{"".join(bars)}{axis}</svg>')


def drift_html(report):
    """The report as one self-contained page: a summary, a table of the tests, one histogram per column."""
    import html

    found, lines = report.found, report.lines()
    rows, figures = [], []
    for name, reference, values, result in report.rows:
        verdict = "drift" if report.drifted(result) else "no drift" if result["test"] else "not tested"
        cells = [name, result["test"] or "-"] + (["-"] * 4 if result["test"] is None else [
            f"{result['statistic']:.4f}", f"{result['p_value']:.3g}", f"{result['psi']:.3f}",
            f"{result['distance'][0]} {result['distance'][1]:.4g}"]) + [str(result["missing"]), verdict]
        rows.append(f'<tr class="{verdict.replace(" ", "-")}">' +
                    "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>")
        detail = "" if result["test"] is None else f" · {result['test']} p = {result['p_value']:.3g}, PSI " \
                                                     f"{result['psi']:.3f}"
        figures.append(f'<figure class="{verdict.replace(" ", "-")}"><figcaption><b>{html.escape(name)}</b> '
                       f'{html.escape(verdict + detail)}</figcaption>{_histogram_svg(name, reference, values)}</figure>')
    summary = (f"Drift in {len(found)} of {len(report.rows)}: {', '.join(found)}." if found else
               "No drift.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift of {html.escape(report.name)}</title>
<style>
 body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 64rem; padding: 0 1rem; color: #222; }}
 table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #ddd; }}
 tr.drift td, figure.drift figcaption {{ background: #fde8e4; }} .summary {{ font-size: 1.2rem; }}
 .grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(450px, 1fr)); gap: 1rem; }}
 figure {{ margin: 0; border: 1px solid #ddd; padding: .4rem; }} figcaption {{ padding: .1rem .3rem; }}
 svg text {{ font-size: 11px; fill: #555; }} .key {{ display: inline-block; width: .9rem; height: .9rem; }}
 pre {{ background: #f6f6f6; padding: .6rem; overflow: auto; }}
</style></head><body>
<h1>Drift of model {html.escape(report.name)}</h1>
<p class="summary">{html.escape(summary)}</p>
<p>{html.escape(lines[0])}. <span class="key" style="background:{_REFERENCE_COLOUR}"></span> reference
<span class="key" style="background:{_SERVED_COLOUR}"></span> served (each bar: the share of that side's values)</p>
<table><thead><tr><th>feature</th><th>test</th><th>statistic</th><th>p-value</th><th>PSI</th><th>distance</th>
<th>missing</th><th>verdict</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Histograms</h2><div class="grid">{"".join(figures)}</div>
<h2>Report</h2><pre>{html.escape(chr(10).join(lines))}</pre>
</body></html>
"""


@contextlib.contextmanager
def _store_model(store, name, version=None):
    """One loaded version of a model of the store (the highest served by default), for a command."""
    with command_registry(store).using(name, version) as model:
        yield model


def _profile_path(store, name):
    return os.path.join(Config.load({"store": store}).store, name, PROFILE_FILE)


def drift(arguments):
    """The DriftReport of a `drift` command's arguments; ValueError, OSError or ServiceError when it cannot run."""
    reference = arguments.reference or _profile_path(arguments.store, arguments.model)
    if reference.endswith(".json"):
        if not os.path.exists(reference):
            raise ValueError(f"no --reference, and no {reference}: store a profile first (python service.py "
                             f"profile TRAIN.csv --model {arguments.model}) or give --reference TRAIN.csv")
        profile = _read_profile(reference)
    else:
        with _store_model(arguments.store, arguments.model, arguments.version) as model:
            profile = build_profile(model, *read_table(reference), reference)
    report = DriftReport(arguments.model, arguments.version, f"{os.path.basename(reference)} "
                         f"({profile.get('rows', '?')} rows)", arguments.p_value)
    since, until = (None if text is None else _log_time(text) for text in (arguments.since, arguments.until))
    names, columns, predictions = _served(arguments.logs, arguments.model, arguments.version, since, until, report)
    if not columns:
        raise ValueError(f"no logged rows of model {arguments.model!r} to compare" +
                         (f" ({', '.join(f'{n} {why}' for why, n in sorted(report.skipped.items()))})"
                          if report.skipped else ""))
    features = profile["features"]
    if len(columns) != len(features):
        raise ValueError(f"the log's rows have {len(columns)} features, the reference {len(features)}")
    for feature, column, logged_name in zip(features, columns, names or [None] * len(columns)):
        report.add(logged_name or feature.get("name"), feature, column)
    if profile.get("prediction") and predictions is not None:
        report.add("prediction", profile["prediction"], predictions)
    return report


def _time_argument(text):
    if _log_time(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time, e.g. 2026-12-05T14:00")
    return text


def _probability(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def drift_command(argv):
    """`model-service drift LOG... --model NAME [--reference FILE] ...`; returns the exit code (0 no drift, 1 drift
    found, 2 could not run)."""
    parser = argparse.ArgumentParser(
        prog="model-service drift",
        description="Compare the rows a model was asked about (payload logs, --payload-log) with its training "
                    "data, feature by feature (KS or chi-squared, Bonferroni-corrected; PSI; Wasserstein or "
                    "Jensen-Shannon distance), and its logged predictions with its predictions on that data. "
                    "Exit status: 0 no drift, 1 drift found, 2 could not run.")
    parser.add_argument("logs", metavar="LOG", nargs="+", help="payload log file, or a folder of them")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model whose logged rows are compared")
    parser.add_argument("--version", metavar="V", help="only rows served by this version (default: all)")
    parser.add_argument("--reference", metavar="FILE", help=f"training rows (.csv, .jsonl, .parquet) or a profile "
                        f"(.json); default: the model's stored {PROFILE_FILE}")
    parser.add_argument("--store", metavar="DIR", help=f"model store (env {ENV_PREFIX}STORE; default: model_store)")
    parser.add_argument("--since", type=_time_argument, metavar="TIME", help="only rows logged at or after TIME (UTC)")
    parser.add_argument("--until", type=_time_argument, metavar="TIME", help="only rows logged before TIME (UTC)")
    parser.add_argument("--p-value", type=_probability, default=0.05, metavar="P",
                        help="significance over all tests, divided among them (Bonferroni; default 0.05)")
    parser.add_argument("--html", metavar="REPORT.html", help="also write a self-contained report with histograms")
    parser.add_argument("--fail-on", choices=("drift", "never"), default="drift",
                        help="exit 1 when drift is found (default), or never (exit 0 unless it cannot run)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        report = drift(arguments)
        if arguments.html:
            _write_text(arguments.html, drift_html(report))
    except Exception as error:  # any input: one line and status 2, never a traceback
        print(f"model-service drift: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 1 if report.found and arguments.fail_on == "drift" else 0


def _one_line(error):
    """Why a command could not run, in one line."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return getattr(error, "message", None) or str(error) or type(error).__name__


def _write_text(path, text):
    """Write a file whole: a reader sees the old one or the new one, never half of it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def profile_command(argv):
    """`model-service profile TRAIN --model NAME [--output FILE]`: a reference profile beside the model."""
    parser = argparse.ArgumentParser(
        prog="model-service profile",
        description=f"Summarise a model's training rows once, as {PROFILE_FILE} in its folder of the store, so that "
                    "`model-service drift` needs no training data at hand.")
    parser.add_argument("train", metavar="TRAIN", help="training rows: .csv (with a header), .jsonl or .parquet")
    parser.add_argument("--model", required=True, metavar="NAME", help="the model they trained")
    parser.add_argument("--version", metavar="V", help="the version whose predictions are profiled (default: the "
                        "highest served)")
    parser.add_argument("--store", metavar="DIR", help=f"model store (env {ENV_PREFIX}STORE; default: model_store)")
    parser.add_argument("--output", metavar="FILE", help=f"where to write it (default: the model's {PROFILE_FILE})")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        with _store_model(arguments.store, arguments.model, arguments.version) as model:
            if arguments.output is None and "/" not in model.ref.file:
                raise ValueError(f"model {model.name!r} is one file in the store ({model.ref.file}): give --output "
                                 f"FILE, or move it to {model.name}/1/ so that its profile sits beside it")
            profile = build_profile(model, *read_table(arguments.train), arguments.train)
        output = arguments.output or _profile_path(arguments.store, arguments.model)
        _write_text(output, dumps(profile) + "\n")
    except Exception as error:  # any input: one line and status 2, never a traceback
        print(f"model-service profile: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {output}: {profile['rows']} rows, {len(profile['features'])} features"
          f"{', and the predictions' if profile['prediction'] else ''}")
    return 0


###############################################################################
# Command line ################################################################
###############################################################################


def program_name():
    """The service's command as it was run, for its messages: `python service.py`, or the installed
    `model-service`."""
    return "python service.py" if os.path.basename(sys.argv[0]) == "service.py" else SERVICE_NAME


def _commands():
    """{name: (its function, what it does)}: the commands besides serving (`PROGRAM NAME --help` for each).
    A function, so that export, an appendix's, is named only at run time."""
    return {"export": (export_command, "write an artifact as a JSON model or a .skops file, proved alike"),
            "replay": (replay_command, "score a payload log again on one version of a model and compare"),
            "drift": (drift_command, "compare a payload log's rows and predictions with the training data"),
            "profile": (profile_command, "summarise a model's training rows for drift, beside the model")}


def build_parser():
    program = program_name()
    commands = "".join(f"  {program} {name:<8} {what}\n" for name, (_, what) in _commands().items())
    parser = _OneLineErrors(
        prog=program, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the scikit-learn models in a folder over HTTP (JSON in, JSON out).\n\n"
                    f"Other commands (each with its own --help):\n{commands}",
        epilog=f"Every option can also be set by an environment variable ({ENV_PREFIX}<OPTION>, for example\n"
               "MODEL_SERVICE_PORT=9000); a flag beats the environment, which beats the default.")
    for setting in SETTINGS:
        default = setting.default
        shown = "none" if default in (None, ()) else ("yes" if default else "no") if type(default) is bool else default
        optional = {"nargs": "?", "const": setting.const} if setting.const else {}
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.metavar, default=None,
                            help=f"{setting.help} (env {setting.env}; default: {shown})", **optional)
    parser.add_argument("--version", action="version", version=f"{SERVICE_NAME} {__version__}")
    return parser


def _grpc_missing():
    """The module --grpc-port needs and cannot import (grpc, google.protobuf), or None."""
    for module in ("grpc", "google.protobuf"):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


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
    commands = _commands()
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]][0](argv[1:])
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
    if config.grpc_port is not None and _grpc_missing():
        refuse(f"--grpc-port needs grpcio and protobuf ({_grpc_missing()} is not installed): pip install '.[grpc]'")
    try:
        traced = trace_exporter_wanted(os.environ) in TRACE_EXPORTERS
    except ValueError as error:
        refuse(str(error))
    if traced and _otel_sdk_missing():
        refuse(_otel_sdk_missing())
    warn_of_stray_variables(os.environ)
    application = create_app(config=config)
    if config.workers == 1:          # under --workers the parent loads before forking, without threads
        application.registry.refresh()
    try:
        serve(application, config)
    except KeyboardInterrupt:
        logger.info("stopped")
    except ImportError as error:
        logger.error("server %r is not installed: %s", config.server, error)
        return 2
    except (OSError, ValueError) as error:      # waitress: "Invalid host/port specified." for a bad --host
        busy = isinstance(error, OSError) and error.errno == errno.EADDRINUSE
        logger.error("cannot serve on %s:%s: %s%s", config.host, config.port, error,
                     "; another process holds the port: stop it, or pick another with --port N (or "
                     f"{ENV_PREFIX}PORT)" if busy else "")
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
# configuration contexts, joblib dispatch, a DataFrame's column checks): a 100-tree forest
# spends milliseconds on a row its trees walk in microseconds, a typical tabular pipeline
# (named columns, text categories one-hot encoded, a linear model) about 3 ms on 20 µs of
# arithmetic.  So at load, for the families whose arithmetic is known, the fitted arrays are
# compiled into closures that repeat scikit-learn's operations exactly, calling its own
# compiled code where it has it: the same matrix product on the same array, float32 inputs
# compared against float64 thresholds by its own tree walk, trees summed in order and then
# divided, the same argmax and the same class labels; a pipeline's transforms (columns chosen
# by name or position, imputers, scalers, numpy ufuncs, encoders of text or number categories
# with their dropped and infrequent categories) run their arithmetic first.  One sub-section per
# family, in this order:
#   Linear models             _linear_regressor, _linear_classifier (dense or sparse products, probabilities)
#   Trees and forests         _tree_model over _leaf_walker: all trees merged into one scikit-learn Tree
#   Gradient boosting         _gradient_boosting (predict_stages), _hist_gradient_boosting over _hist_walker
#   Pipelines: column selection, encoders, scalers     _compile_pipeline over _native_transforms
#   Proof at load             _compile, _prove: compile_native and attach_native, the entry point
# Nothing here is trusted on its reading of scikit-learn's code: every compiled method is
# PROVED on probe rows built from the model (random rows, every tree threshold with its
# neighbours in the precision the model compares in, an encoder's categories and unknown
# values, whole numbers, NaN and infinities) against the estimator's own method given what the
# service would give it (LoadedModel.sklearn_inputs: the rows, or their DataFrame), bit for bit in
# values, dtype and shape, one row at a time and in batches; a method that differs, fails or is
# not compiled is answered by scikit-learn, with the reason in the model's status.  At request
# time the native path takes only inputs it can prove it treats exactly as scikit-learn would
# (NativePredictor.prepare: rows of the right width, numbers where numbers go, values the model
# accepts); everything else goes to scikit-learn, so its refusals and their messages are unchanged.
# Nothing from the artifact is trusted either: tree nodes are checked before compiled code
# follows them, and every temporary is bounded (_PAIR_VALUES).

NATIVE_PROBE_SEED = 14          # probes are random but the same at every load: a proof can be rerun
_RANDOM_PROBES = 512            # random rows in every proof, besides the threshold rows of trees
_SINGLE_PROBES = 4              # rows of the probe batch also proved one at a time (each costs a forest
                                # ~12 ms in scikit-learn: the proof of a 100-tree forest stays under 1 s)
_PAIR_VALUES = 1 << 22          # values one walk of (tree, row) pairs copies (16 MiB of float32, 32 of float64):
                                # bounds the temporaries of a large forest or batch
_ROWS_PER_TREE = 128            # from this many rows, histogram boosting walks one predictor at a time


class _NotNative(Exception):
    """Why a model (or one of its methods) is left to scikit-learn."""


#: what an estimator is given: `text`, the positions of columns holding text categories (Python objects); `sparse`,
#: whether scikit-learn hands it a sparse matrix (a ColumnTransformer's one-hot before it)
_Given = collections.namedtuple("_Given", "text sparse", defaults=(frozenset(), False))


class NativePredictor:
    """A model's proved native methods and the input check that keeps them on proved ground.

    `prepare(inputs)` is the array the methods take (float32 for trees, whose scikit-learn
    converts to it first), or None when the inputs must go to scikit-learn.  Inputs are rows in
    feature order as model_inputs makes them: float64 numbers, or Python objects when a cell is
    text.  A model with `text` columns takes both (numbers are made objects, as the DataFrame
    scikit-learn gets holds them), its other columns having to read as numbers the model
    accepts; any other model takes C-ordered float64 only.  A pipeline's predictor runs its
    steps' arithmetic in `prepare` and hands the result to its final estimator's predictor,
    whose own check then decides (a scaler passes NaN on; a linear model refuses it, and then
    scikit-learn gives the refusal).  A step answers None for rows it leaves to scikit-learn (an
    encoder meeting a category it must refuse).  `categories` ({column: values}) are the values
    an encoder knows in the columns it encodes: probes and tests draw those columns from them,
    as random numbers would all be unknown.
    """

    def __init__(self, methods, n_features, allow_nan, allow_inf=False, float32=False, steps=None, final=None,
                 categories=None, text=frozenset()):
        import numpy as np

        self.methods = methods                      # {method: function of the prepared array}
        self._n_features, self._allow_nan, self._allow_inf, self._float32 = n_features, allow_nan, allow_inf, \
            float32
        self._steps, self._final, self.categories, self.text = steps, final, categories or {}, text
        self._numbers = np.array([column for column in range(n_features) if column not in text], dtype=np.intp)
        self._ndarray, self._float64 = np.ndarray, np.dtype(np.float64)
        refuses = {(False, False): lambda X: not np.isfinite(X).all(), (True, False): lambda X: np.isinf(X).any(),
                   (False, True): lambda X: np.isnan(X).any(), (True, True): lambda X: False}
        self._refuses = refuses[bool(allow_nan), bool(allow_inf)]     # whether X holds what the model refuses

    def prepare(self, inputs):
        if type(inputs) is not self._ndarray or inputs.ndim != 2 or inputs.shape[1] != self._n_features \
                or not inputs.shape[0]:
            return None
        if self.text:
            return self._prepare_text(inputs)
        if inputs.dtype != self._float64 or not inputs.flags.c_contiguous:
            return None
        if self._float32:       # values past float32's range become infinities, which scikit-learn refuses
            inputs = inputs.astype("float32")
        return None if self._refuses(inputs) else self._then(inputs)

    def _prepare_text(self, inputs):
        if inputs.dtype == self._float64:
            inputs = inputs.astype(object)
        elif inputs.dtype != object:
            return None
        try:
            numbers = inputs[:, self._numbers].astype(self._float64)
        except (TypeError, ValueError):     # text where numbers go: scikit-learn's refusal
            return None
        return None if self._refuses(numbers) else self._then(inputs)

    def _then(self, inputs):
        if self._final is None:
            return inputs
        inputs = self._steps(inputs)
        return None if inputs is None else self._final.prepare(inputs)


@functools.cache
def _native_compilers():
    """{estimator class: compiler}: exact classes only, so a subclass's own predict is never bypassed.

    A compiler takes the estimator and what it is given (_Given) and returns its methods, the
    `splits` of its trees (None, or each feature's thresholds and the dtype its inputs are
    compared in) and, where the model transforms its rows itself first (histogram boosting's
    categories), the _Step that does.
    """
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


# -- Linear models -------------------------------------------------------------

def _linear_scores(estimator, sparse):
    """`X @ coef_.T + intercept_`, the product scikit-learn's linear models compute: on the same dense array (the
    same BLAS call), or for rows scikit-learn holds as a sparse matrix, as scipy sums it (_sparse_product)."""
    import numpy as np

    coef, intercept = estimator.coef_, estimator.intercept_
    if type(coef) is not np.ndarray or coef.dtype != np.float64:
        raise _NotNative(f"coef_ is a {type(coef).__name__} of {getattr(coef, 'dtype', '?')}, not float64 numbers")
    coef_t = coef.T if coef.ndim == 2 else coef
    if not sparse:
        return lambda X: X @ coef_t + intercept
    if not np.isfinite(coef).all():
        raise _NotNative("coefficients that are not finite, times the zeros a sparse matrix leaves out")
    return _sparse_product(coef_t, intercept)


def _sparse_product(coef_t, intercept):
    """X @ coef_t + intercept as scipy multiplies a CSR matrix by dense columns (csr_matvec, csr_matvecs), X being
    the matrix's rows made dense: each row's values times their coefficients, added into zero one after the other in
    column order.  A zero the sparse matrix leaves out adds a signed zero here, which changes no sum."""
    import numpy as np

    columns = coef_t.reshape(len(coef_t), -1)                   # (features, outputs)
    chunk = max(1, _PAIR_VALUES // columns.size)

    def scores(X):
        if len(X) > chunk:
            return np.concatenate([scores(X[at:at + chunk]) for at in range(0, len(X), chunk)])
        products = np.empty((len(columns) + 1, len(X), columns.shape[1]))
        products[0] = 0.0
        np.multiply(X.T[:, :, np.newaxis], columns[:, np.newaxis, :], out=products[1:])
        found = _sum_in_order(products.reshape(len(products), -1)).reshape(len(X), columns.shape[1])
        return (found if coef_t.ndim == 2 else found[:, 0]) + intercept

    return scores


def _linear_regressor(estimator, given):
    """predict is the scores themselves (LinearModel._decision_function, SGDRegressor's ravel of a 1-D)."""
    return {"predict": _linear_scores(estimator, given.sparse)}, None


def _linear_classifier(estimator, given):
    """LinearClassifierMixin: decision_function, predict by sign or argmax; LogisticRegression's probabilities."""
    import numpy as np

    binarizer = getattr(estimator, "_label_binarizer", None)
    if binarizer is not None and binarizer.y_type_.startswith("multilabel"):
        raise _NotNative("a multilabel RidgeClassifier predicts through its label binarizer")
    scores, classes, intp = _linear_scores(estimator, given.sparse), estimator.classes_, np.intp

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


# -- Trees and forests ---------------------------------------------------------

def _tree_model(estimator, given):
    """A tree or a forest of them: the leaf of every (tree, row) pair found in one walk, the leaf values summed in
    order, then averaged.

    A forest adds each tree's prediction into a zeroed float64 accumulator in the order of
    `estimators_` and divides by their count (ForestClassifier.predict_proba,
    ForestRegressor.predict); _sum_in_order adds in that order.  A lone tree's answer is its
    leaf's value.  Only forests predicting in one thread: with n_jobs, scikit-learn adds the trees
    in the order its threads finish, and its own answers vary in the last bit.
    """
    import numpy as np

    forest = hasattr(estimator, "estimators_")
    members = list(estimator.estimators_) if forest else [estimator]
    if forest and estimator.n_jobs not in (None, 1):
        raise _NotNative(f"n_jobs={estimator.n_jobs}: scikit-learn sums the trees in the order its threads finish")
    member_classes = {type(estimator.estimator)} if forest else {type(estimator)}
    if {type(member) for member in members} != member_classes:
        raise _NotNative("its trees are not all of the class it builds")
    trees = [member.tree_ for member in members]
    classifier, several = hasattr(estimator, "classes_"), estimator.n_outputs_ > 1
    values = np.concatenate([tree.value for tree in trees])      # (nodes, outputs, most classes)
    values = values if classifier and several else values[:, 0, :len(estimator.classes_)] if classifier else \
        values[:, :, 0] if several else values[:, 0, 0]
    shape, count = values.shape[1:], len(trees)
    # each node's values as one row, and a row of zeros after them: where a forest's sum starts
    table = np.concatenate([values.reshape(len(values), -1), np.zeros((1, int(np.prod(shape))))])
    leaves, splits, chunk = _leaf_walker(trees, estimator.n_features_in_, table.shape[1])

    def combined(X):
        if len(X) > chunk:                        # rows are independent: bound the (tree, row) temporaries
            return np.concatenate([combined(X[start:start + chunk]) for start in range(0, len(X), chunk)])
        found = leaves(X)                         # (trees, rows): the row of `table` each pair ends on
        if not forest:
            return table.take(found[0], axis=0).reshape(len(X), *shape)
        index = np.empty((count + 1, len(X)), dtype=np.intp)
        index[0], index[1:] = len(table) - 1, found
        return _sum_in_order(table.take(index.reshape(-1), axis=0).reshape(count + 1, -1)).reshape(
            len(X), *shape) / count

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


def _sum_in_order(stack):
    """stack[0] + stack[1] + ... + stack[-1] for each column of a 2-D `stack`, added one after the other as
    scikit-learn's loops add (a forest's trees, boosting's iterations).

    numpy reduces a leading axis one row after the other, column by column; only a single
    column, which it reduces as a contiguous run, would be summed pairwise: so a lone column is
    summed beside a copy of itself.
    """
    import numpy as np

    if stack.shape[1] == 1:
        return np.add.reduce(np.repeat(stack, 2, axis=1), axis=0)[:1]
    return np.add.reduce(stack, axis=0)


def _leaf_walker(trees, n_features, value_width):
    """(leaves, splits, chunk): leaves(X) -> the leaf of every (tree, row) pair of float32 rows X, as an index into
    the trees' nodes laid end to end ((trees, rows) intp), found by ONE call of scikit-learn's own tree walk.

    The trees are merged into one scikit-learn Tree (_merged_tree) whose first levels send a row
    to tree k when an extra column holds k; every row is copied once per tree beside its number,
    and Tree.apply walks all of them in C, as each tree's own apply would: the number of calls
    does not grow with depth.  `chunk` is the most rows one call takes, which bounds the copies
    to _PAIR_VALUES values; `splits` is each feature's thresholds and float32, for the proof.
    """
    import numpy as np

    merged, first = _merged_tree(trees, n_features)
    count, width = len(trees), n_features + 1
    if count * (width + value_width) > 16 * _PAIR_VALUES:
        raise _NotNative(f"{count} trees of {n_features} features are too many to walk a row at once")
    numbers = np.arange(count, dtype=np.float32)

    def leaves(X):
        found = merged.apply(_pairs(X, numbers))
        found -= first
        return found.reshape(count, len(X))

    nodes = [tree.__getstate__()["nodes"] for tree in trees]
    splits = _split_thresholds(np.concatenate([n["feature"] for n in nodes]),
                               np.concatenate([n["threshold"] for n in nodes]),
                               np.concatenate([n["left_child"] for n in nodes]) != -1, n_features)
    return leaves, (splits, np.float32), max(1, _PAIR_VALUES // (count * (width + value_width)))


def _pairs(X, numbers):
    """Every row of X beside every tree number, tree after tree: (len(numbers) * len(X), width + 1) of X's dtype (a
    broadcast for a few rows, copies of whole blocks beyond, which cost a quarter as much)."""
    import numpy as np

    count, (rows, width) = len(numbers), X.shape
    if rows < 8:
        pairs = np.empty((count, rows, width + 1), dtype=X.dtype)
        pairs[:, :, :-1] = X
    else:
        beside = np.empty((rows, width + 1), dtype=X.dtype)
        beside[:, :-1] = X
        pairs = np.tile(beside, (count, 1)).reshape(count, rows, width + 1)
    pairs[:, :, -1] = numbers[:, np.newaxis]
    return pairs.reshape(-1, width + 1)


def _merged_tree(trees, n_features):
    """(tree, first): one scikit-learn Tree holding every tree's nodes, in order from index `first` on, behind
    len(trees) - 1 nodes on an extra column (number n_features) that send a row to tree k's root when it holds k.

    Each tree's nodes are copied as they are (children moved by the tree's offset), so a row
    beside k walks tree k exactly as tree k's own apply walks it: its float32 values against the
    float64 thresholds, NaN where missing_go_to_left says.  The nodes come from the artifact and
    the compiled walk follows them unchecked, so they are checked first (_checked_nodes).
    """
    import numpy as np
    from sklearn.tree._tree import NODE_DTYPE, Tree

    nodes = [tree.__getstate__()["nodes"] for tree in trees]
    if any(part.dtype != NODE_DTYPE for part in nodes):
        raise _NotNative("its trees' nodes are not of this scikit-learn's layout")
    for part in nodes:
        _checked_nodes(part["left_child"], part["right_child"], part["feature"], part["left_child"] == -1,
                       n_features)
    first = len(trees) - 1
    starts = first + np.cumsum([0] + [len(part) for part in nodes])
    merged, roots = np.zeros(starts[-1], dtype=NODE_DTYPE), starts[:-1]
    merged["left_child"][:first], merged["right_child"][:first], merged["threshold"][:first] = _dispatch(roots)
    merged["feature"][:first] = n_features
    for part, start in zip(nodes, roots):
        placed = merged[start:start + len(part)]
        placed[...] = part
        inner = part["left_child"] != -1
        placed["left_child"][inner] += start
        placed["right_child"][inner] += start
        placed["right_child"][~inner] = -1
    tree = Tree(n_features + 1, np.ones(1, dtype=np.intp), 1)
    tree.__setstate__({"max_depth": max(t.max_depth for t in trees) + len(trees).bit_length(),
                       "node_count": len(merged), "nodes": merged, "values": np.zeros((len(merged), 1, 1))})
    return tree, first


def _dispatch(roots):
    """(left, right, threshold) of the len(roots) - 1 nodes, numbered from 0, of a balanced search for a tree number k
    (0 <= k < len(roots)): node i sends k <= threshold[i] to left[i], else to right[i]; each tree k is found at
    roots[k]."""
    left, right, threshold = [], [], []

    def node(low, high):                # the trees numbered low to high - 1, at least two
        index, middle = len(left), (low + high) // 2
        left.append(roots[low])
        right.append(roots[middle])
        threshold.append(middle - 0.5)
        if middle - low > 1:
            left[index] = node(low, middle)
        if high - middle > 1:
            right[index] = node(middle, high)
        return index

    if len(roots) > 1:
        node(0, len(roots))
    return left, right, threshold


def _checked_nodes(left, right, feature, leaf, n_features):
    """Refuse nodes that compiled code would follow out of their array or round a loop: every inner node's children
    come after it, as scikit-learn's builders add them, and inside the array, and it splits on one of the features."""
    import numpy as np

    own, inner = np.arange(len(left)), ~leaf
    if not len(left) or not ((left[inner] > own[inner]) & (right[inner] > own[inner]) & (left[inner] < len(left))
                             & (right[inner] < len(left)) & (feature[inner] >= 0)
                             & (feature[inner] < n_features)).all():
        raise _NotNative("a tree's nodes do not form a tree over its features")


def _split_thresholds(feature, threshold, inner, n_features):
    """Each feature's distinct split thresholds, for the probe rows."""
    import numpy as np

    feature, threshold = feature[inner], threshold[inner]
    order = np.lexsort((threshold, feature))
    bounds = np.searchsorted(feature[order], np.arange(n_features + 1))
    return [np.unique(threshold[order[bounds[f]:bounds[f + 1]]]) for f in range(n_features)]


# -- Gradient boosting ---------------------------------------------------------

def _gradient_boosting(estimator, given):
    """GradientBoosting: the init estimator's constant, then scikit-learn's own predict_stages.

    _raw_predict starts from the init estimator's answer and lets predict_stages (compiled) add
    `learning_rate * value[leaf]` of every stage, in order; the native predictor makes the same
    call on the same float32 rows, only without the input checks.  The constant is the init
    estimator's answer for any row, so only the "zero" init and scikit-learn's dummy estimators,
    which ignore the rows, are compiled.  The stages' nodes are checked first, as predict_stages
    follows them unchecked.
    """
    import numpy as np
    from sklearn import dummy, tree
    from sklearn.ensemble._gradient_boosting import predict_stages

    if not (isinstance(estimator.init_, str) and estimator.init_ == "zero") and \
            type(estimator.init_) not in (dummy.DummyClassifier, dummy.DummyRegressor):
        raise _NotNative(f"its init estimator {type(estimator.init_).__name__} may depend on the rows")
    stages, n_features = estimator.estimators_, estimator.n_features_in_
    if {type(member) for member in stages.ravel()} != {tree.DecisionTreeRegressor}:
        raise _NotNative("its stages are not all DecisionTreeRegressor")
    nodes = [stage.tree_.__getstate__()["nodes"] for stage in stages.ravel()]
    for part in nodes:
        _checked_nodes(part["left_child"], part["right_child"], part["feature"], part["left_child"] == -1,
                       n_features)
    start = estimator._raw_predict_init(np.zeros((1, n_features), dtype=np.float32))
    scale = estimator.learning_rate

    def raw(X):
        found = np.repeat(start, len(X), axis=0)
        predict_stages(stages, X, scale, found)
        return found

    splits = _split_thresholds(np.concatenate([n["feature"] for n in nodes]),
                               np.concatenate([n["threshold"] for n in nodes]),
                               np.concatenate([n["left_child"] for n in nodes]) != -1, n_features)
    if not hasattr(estimator, "classes_"):
        return {"predict": lambda X: raw(X).ravel()}, (splits, np.float32)
    return _boosted_classifier(raw, estimator, np.greater_equal), (splits, np.float32)


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


def _hist_gradient_boosting(estimator, given):
    """HistGradientBoosting: the baseline, plus each iteration's leaf, in order; categories encoded first.

    _raw_predict starts from zeros, adds `_baseline_prediction`, then each predictor's leaf
    value into its class's column, iteration after iteration (threads split the rows, never a
    row's sum); _sum_in_order adds in that order, into the same Fortran-ordered (rows, classes)
    array.  The leaves are found by scikit-learn's own compiled walk (_hist_walker), float64
    values against float64 thresholds, NaN and categories as its bitsets say.  Categorical
    features first go through the model's own ColumnTransformer (`_preprocessor`: an
    OrdinalEncoder of those columns, unknown categories becoming NaN, then the others), compiled
    as a pipeline's is and run in the predictor's `prepare`.  Regression applies the loss's
    inverse link, as predict does.
    """
    import numpy as np

    iterations = estimator._predictors
    if not iterations or len({len(iteration) for iteration in iterations}) != 1:
        raise _NotNative("no fitted iterations, or iterations of different sizes")
    n_iterations, n_classes = len(iterations), len(iterations[0])
    predictors = [predictor for iteration in iterations for predictor in iteration]
    known, feature_map = estimator._bin_mapper.make_known_categories_bitsets()
    walk, thresholds, chunk = _hist_walker(predictors, estimator.n_features_in_, known, feature_map)
    start = np.zeros((n_classes, 1), dtype=estimator._baseline_prediction.dtype)
    start += estimator._baseline_prediction.T

    def raw(X):
        if len(X) > chunk:
            return np.asfortranarray(np.concatenate([raw(X[at:at + chunk]) for at in range(0, len(X), chunk)]))
        stack = np.empty((n_iterations + 1, n_classes, len(X)))
        stack[0] = start
        walk(X, stack[1:].reshape(-1))
        return _sum_in_order(stack.reshape(n_iterations + 1, -1)).reshape(n_classes, len(X)).T

    if estimator._preprocessor is None:
        encode = ()
    else:       # the encoded columns come first: the trees' features are in that order
        mask = np.asarray(estimator.is_categorical_, dtype=bool)
        order = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
        thresholds = [thresholds[position] for position in np.argsort(order)]
        step = _compile_step("_preprocessor", estimator._preprocessor, given.text)
        encode = (step._replace(function=_tree_ready(step.function, False)),)
    if not hasattr(estimator, "classes_"):
        inverse = estimator._loss.link.inverse
        return ({"predict": lambda X: inverse(raw(X).ravel())}, (thresholds, np.float64)) + encode
    return (_boosted_classifier(raw, estimator, np.greater), (thresholds, np.float64)) + encode


def _hist_walker(predictors, n_features, known, feature_map):
    """(walk, thresholds, chunk): walk(X, out) writes into `out` the leaf value of every (predictor, row) pair of the
    float64 rows X, predictor after predictor, by ONE call of scikit-learn's own _predict_from_raw_data.

    As _merged_tree does for trees, the predictors' nodes are laid end to end behind
    len(predictors) - 1 nodes on an extra column that send a row beside k to predictor k's
    root, categorical nodes pointing into the predictors' bitsets laid end to end; the rows are
    copied once per predictor beside its number.  From _ROWS_PER_TREE rows on, one call per
    predictor on the rows themselves costs less than the copies and the extra levels.  `known` and
    `feature_map` are the bin mapper's bitsets of known categories, which _predict_iterations passes.  The nodes come from the
    artifact and the walk follows them unchecked: checked first, bitset indices included.
    `chunk` bounds the copies as _leaf_walker's does; `thresholds` are each feature's numeric splits.
    """
    import numpy as np
    from sklearn.ensemble._hist_gradient_boosting._predictor import _predict_from_raw_data
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    count, width = len(predictors), n_features + 1
    if count * width > 16 * _PAIR_VALUES:
        raise _NotNative(f"{count} trees of {n_features} features are too many to walk a row at once")
    first = count - 1
    starts = first + np.cumsum([0] + [len(predictor.nodes) for predictor in predictors])
    nodes, roots = np.zeros(starts[-1], dtype=PREDICTOR_RECORD_DTYPE), starts[:-1]
    nodes["left"][:first], nodes["right"][:first], nodes["num_threshold"][:first] = _dispatch(roots)
    nodes["feature_idx"][:first] = n_features
    bitsets, used = [np.zeros((0, 8), dtype=np.uint32)], 0
    for predictor, start in zip(predictors, roots):
        part, own_bitsets = predictor.nodes, predictor.raw_left_cat_bitsets
        if part.dtype != PREDICTOR_RECORD_DTYPE or own_bitsets.dtype != np.uint32 or own_bitsets.shape[1:] != (8,):
            raise _NotNative("its predictors are not of this scikit-learn's layout")
        leaf, categorical = part["is_leaf"] != 0, (part["is_leaf"] == 0) & (part["is_categorical"] != 0)
        _checked_nodes(part["left"].astype(np.intp), part["right"].astype(np.intp), part["feature_idx"], leaf,
                       n_features)
        if not ((part["bitset_idx"][categorical] < len(own_bitsets)).all()
                and (feature_map[part["feature_idx"][categorical]] < len(known)).all()):
            raise _NotNative("a categorical split points past its bitsets")
        placed = nodes[start:start + len(part)]
        placed[...] = part
        placed["left"][~leaf] += np.uint32(start)
        placed["right"][~leaf] += np.uint32(start)
        placed["bitset_idx"][categorical] += np.uint32(used)
        bitsets.append(own_bitsets)
        used += len(own_bitsets)
    bitsets = np.ascontiguousarray(np.concatenate(bitsets))
    known, feature_map = np.ascontiguousarray(known, dtype=np.uint32), np.ascontiguousarray(feature_map,
                                                                                            dtype=np.uint32)
    if len(feature_map) != n_features:
        raise _NotNative("its bin mapper does not map every feature")
    numbers = np.arange(count, dtype=np.float64)
    own = [(predictor.nodes, predictor.raw_left_cat_bitsets) for predictor in predictors]

    def walk(X, out):
        if len(X) >= _ROWS_PER_TREE:        # each predictor on the rows themselves: no copies, no search
            for (part, own_bitsets), into in zip(own, out.reshape(count, len(X))):
                _predict_from_raw_data(part, X, own_bitsets, known, feature_map, 1, into)
            return
        _predict_from_raw_data(nodes, _pairs(X, numbers), bitsets, known, feature_map, 1, out)

    numeric = (nodes["is_leaf"] == 0) & (nodes["is_categorical"] == 0)
    numeric[:first] = False
    return walk, _split_thresholds(nodes["feature_idx"], nodes["num_threshold"], numeric, n_features), \
        max(1, _PAIR_VALUES // (count * width))


# -- Pipelines: column selection, encoders, scalers ----------------------------

def _tree_ready(transform, sparse):
    """`transform`, its rows made C-ordered for a tree's predictor (trees read any layout alike), and where
    scikit-learn would hand the tree a sparse matrix, None for NaN, which trees refuse in one."""
    import numpy as np

    def ready(X):
        X = transform(X)
        return None if X is None or sparse and np.isnan(X).any() else np.ascontiguousarray(X)

    return ready


@functools.cache
def _native_transforms():
    """{transformer class: compiler of its transform}, exact classes only, for a pipeline's steps.

    A compiler takes the step and the positions of its input columns that hold text (Python
    objects), and returns a _Step.
    """
    from sklearn import compose, impute, pipeline, preprocessing

    return {preprocessing.StandardScaler: _standard_scaler, preprocessing.MinMaxScaler: _min_max_scaler,
            impute.SimpleImputer: _simple_imputer, preprocessing.FunctionTransformer: _function_transformer,
            preprocessing.OneHotEncoder: _one_hot_encoder, preprocessing.OrdinalEncoder: _ordinal_encoder,
            compose.ColumnTransformer: _column_transformer, pipeline.Pipeline: _transform_chain}


#: a compiled transform: function(X) -> transformed rows, or None to leave them to scikit-learn;
#: categories {input column: values to probe it on}; sparse: scikit-learn answers a sparse matrix there;
#: text: it answers text (Python objects), not numbers
_Step = collections.namedtuple("_Step", "function categories sparse text")


def _compile_step(name, step, text):
    """The _Step of one transformer whose input columns `text` (positions) hold text; 'passthrough' (or None) is the
    identity."""
    if step is None or (isinstance(step, str) and step == "passthrough"):
        return _Step(lambda X: X, {}, False, bool(text))
    compiler = _native_transforms().get(type(step))
    if compiler is None or "transform" in vars(step):
        raise _NotNative(f"no native version of its step {name!r} ({type(step).__name__})")
    return compiler(step, text)


def _numbers_only(step, text):
    """Refuse a step that computes on numbers when its columns hold text."""
    if text:
        raise _NotNative(f"its {type(step).__name__} is given text columns")


def _all_text(step, text):
    """Whether the columns of an encoder or imputer all hold text (True) or all numbers (False); a mix, which
    scikit-learn treats column by column, is left to it."""
    if not text:
        return False
    if text == frozenset(range(step.n_features_in_)):
        return True
    raise _NotNative(f"its {type(step).__name__} takes text and number columns together")


def _transform_chain(pipeline, text, steps=None):
    """Pipeline.transform (or the steps before a pipeline's final estimator): each step on the last one's output.

    The probe values are the first step's: later steps see transformed columns.  A step that
    answers text hands the next one text in every column.
    """
    compiled = []
    for name, step in (pipeline.steps if steps is None else steps):
        compiled.append(_compile_step(name, step, text))
        text = text if compiled[-1].text else frozenset()
    if any(step.sparse for step in compiled[:-1]):
        raise _NotNative("a step after one that answers a sparse matrix (its sparse arithmetic is its own)")
    functions = tuple(step.function for step in compiled)

    def chain(X):
        for function in functions:
            X = function(X)
            if X is None:
                return None
        return X

    return _Step(chain, compiled[0].categories if compiled else {}, any(step.sparse for step in compiled),
                 bool(text))


#: numpy functions a FunctionTransformer may apply natively: the same ufunc on the same values
_UFUNCS = ("abs", "absolute", "cbrt", "exp", "exp2", "expm1", "log", "log10", "log1p", "log2", "negative", "sqrt",
           "square")


def _function_transformer(step, text):
    """FunctionTransformer without validation: no function (a ColumnTransformer's passthrough, which hands text on
    as it came), a numpy ufunc of _UFUNCS on numbers, or the check_array that histogram boosting's preprocessor
    gives its numeric columns, which leaves float64 rows as they are (its ColumnTransformer makes them numbers)."""
    import numpy as np
    from sklearn.utils import check_array

    func = step.func
    checks = isinstance(func, functools.partial) and func.func is check_array and not func.args and \
        func.keywords == {"dtype": [np.float64], "ensure_all_finite": False}
    ufunc = any(func is getattr(np, name) for name in _UFUNCS)
    if step.validate or step.kw_args or not (func is None or checks or ufunc):
        raise _NotNative("a FunctionTransformer with validation, arguments or a function not among numpy's ufuncs")
    if func is None:
        return _Step(lambda X: X, {}, False, bool(text))
    _numbers_only(step, text)
    return _Step(func if ufunc else (lambda X: X), {}, False, False)


def _column_transformer(step, text):
    """ColumnTransformer.transform: each transformer on its columns, stacked side by side.

    The columns are the indices scikit-learn resolved at fit (by name, position, mask or
    callable), which are the positions of the features in the rows the service makes.  A part
    of text columns gets them as objects; a part of number columns gets them as float64, as
    scikit-learn's own check makes the DataFrame's columns (text there: scikit-learn refuses).
    Dense here even where scikit-learn stacks a sparse matrix: the values are the same, and
    only trees and _sparse_product read them (see _compile_pipeline).
    """
    import numpy as np

    parts, categories = [], {}
    for name, transformer, _ in step.transformers_:
        columns = np.asarray(step._transformer_to_input_indices[name], dtype=np.intp)
        if (isinstance(transformer, str) and transformer == "drop") or not len(columns):
            continue
        inner = frozenset(position for position, column in enumerate(columns) if column in text)
        if inner and len(inner) != len(columns):
            raise _NotNative(f"its part {name!r} takes text and number columns together")
        compiled = _compile_step(name, transformer, inner)
        if compiled.text:
            raise _NotNative(f"its part {name!r} hands text on, which no model computes with")
        parts.append((columns, compiled.function, bool(inner)))
        categories.update({int(columns[j]): values for j, values in compiled.categories.items()})

    def stacked(X):
        outputs = []
        for columns, function, takes_text in parts:
            part = X[:, columns]
            if part.dtype == object and not takes_text:
                try:
                    part = part.astype(np.float64)
                except (TypeError, ValueError):
                    return None
            outputs.append(function(part))
            if outputs[-1] is None:
                return None
        return np.hstack(outputs)

    return _Step(stacked, categories, bool(step.sparse_output_), False)


def _encoder_codes(encoder, text, ignore):
    """(codes, probes): codes(X) -> (X_int, X_mask) as _BaseEncoder._transform makes them, or None where
    scikit-learn refuses (an unknown value when handle_unknown is 'error', an infinity among numbers).

    Each column is looked up as _check_unknown and _encode look it up: text columns (objects)
    by hash and equality, None and NaN by kind (_text_lookup); number columns by a sorted
    search (_number_lookup).  An unknown value is coded 0 and masked, as _transform codes it;
    then the encoder's own _map_infrequent_categories groups infrequent categories (`ignore`:
    OrdinalEncoder's missing categories, which it leaves out).  `probes` {column: values} are
    its categories and, where it takes them, unknown values.
    """
    import numpy as np

    numbers = not _all_text(encoder, text)
    refuse_unknown = encoder.handle_unknown == "error"
    found = [(_number_lookup if numbers else _text_lookup)(values, refuse_unknown) for values in encoder.categories_]
    lookups = [function for function, _ in found]
    grouped = encoder._infrequent_enabled

    def codes(X):
        if numbers and np.isinf(X).any():
            return None
        X_int, X_mask = np.zeros(X.shape, dtype=int), np.ones(X.shape, dtype=bool)
        for i, function in enumerate(lookups):
            column = function(X[:, i])
            if column is None:
                return None
            X_int[:, i], X_mask[:, i] = column
        if refuse_unknown and not X_mask.all():
            return None
        if grouped:
            encoder._map_infrequent_categories(X_int, X_mask, ignore)
        return X_int, X_mask

    return codes, {i: probes for i, (_, probes) in enumerate(found)}


def _number_lookup(categories, refuse_unknown):
    """(lookup, probes) for a float64 column: searchsorted in the categories, NaN being the last one where it is one
    (an infinity, which the encoder's finiteness check refuses, never comes: _encoder_codes refuses it first)."""
    import numpy as np

    if categories.dtype != np.float64 or np.isnan(categories[:-1]).any() or np.isnan(categories).all():
        raise _NotNative("an encoder of number columns whose categories are not float64 numbers")
    known, nan_code = (categories[:-1], len(categories) - 1) if np.isnan(categories[-1]) else (categories, -1)

    last = len(known) - 1

    def lookup(x):
        index = np.searchsorted(known, x)
        np.minimum(index, last, out=index)
        valid = known[index] == x
        if nan_code >= 0:
            missing = np.isnan(x)
            index[missing], valid[missing] = nan_code, True
        index[~valid] = 0
        return index, valid

    near = np.concatenate([known, np.nextafter(known, -np.inf), np.nextafter(known, np.inf)])
    return lookup, (known if refuse_unknown else near)


def _text_lookup(categories, refuse_unknown):
    """(lookup, probes) for a column of objects: a dictionary of the categories (as _map_to_integer's), None and NaN
    found by kind (is_scalar_nan), as _check_unknown finds them; an unhashable cell goes to scikit-learn."""
    import numpy as np
    from sklearn.utils._missing import is_scalar_nan

    table, missing = {}, {}
    for code, value in enumerate(categories):
        if value is None or is_scalar_nan(value):
            missing["none" if value is None else "nan"] = code
        else:
            table[value] = code
    get = np.frompyfunc(table.get, 2, 1)

    def lookup(column):
        try:
            index = get(column, -1).astype(np.intp)
        except TypeError:
            return None
        valid = index >= 0
        for row in np.flatnonzero(~valid):          # a missing value, or an unknown one
            value = column[row]
            code = missing.get("none" if value is None else "nan" if is_scalar_nan(value) else "")
            if code is not None:
                index[row], valid[row] = code, True
        index[~valid] = 0
        return index, valid

    probes = list(table) + ([math.nan] if "nan" in missing else []) + ([] if refuse_unknown else ["\x00unknown", 1.5])
    return lookup, probes


def _one_hot_encoder(step, text):
    """OneHotEncoder.transform, step for step: codes, the dropped categories taken out, a 1 in each coded column."""
    import numpy as np

    if step.handle_unknown not in ("error", "ignore", "infrequent_if_exist", "warn"):
        raise _NotNative(f"a OneHotEncoder with handle_unknown={step.handle_unknown!r}")
    codes, probes = _encoder_codes(step, text, None)
    offsets, width, dtype = np.cumsum([0] + step._n_features_outs)[:-1], sum(step._n_features_outs), step.dtype
    drop = step._drop_idx_after_grouping       # None, or per column the code to drop (None: none; its width then)
    to_drop = None if drop is None else np.array(
        [len(values) if code is None else int(code) for code, values in zip(drop, step.categories_)])

    def one_hot(X):
        found = codes(X)
        if found is None:
            return None
        X_int, X_mask = found
        if to_drop is not None:
            keep = X_int != to_drop
            X_int[X_int > to_drop] -= 1
            X_mask &= keep
        out = np.zeros((len(X), width), dtype=dtype)
        rows, columns = np.nonzero(X_mask)
        out[rows, offsets[columns] + X_int[rows, columns]] = 1
        return out

    return _Step(one_hot, probes, bool(step.sparse_output), False)


def _ordinal_encoder(step, text):
    """OrdinalEncoder.transform: each value's code, encoded_missing_value for a missing category, unknown_value if
    asked."""
    codes, probes = _encoder_codes(step, text, step._missing_indices)
    missing, unknown = step._missing_indices, step.handle_unknown == "use_encoded_value"

    def ordinal(X):
        found = codes(X)
        if found is None:
            return None
        X_int, X_mask = found
        out = X_int.astype(step.dtype)
        for column, code in missing.items():
            out[X_int[:, column] == code, column] = step.encoded_missing_value
        if unknown:
            out[~X_mask] = step.unknown_value
        return out

    return _Step(ordinal, probes, False, False)


def _standard_scaler(step, text):
    """StandardScaler.transform on a float64 array: subtract mean_, divide by scale_ (on a copy)."""
    _numbers_only(step, text)
    if not step.copy:
        raise _NotNative("a StandardScaler with copy=False scales the caller's own rows")
    mean, scale = (step.mean_ if step.with_mean else None), (step.scale_ if step.with_std else None)

    def standard(X):
        X = X if mean is None else X - mean
        return X if scale is None else X / scale

    return _Step(standard, {}, False, False)


def _min_max_scaler(step, text):
    """MinMaxScaler.transform: times scale_, plus min_, clipped to feature_range when asked (on a copy)."""
    import numpy as np

    _numbers_only(step, text)
    if not step.copy:
        raise _NotNative("a MinMaxScaler with copy=False scales the caller's own rows")
    scale, low, (bottom, top), clip = step.scale_, step.min_, step.feature_range, step.clip

    def min_max(X):
        X = X * scale
        X += low
        return np.clip(X, np.float64(bottom), np.float64(top), out=X) if clip else X

    return _Step(min_max, {}, False, False)


def _simple_imputer(step, text):
    """SimpleImputer.transform of NaN: each missing value becomes its column's statistic.

    Numbers (mean, median, most frequent or a constant): where np.isnan.  Text (most frequent or
    a constant, fitted on objects): where the value is not itself, as _get_mask finds NaN among
    objects.  Only without an indicator, copying, and with every column's statistic present.
    """
    import numpy as np

    statistics, missing, strategies = step.statistics_, step.missing_values, ("most_frequent", "constant")
    if step.add_indicator or not step.copy or not (isinstance(missing, float) and np.isnan(missing)):
        raise _NotNative("only a SimpleImputer of NaN, copying, without indicator")
    if _all_text(step, text):
        if step.strategy not in strategies or step._fit_dtype.kind != "O" or (statistics != statistics).any():
            raise _NotNative("a SimpleImputer of text columns that is not fitted on objects, or misses a statistic")
        return _Step(lambda X: np.where(X != X, statistics, X), {}, False, True)
    if step.strategy not in ("mean", "median") + strategies or statistics.dtype != np.float64 or \
            not np.isfinite(statistics).all():
        raise _NotNative("a SimpleImputer of numbers with a statistic that is not a finite float64 number")
    return _Step(lambda X: np.where(np.isnan(X), statistics, X), {}, False, False)


def _compile_pipeline(pipeline, wanted, n_features, text, frame):
    """A Pipeline of known transforms ending in a known model: its steps, then the final predictor.

    The final estimator is compiled and proved alone first (on its own thresholds), then the
    whole pipeline is proved end to end against Pipeline's own methods on what the service
    hands scikit-learn (`frame`), on rows whose encoded columns hold the encoders' categories.
    Where scikit-learn hands the final step a sparse matrix, trees read a sparse row's values
    exactly as a dense row's, and linear models sum it as scipy does (_sparse_product).
    """
    *steps, (_, final) = pipeline.steps
    transforms = _transform_chain(pipeline, text, steps)
    if transforms.text:
        raise _NotNative("its steps hand text to its final step, which computes with numbers")
    family = _native_compilers().get(type(final))
    if family in (_tree_model, _gradient_boosting, _hist_gradient_boosting):
        transforms = transforms._replace(function=_tree_ready(transforms.function, transforms.sparse))
    try:       # proved alone on what it is given: a sparse matrix where scikit-learn stacks one
        inner, reasons = _compile(final, wanted, final.n_features_in_, _Given(sparse=transforms.sparse),
                                  _csr_rows if transforms.sparse else None)
        if not inner.methods:
            raise _NotNative(next(iter(reasons.values())))
    except _NotNative as error:
        raise _NotNative(f"its final step: {error}") from None
    return _proved(pipeline, dict(inner.methods), None, lambda allow_nan, allow_inf: NativePredictor(
        {}, n_features, allow_nan, allow_inf, steps=transforms.function, final=inner,
        categories=transforms.categories, text=text), transforms.categories, frame, text)


def _csr_rows(X):
    """Rows as the sparse matrix a ColumnTransformer stacks (zeros left out, columns in order)."""
    from scipy import sparse

    return sparse.csr_array(X)


# -- Proof at load -------------------------------------------------------------

def _probe_rows(n_features, splits, rng, categories, text):
    """Finite rows to prove on: random ones at many scales, and for trees every threshold and its neighbours.

    A threshold t is probed at t itself, at t in the dtype the model compares in (float32 for
    scikit-learn's trees, float64 for histogram boosting) and at the values of that dtype on
    either side of it, which is where a comparison could go either way.  Each row carries one
    probe per feature, so every probe appears in some row.  A column an encoder encodes is drawn
    from its `categories` probe values instead (random numbers would all be unknown categories).
    A model with `text` columns gets the rows as objects, as requests holding text send them,
    a quarter of the numbers whole (JSON integers).
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
    if text:
        whole = rows[::4].round().astype(np.int64).astype(object)
        rows = rows.astype(object)
        rows[::4] = whole
    for column, values in categories.items():
        values = np.asarray(values, dtype=rows.dtype)
        rows[:, column] = values[rng.integers(len(values), size=len(rows))]
    return rows


def _edge_rows(batch, rng, text):
    """Rows holding what scikit-learn may refuse: NaN, infinities, a float64 past float32's range (in a number
    column), a tenth of the values missing; and for a model with text columns, a row of numbers alone (text missing)."""
    import numpy as np

    numbers = [column for column in range(batch.shape[1]) if column not in text] or list(range(batch.shape[1]))
    edges = []
    for value in (np.nan, np.inf, -np.inf, 1e39):
        row = batch[:1].copy()
        row[0, rng.choice(numbers)] = value
        edges.append(row)
    holes = batch[:64].copy()
    holes[rng.random(holes.shape) < 0.2] = np.nan
    edges.append(holes)
    if text:
        row = batch[1:2].copy()
        row[0, sorted(text)] = np.nan
        edges.append(row.astype(np.float64))
    return edges


def _answer(function, X):
    """(True, outputs) or (False, the exception): scikit-learn's refusals are facts the proof compares."""
    try:
        return True, function(X)
    except Exception as error:  # its refusal of the probe, whatever the estimator raises
        return False, error


def _prove(reference, methods, make, batch, rng, text):
    """The NativePredictor of the methods that answer every probe exactly as scikit-learn does, and why others don't.

    `reference(method)` is scikit-learn's method as the service calls it.  First the input
    check: NaN, and infinities, are let through natively only if scikit-learn accepts them, and
    an edge row the check lets through must be one scikit-learn answers.  Then each method on
    the probe batch, on single rows of it, and on the edge rows the check lets through.
    `make(allow_nan, allow_inf)` builds the predictor that holds the proved methods.
    """
    first = reference(next(iter(methods)))
    edges = _edge_rows(batch, rng, text)    # NaN, then infinities: each allowed where scikit-learn takes it
    predictor = make(_answer(first, edges[0])[0], _answer(first, edges[1])[0] and _answer(first, edges[2])[0])
    probes = [batch] + [batch[i:i + 1] for i in rng.choice(len(batch), _SINGLE_PROBES)]
    for row in edges:
        if predictor.prepare(row) is not None:
            if not _answer(first, row)[0]:
                return predictor, dict.fromkeys(methods, "scikit-learn refuses an input the native check lets by")
            probes.append(row)
    refused = {}
    for method, function in methods.items():
        expected_of = reference(method)
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


def _compile(estimator, wanted, n_features, given=_Given(), frame=None):
    """(NativePredictor, {method: why not}) for the `wanted` methods of one estimator; _NotNative says why none.

    `given` is what the estimator is given (_Given), `frame` what the service hands scikit-learn
    for rows (None: the rows themselves).  Where the compiler returns the _Step by which the
    model transforms its rows first (histogram boosting's categories), it runs in the
    predictor's `prepare`.
    """
    import numpy as np
    from sklearn.pipeline import Pipeline

    shadowed = [m for m in wanted if m in vars(estimator)]
    if shadowed:
        raise _NotNative(f"{', '.join(shadowed)} replaced on the instance")
    if type(estimator) is Pipeline:
        return _compile_pipeline(estimator, wanted, n_features, given.text, frame)
    compiler = _native_compilers().get(type(estimator))
    if compiler is None:
        raise _NotNative(f"no native compiler for {type(estimator).__name__} (exact classes only)")
    compiled, splits, *own_step = compiler(estimator, given)
    float32 = splits is not None and splits[1] is np.float32
    compiled = {m: f for m, f in compiled.items() if m in wanted}
    if not own_step:
        return _proved(estimator, compiled, splits, lambda allow_nan, allow_inf: NativePredictor(
            {}, n_features, allow_nan, allow_inf, float32=float32), None, frame)
    step, takes_all = own_step[0], NativePredictor({}, n_features, True, True)
    return _proved(estimator, compiled, splits, lambda allow_nan, allow_inf: NativePredictor(
        {}, n_features, allow_nan, allow_inf, steps=step.function, final=takes_all, categories=step.categories,
        text=given.text), step.categories, frame, given.text)


def _proved(estimator, compiled, splits, make, categories=None, frame=None, text=frozenset()):
    """_prove on the probe rows of this estimator (the same at every load), against its methods called on what the
    service hands it (`frame`)."""
    import numpy as np

    if not compiled:
        raise _NotNative("no native version of its methods")
    rng = np.random.default_rng(NATIVE_PROBE_SEED)
    batch = _probe_rows(estimator.n_features_in_, splits, rng, categories or {}, text)
    frame = frame or (lambda X: X)

    def reference(method):
        function = getattr(estimator, method)
        return lambda X: function(frame(X))

    with np.errstate(all="ignore"):     # log(0) and the like warn alike on both sides: not a difference
        return _prove(reference, compiled, make, batch, rng, text)


def compile_native(estimator, model):
    """(NativePredictor or None, {method: (predictor, reason)}) for a freshly loaded model.

    None when no method is proved.  Every failure here, expected or not, only means that
    scikit-learn answers: loading never fails because of the native predictor.
    """
    try:
        predictor, reasons = _compile(estimator, model.methods, model.n_features, _Given(model.text_columns),
                                      model.sklearn_inputs)
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
    _write_file(_json_bytes(dump_json_model(estimator)), path)


def _json_bytes(text):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ArtifactError(f"cannot write the model as UTF-8 JSON: {error}") from None


def _write_file(data, path):
    """Write `data` to `path` as publishers should: a hidden temporary name in the same folder, then a rename."""
    import tempfile

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


def _check_composition(estimator, state, where, load):
    """A composition's entries have the shape its class unpacks them in (a name, then its part, and a
    ColumnTransformer's columns).  A pipeline's steps before its last, and the fitted transformers of a
    ColumnTransformer or FeatureUnion, must transform (or be passthrough, drop or None, which these classes skip): fit refuses any other, so a
    file that swaps one in (a classifier among the transformers) would fail every request at transform time."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    fields = {Pipeline: ("steps", 2), ColumnTransformer: ("transformers_", 3), FeatureUnion: ("transformer_list", 2)}
    field, size = fields.get(type(estimator), (None, 0))
    entries = state.get(field)
    if entries is None and field == "transformers_" and "_transformer_to_input_indices" in state:
        raise ArtifactError(f"{where}: a fitted ColumnTransformer without its transformers_")
    if entries is None:                 # not a composition, or an unfitted template (voting's estimators)
        return
    if not isinstance(entries, (list, tuple)) or not all(
            isinstance(entry, (tuple, list)) and len(entry) == size and isinstance(entry[0], str) for entry in entries):
        shape = "(name, estimator, columns)" if size == 3 else "(name, estimator)"
        raise ArtifactError(f"{where}.{field} must be a list of {shape} entries")
    for _, part, *_ in entries[:-1] if field == "steps" else entries:
        if not (part is None or isinstance(part, str) and part in ("passthrough", "drop") or
                callable(getattr(part, "transform", None))):
            raise ArtifactError(f"{where}: its {type(part).__name__} cannot transform, yet the "
                                f"{type(estimator).__name__} hands its output on")


_PART_CHECKS = (_check_widths, _check_categories, _check_tree_estimator, _check_members, _check_histogram_predictors,
                _check_kmeans, _check_svm, _check_vectorizer, _check_neighbors, _check_derived, _check_composition)


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
    return _export_checked(estimator, path, _json_bytes(text), load_json_model(text), "JSON", sample, rows)


def export_skops_model(estimator, path, sample=None, rows=20, trust=()):
    """Write `estimator` to `path` as a .skops file once its copy, loaded as the store loads .skops files (trusting
    what skops, --safe-pickle's allow-list and `trust` admit), gives identical outputs; as export_json_model."""
    try:
        import skops.io
    except ImportError:
        raise ArtifactError("the skops package is not installed: pip install '.[skops]' (the skops extra) to "
                            "write .skops files") from None
    data = skops.io.dumps(estimator)
    copy = _load_skops(data, LoadOptions(trust=tuple(trust)))
    return _export_checked(estimator, path, data, copy, "skops", sample, rows)


def _export_checked(estimator, path, data, copy, kind, sample, rows):
    """Write `data` (the serialised `estimator`, of which `copy` was loaded back) to `path` once every
    prediction method the check rows reach answers identically on the copy."""
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
            raise ArtifactError(f"the {kind} copy's {method} differs from the original's: not written")
        methods.append(method)
    if not methods:
        raise ArtifactError("no prediction method of the model accepts the check rows: "
                            "give a sample of real inputs (--check SAMPLE.json)")
    _write_file(data, path)
    return {"path": os.fspath(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "rows": count, "methods": methods}


# What `export` writes, by the destination's extension.
EXPORT_FORMATS = {".json": export_json_model, ".skops": export_skops_model}


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
        return model.sklearn_inputs(inputs), len(inputs)
    if model.n_features is None:
        raise ArtifactError("the model does not say how many features it takes (a text pipeline?): "
                            "give a sample of real inputs (--check SAMPLE.json)")
    return model.sklearn_inputs(np.random.default_rng(0).normal(size=(rows, model.n_features))), rows


def export_command(argv):
    """`model-service export SRC DST.json|DST.skops [--check SAMPLE.json]`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="model-service export",
        description="Write an artifact as a JSON model or a .skops file (both loaded without running code from "
                    "the file), after checking that the copy predicts exactly like the original.")
    parser.add_argument("source", metavar="SRC", help=f"artifact to convert ({', '.join(ARTIFACT_FORMATS)})")
    parser.add_argument("destination", metavar="DST.json|DST.skops",
                        help="JSON model or .skops file to write, by its extension (write-then-rename)")
    parser.add_argument("--check", metavar="SAMPLE.json",
                        help="inputs to compare on, as a predict request body (default: 20 made-up rows)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        sample = None
        if arguments.check:
            with open(arguments.check, "rb") as handle:
                sample = parse_json(handle.read(), max_depth=64, what=arguments.check)
        export = EXPORT_FORMATS.get(os.path.splitext(arguments.destination)[1])
        if export is None:
            raise ArtifactError(f"{arguments.destination}: write .json or .skops")
        estimator = _read_artifact(arguments.source)
        report = export(estimator, arguments.destination, sample)
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
# metadata, which loads it.  The table is read again after every prediction, and the prediction's
# rows are sent to the explain route: a model that can explain gets a bar chart (inline SVG, drawn
# through the DOM) of the first row's largest contributions to the output it scored highest; one that
# cannot, the 501's message in a line.  Everything it shows
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
 h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.4rem; }
 #auth { display: flex; align-items: baseline; gap: .5rem; margin-bottom: 1rem; } #auth label { display: inline; }
 #auth button, #auth input { margin-top: 0; } .choices { display: flex; flex-wrap: wrap; gap: 0 1.5rem; }
 table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd; }
 label { display: block; margin: .4rem 0 .1rem; font-weight: 600; }
 input, select, textarea { font: inherit; padding: .25rem; } textarea { width: 100%; min-height: 5rem; font-family: monospace; }
 #features { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); gap: .3rem 1rem; }
 #features input { display: block; width: 100%; box-sizing: border-box; font-weight: 400; }
 #features input::placeholder { font-style: italic; }
 pre, code { background: #f6f6f6; } pre { padding: .8rem; overflow: auto; } code { word-break: break-all; }
 .error { color: #b00020; } .muted { color: #777; } .invalid { outline: 2px solid #b00020; background: #fff0f0; }
 button { font: inherit; padding: .35rem 1rem; margin-top: .8rem; }
 #why { margin: 0; } #why figcaption { margin: .6rem 0 .3rem; } #chart text { font-size: 12px; fill: #333; }
 #chart .up { fill: #3a7d44; } #chart .down { fill: #b3412f; } #chart line { stroke: #999; }
</style>
</head>
<body>
<h1>model-service</h1>
<p class="muted">Models in this service, and a form to try them. <a href="/openapi.json">OpenAPI</a> · <a href="/models">/models</a></p>
<form id="auth">
 <label for="token">Token <span class="muted">(only if the service asks for one)</span></label>
 <input id="token" type="password" autocomplete="off"><button type="submit">Use token</button>
</form>
<table id="models"><thead><tr><th>model</th><th>latest</th><th>served versions</th><th>labels</th><th>states</th></tr></thead><tbody></tbody></table>
<p id="listing" class="muted"></p>
<h2>Try a model</h2>
<form id="try">
 <div class="choices">
  <div><label for="model">Model</label><select id="model" name="model"></select></div>
  <div><label for="version">Version</label><select id="version" name="version"></select></div>
  <div><label for="method">Method</label><select id="method" name="method"></select></div>
 </div>
 <p id="described" class="muted"></p>
 <div id="features"></div>
 <button id="send" type="submit">Predict</button>
 <label for="raw">Or rows as JSON (as in {"instances": ...}; used instead of the fields when given)</label>
 <textarea id="raw" name="raw"></textarea>
 <p class="muted">Example request: <code id="example"></code></p>
</form>
<h2>Result</h2>
<p id="status" class="muted">No request sent yet.</p>
<pre id="result"></pre>
<figure id="why" hidden><figcaption id="why-title"></figcaption>
 <svg id="chart" role="img" aria-labelledby="why-title" width="640" height="0"></svg>
</figure>
<p id="explained" class="muted"></p>
<script>
"use strict";
// Everything shown from the service (names, labels, features, messages) is untrusted: it goes through
// textContent and attribute values, never markup.  What a model takes comes from its status in GET /models.
const $ = (id) => document.getElementById(id);
const NUMBER = /^[-+]?([0-9]+[.]?[0-9]*|[.][0-9]+)(e[-+]?[0-9]+)?$/i;
const MAX_FIELDS = 64;      // a wider model takes its rows as JSON only
const TOP = 8;              // the contributions a chart shows: the largest
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
    const states = model.versions.map((v) => v.version + ": " + (v.state === "UNLOADED" ? "loads on first request" :
                                                                  v.state)).join(", ");
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

async function explain(rows) {    // the first row's top contributions, when the model can explain
  const url = predictURL().replace(/[/]predict$/, "/explain");
  let result;
  try {
    result = await request(url, JSON.stringify({instances: rows}));
  } catch (error) {
    return say($("explained"), "No explanation: " + error.message);
  }
  if (!result.ok) return say($("explained"), "No explanation: " + result.line);
  chart(result.answer.explanations);
}

function chart(explained) {      // horizontal bars from a zero line: what moved the output up, and down
  const totals = explained.expected_value.map((base, k) =>
    explained.contributions[0].reduce((sum, feature) => sum + feature[k], base));
  const output = totals.indexOf(Math.max(...totals));          // the predicted class, or the one output
  const bars = explained.contributions[0].map((feature, i) => [explained.feature_names[i], feature[output]])
    .sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, TOP);
  const largest = Math.max(...bars.map(([, value]) => Math.abs(value)), 1e-300);
  const middle = 380, half = 170, height = 22, svg = $("chart");
  svg.textContent = "";
  svg.setAttribute("height", bars.length * height + 6);
  const draw = (tag, attributes, text) => {
    const element = document.createElementNS(svg.namespaceURI, tag);      // the SVG namespace, named nowhere
    for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
    if (text !== undefined) element.textContent = text;
    return svg.appendChild(element);
  };
  bars.forEach(([name, value], i) => {
    const y = 3 + i * height, size = half * Math.abs(value) / largest;
    draw("rect", {x: value < 0 ? middle - size : middle, y, width: Math.max(size, 1), height: height - 6,
                  class: value < 0 ? "down" : "up"}).dataset.feature = name;
    draw("text", {x: middle - half - 8, y: y + 12, "text-anchor": "end"}, name);
    draw("text", {x: middle + half + 8, y: y + 12}, (value < 0 ? "" : "+") + value.toPrecision(3));
  });
  draw("line", {x1: middle, x2: middle, y1: 0, y2: bars.length * height + 6});
  $("why-title").textContent = "Why: the largest contributions to " + explained.output_names[output] + " (" +
    explained.method + "), from " + explained.expected_value[output].toPrecision(4) + " on average to " +
    totals[output].toPrecision(4) + " for the first row";
  $("why").hidden = false;
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
  input.type = "text"; input.inputMode = "decimal"; input.autocomplete = "off"; input.placeholder = "number";
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
  $("why").hidden = true; say($("explained"), "");
  let body, rows;
  try {
    rows = instances();
    body = JSON.stringify({instances: rows, method: $("method").value || "predict"});
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
  if (result.ok && shown && shown.n_features_in_) await explain(rows);
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
# Explanations ################################################################
###############################################################################
# Per prediction, per model output: one contribution per input feature and an expected (base)
# value that add up to the output, in the layout of shap's Explanation.values / base_values.
# Exact, and needing no background data:
#   trees, forests, extra trees   path-dependent TreeSHAP of predict_proba (classifiers) or predict,
#   gradient boosting, histogram  the same of the raw margin (decision_function) or predict, computed from
#     boosting                    the fitted trees' own node weights exactly as shap.TreeExplainer does
#   linear models                 coef · (x - reference) per feature, of decision_function or predict
#   pipelines in front of them    scikit-learn's own transform first; each transformed column's share
#                                 goes to the input feature it came from (a one-hot block sums to its feature)
# Anything else is a 501 naming the family.  The entry point is `explain_model`; an Explainer is
# built once per loaded model, proved on probe rows (its expected value and contributions must add
# up to the estimator's own answer), and each request's rows are checked the same way.
#
# TreeSHAP without a per-node Python loop.  For one leaf l, the path-dependent value of a set S of
# features is v_l * prod_f (o_f if f in S else z_f) over the features f split on along l's path,
# where o_f says whether the row satisfies every split on f there and z_f is the product of those
# splits' cover fractions (w_child / w_parent).  Shapley weights are Beta integrals, so feature f
# gets v_l * integral_0^1 r_f(t) P_l(t) dt, with M_f(t) = z_f + t (o_f - z_f), P_l = prod_f M_f and
# r_f = (o_f - z_f) / M_f: a polynomial of degree below the depth, which Gauss-Legendre quadrature
# on ceil(depth / 2) nodes integrates exactly.  Both factors live on the tree's edges: P_l is the
# product over the path of M_e / M_prev(e) (prev(e): the edge above e splitting on the same feature,
# so a repeated feature telescopes to its merged o and z), taken top-down one depth at a time; and
# the sum of v_l P_l over the leaves below an edge, bottom-up.  Each edge e then adds, at every node
# t_q, w_q (r_e - r_prev(e)) times that sum to its feature.  A row costs a few numpy passes over
# (quadrature nodes x edges x outputs) for all trees at once; per model, each edge's merged interval
# (lo, hi] on its feature, where NaN goes, and the factors of its three cases (row satisfies the
# merged split; fails it here first; failed it above) are computed once.

EXPLAIN_TABLE_CELLS = 1 << 23    # numbers a model's TreeSHAP tables may hold (64 MiB): a bigger ensemble is a 501
EXPLAIN_CHUNK_CELLS = 1 << 17    # numbers one pass over a chunk of rows may hold (1 MiB: fresh pages cost more)
EXPLAIN_TOLERANCE = 1e-9         # how closely expected value + contributions must equal the model's output
_EXPLAIN_PROBES = 8              # random rows an Explainer is proved on when it is built (and again with NaN)
_EXPLAIN_PROBE_SEED = 25         # the same probes at every build

#: one fitted tree as TreeSHAP reads it; `value` holds each node's outputs, already scaled
_Tree = collections.namedtuple("_Tree", "left right feature threshold missing_left weight value")


class _NotExplained(Exception):
    """Why a model's predictions cannot be explained exactly (the 501's reason)."""


def _tree_layout(trees):
    """The trees' nodes in one numbering: (columns by name, roots), each tree's nodes after the last's."""
    import numpy as np

    parts, offset = [], 0
    for tree in trees:
        count = len(tree.left)
        internal = tree.left >= 0
        inner = np.flatnonzero(internal)
        parent, is_left = np.full(count, -1), np.zeros(count, dtype=bool)
        parent[tree.left[inner]], parent[tree.right[inner]], is_left[tree.left[inner]] = inner, inner, True
        depth, frontier, level = np.zeros(count, dtype=np.intp), np.zeros(1, dtype=np.intp), 0
        while len(frontier):
            depth[frontier] = level
            frontier = frontier[internal[frontier]]
            frontier, level = np.concatenate([tree.left[frontier], tree.right[frontier]]), level + 1
        shift = lambda index: np.where(index >= 0, index + offset, -1)
        parts.append({"parent": shift(parent), "left": shift(np.where(internal, tree.left, -1)),
                      "right": shift(np.where(internal, tree.right, -1)), "is_left": is_left, "depth": depth,
                      "internal": internal, "feature": tree.feature, "threshold": tree.threshold,
                      "missing_left": tree.missing_left, "weight": tree.weight, "value": tree.value,
                      "root": np.array([offset])})
        offset += count
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _edge_conditions(nodes):
    """Per node, of the edge from its parent: the feature split on, and that feature's merged split along
    the path down to it: the interval (lo, hi] a row's value must lie in, whether NaN follows it, the
    product z of its cover fractions, and prev, the nearest edge above on the same feature (-1: none)."""
    import numpy as np

    parent, depth = nodes["parent"], nodes["depth"]
    edge = parent >= 0
    above = np.where(edge, parent, 0)
    feature = np.where(edge, nodes["feature"][above], 0)
    threshold = nodes["threshold"][above]
    lo = np.where(edge & ~nodes["is_left"], threshold, -np.inf)
    hi = np.where(edge & nodes["is_left"], threshold, np.inf)
    nan_follows = np.where(edge, nodes["missing_left"][above] == nodes["is_left"], True)
    weight = nodes["weight"]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.nan_to_num(np.where(edge, weight / weight[above], 1.0), nan=0.0)
    prev, ancestor = np.full(len(parent), -1), parent.copy()
    for _ in range(int(depth.max())):                # walk up, one level for every node at once
        found = (ancestor >= 0) & (prev < 0) & edge
        found &= (parent[np.maximum(ancestor, 0)] >= 0) & (feature[np.maximum(ancestor, 0)] == feature)
        prev[found] = ancestor[found]
        ancestor = np.where(ancestor >= 0, parent[np.maximum(ancestor, 0)], -1)
    for level in range(2, int(depth.max()) + 1):     # merge top-down: prev is always shallower
        at = np.flatnonzero((depth == level) & (prev >= 0))
        above = prev[at]
        lo[at], hi[at] = np.maximum(lo[at], lo[above]), np.minimum(hi[at], hi[above])
        nan_follows[at] &= nan_follows[above]
        z[at] *= z[above]
    return feature, lo, hi, nan_follows, z, prev


def _expected_value(nodes):
    """Each tree's root value as the weighted mean of its leaves (shap's compute_expectations), summed."""
    import numpy as np

    value, weight, depth = nodes["value"].astype(np.float64), nodes["weight"], nodes["depth"]
    left, right = nodes["left"], nodes["right"]
    for level in range(int(depth.max()) - 1, -1, -1):
        at = np.flatnonzero((depth == level) & nodes["internal"])
        left_weight, right_weight = weight[left[at]][:, None], weight[right[at]][:, None]
        total = left_weight + right_weight
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (left_weight * value[left[at]] + right_weight * value[right[at]]) / total
        value[at] = np.where(total == 0, 0.0, mean)
    return value[nodes["root"]].sum(axis=0)


class _TreeShap:
    """Path-dependent TreeSHAP of a group of trees whose leaf values add up to the outputs (see above).

    The nodes are laid out internal ones first, by depth (roots first), then the leaves, so each
    depth is one slice; an edge is a node other than a root, numbered by its position minus the
    number of roots.  `float32`: the model compares its inputs as float32 (scikit-learn's trees).
    """

    def __init__(self, trees, n_features, float32=False, base=0.0):
        import numpy as np
        import scipy.sparse

        nodes = _tree_layout(trees)
        feature, lo, hi, nan_follows, z, prev = _edge_conditions(nodes)
        depth, internal = nodes["depth"], nodes["internal"]
        order = np.argsort(np.where(internal, depth, depth.max() + 1), kind="stable")
        where = np.empty(len(order), dtype=np.intp)
        where[order] = np.arange(len(order))
        self.roots, self.internal, self.nodes = len(nodes["root"]), int(internal.sum()), len(order)
        self.edges = self.nodes - self.roots
        self.quadrature = max(1, (int(depth.max()) + 1) // 2)
        if 6 * self.quadrature * self.edges > EXPLAIN_TABLE_CELLS:
            raise _NotExplained(f"its {len(trees)} trees of {self.nodes} nodes, depth {int(depth.max())}, "
                                f"are too large to explain within {EXPLAIN_TABLE_CELLS * 8 >> 20} MiB")
        self.n_features, self.float32 = n_features, float32
        self.expected = _expected_value(nodes) + base
        self.width = self.expected.shape[0]
        edge_nodes = order[self.roots:]
        self.feature, self.lo, self.hi, self.nan_follows = (feature[edge_nodes], lo[edge_nodes], hi[edge_nodes],
                                                            nan_follows[edge_nodes])
        has_prev = prev[edge_nodes] >= 0
        self.prev = np.where(has_prev, where[np.maximum(prev[edge_nodes], 0)] - self.roots, 0)
        self.no_prev, self.edge_index = ~has_prev, np.arange(self.edges)
        self.ratio, self.step = self._tables(z[edge_nodes], np.where(has_prev, z[np.maximum(prev[edge_nodes], 0)],
                                                                     1.0), has_prev)
        self.parent = where[np.maximum(nodes["parent"][order], 0)]
        self.left = where[np.maximum(nodes["left"][order[:self.internal]], 0)]
        self.right = where[np.maximum(nodes["right"][order[:self.internal]], 0)]
        starts = list(np.searchsorted(depth[order[:self.internal]], np.arange(int(depth.max()) + 1)))
        self.levels = [(int(s), int(e)) for s, e in zip(starts, starts[1:] + [self.internal]) if e > s]
        self.leaf_values = np.ascontiguousarray(nodes["value"][order[self.internal:]].T, dtype=np.float64)
        self.incidence = scipy.sparse.csr_matrix((np.ones(self.edges), (self.feature, self.edge_index)),
                                                 shape=(n_features, self.edges))

    def _tables(self, z, z_prev, has_prev):
        """(ratio, step): per quadrature node, for each edge's three cases (0: the row satisfies its merged
        split; 1: fails it at this edge; 2: failed it above), M_e / M_prev and w_q (r_e - r_prev)."""
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(self.quadrature)
        t, w = (x[:, None] + 1) / 2, w[:, None] / 2
        hot, cold = lambda zz: t + (1 - t) * zz, lambda zz: (1 - t) * zz
        with np.errstate(divide="ignore", invalid="ignore"):
            hot_prev = np.where(has_prev, hot(z_prev), 1.0)
            ratio = np.stack([hot(z) / hot_prev, cold(z) / hot_prev, cold(z) / cold(z_prev)], axis=1)
            r_hot, r_cold = lambda zz: (1 - zz) / hot(zz), -1 / (1 - t)
            r_prev = np.where(has_prev, r_hot(z_prev), 0.0)
            step = np.stack([r_hot(z) - r_prev, r_cold - r_prev, np.zeros_like(ratio[:, 0])], axis=1) * w[:, None]
        # 0/0 only below a zero-weight edge the row fails, where the product is already 0
        ratio = np.nan_to_num(ratio, nan=0.0, posinf=0.0)
        return ratio.reshape(self.quadrature, -1), step.reshape(self.quadrature, -1)

    def contributions(self, X):
        """(rows, n_features, outputs) for the float64 rows X, in chunks that bound the temporaries."""
        import numpy as np

        chunk = max(1, EXPLAIN_CHUNK_CELLS // (self.quadrature * self.nodes * (self.width + 2)))
        parts = [self._chunk(X[start:start + chunk]) for start in range(0, len(X), chunk)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _chunk(self, X):
        import numpy as np

        n, roots, internal, edges = len(X), self.roots, self.internal, self.edges
        if self.float32:       # compared as scikit-learn compares: float32 (1e300 is infinite there) against float64
            with np.errstate(over="ignore"):
                X = X.astype(np.float32).astype(np.float64)
        values = X[:, self.feature]
        satisfied = (values > self.lo) & (values <= self.hi)
        missing = np.isnan(values)
        if missing.any():
            satisfied |= missing & self.nan_follows
        satisfied_above = satisfied[:, self.prev] | self.no_prev
        case = (2 - satisfied - satisfied_above) * edges + self.edge_index          # (rows, edges)
        ratio = np.take(self.ratio, case, axis=1)                                     # (q, rows, edges)
        above = np.empty((self.quadrature, n, internal))                # product of the ratios down to each node
        above[:, :, :roots] = 1.0
        for start, end in self.levels[1:]:
            np.multiply(np.take(above, self.parent[start:end], axis=2), ratio[:, :, start - roots:end - roots],
                        out=above[:, :, start:end])
        below = np.empty((self.quadrature, self.width, n, self.nodes))   # sum of v_l P_l over the leaves below
        leaf_products = np.take(above, self.parent[internal:], axis=2) * ratio[:, :, internal - roots:]
        np.multiply(leaf_products[:, None], self.leaf_values[None, :, None, :], out=below[..., internal:])
        for start, end in self.levels[::-1]:
            np.add(np.take(below, self.left[start:end], axis=3), np.take(below, self.right[start:end], axis=3),
                   out=below[..., start:end])
        step = np.take(self.step, case, axis=1)
        per_edge = (step[:, None] * below[..., roots:]).sum(axis=0)                  # (outputs, rows, edges)
        summed = self.incidence @ per_edge.reshape(self.width * n, edges).T           # (features, outputs * rows)
        return np.asarray(summed).reshape(self.n_features, self.width, n).transpose(2, 0, 1)


def _sklearn_tree(tree, scale, normalize=False):
    """A scikit-learn Tree as TreeSHAP reads it: values (per class as fractions when `normalize`) times `scale`."""
    import numpy as np

    value = tree.value.reshape(tree.node_count, -1).astype(np.float64)
    if normalize:
        total = value.sum(axis=1, keepdims=True)
        value = value / np.where(total == 0, 1.0, total)
    missing_left = getattr(tree, "missing_go_to_left", None)
    return _Tree(tree.children_left.astype(np.intp), tree.children_right.astype(np.intp),
                 tree.feature.astype(np.intp), tree.threshold.astype(np.float64),
                 np.zeros(tree.node_count, dtype=bool) if missing_left is None else missing_left.astype(bool),
                 tree.weighted_n_node_samples.astype(np.float64), value * scale)


def _histogram_tree(predictor):
    """A histogram boosting predictor's nodes as TreeSHAP reads them: their `count` is the cover (as in shap)."""
    import numpy as np

    nodes = predictor.nodes
    if nodes["is_categorical"].any():
        raise _NotExplained("its categorical features split on sets of categories, which are not explained here")
    leaf = nodes["is_leaf"].astype(bool)
    return _Tree(np.where(leaf, -1, nodes["left"].astype(np.intp)), np.where(leaf, -1, nodes["right"].astype(np.intp)),
                 nodes["feature_idx"].astype(np.intp), nodes["num_threshold"].astype(np.float64),
                 nodes["missing_go_to_left"].astype(bool), nodes["count"].astype(np.float64),
                 nodes["value"].astype(np.float64)[:, None])


#: what an Explainer explains: the estimator's method, in words, and the names of its outputs
_Explained = collections.namedtuple("_Explained", "method output output_names")


def _class_outputs(estimator, method):
    """_Explained for a classifier's method: one output per class, or the positive class's margin alone."""
    classes = [str(label) for label in to_jsonable(estimator.classes_)]
    if method == "predict_proba":
        return _Explained(method, "probability", classes)
    return _Explained(method, "raw margin", classes[1:] if len(classes) == 2 else classes)


def _regression_outputs(width):
    return _Explained("predict", "prediction", ["predict"] if width == 1 else [f"predict[{i}]" for i in
                                                                                  range(width)])


def _forest_shap(estimator, n_features, reference=None):
    """Trees and forests: ([_TreeShap], _Explained); classifiers' trees give class fractions, averaged."""
    members = getattr(estimator, "estimators_", None) or [estimator]
    if getattr(estimator, "n_outputs_", 1) != 1 and hasattr(estimator, "classes_"):
        raise _NotExplained("it is a multi-output classifier")
    classifier = hasattr(estimator, "classes_")
    trees = [_sklearn_tree(member.tree_, 1.0 / len(members), normalize=classifier) for member in members]
    explained = _class_outputs(estimator, "predict_proba") if classifier else \
        _regression_outputs(trees[0].value.shape[1])
    return [_TreeShap(trees, n_features, float32=True)], explained


def _boosting_shap(estimator, n_features, reference=None):
    """GradientBoosting*: one TreeSHAP per output (the column of estimators_), its init's raw value as base."""
    import numpy as np
    from sklearn.dummy import DummyClassifier, DummyRegressor

    init = estimator.init_
    if not (isinstance(init, str) and init == "zero") and type(init) not in (DummyClassifier, DummyRegressor):
        raise _NotExplained(f"its init estimator {type(init).__name__} makes the base value depend on the row")
    base = np.asarray(estimator._raw_predict_init(np.zeros((1, n_features), dtype=np.float32)))[0]
    groups = [_TreeShap([_sklearn_tree(tree.tree_, estimator.learning_rate) for tree in column], n_features,
                        float32=True, base=base[k]) for k, column in enumerate(estimator.estimators_.T)]
    classifier = hasattr(estimator, "classes_")
    return groups, _class_outputs(estimator, "decision_function") if classifier else _regression_outputs(1)


def _histogram_boosting_shap(estimator, n_features, reference=None):
    """HistGradientBoosting*: one TreeSHAP per output, the baseline prediction as base."""
    import numpy as np

    if getattr(estimator, "_preprocessor", None) is not None:
        raise _NotExplained("its categorical features split on sets of categories, which are not explained here")
    base = np.asarray(estimator._baseline_prediction, dtype=np.float64).reshape(-1)
    groups = [_TreeShap([_histogram_tree(iteration[k]) for iteration in estimator._predictors], n_features,
                        base=base[k]) for k in range(estimator.n_trees_per_iteration_)]
    classifier = hasattr(estimator, "classes_")
    return groups, _class_outputs(estimator, "decision_function") if classifier else _regression_outputs(1)


@functools.cache
def _explained_families():
    """{estimator class: builder(estimator, width, reference) -> ([parts], _Explained)}: exact classes only, so a
    subclass's own predictions are never explained as its parent's.  A part (a _TreeShap or a _Linear) has
    `expected`, `width` and `contributions(Z)`; the parts' outputs are side by side."""
    from sklearn import ensemble, linear_model, svm, tree

    families = {
        _forest_shap: (tree.DecisionTreeClassifier, tree.DecisionTreeRegressor, tree.ExtraTreeClassifier,
                  tree.ExtraTreeRegressor, ensemble.RandomForestClassifier, ensemble.RandomForestRegressor,
                  ensemble.ExtraTreesClassifier, ensemble.ExtraTreesRegressor),
        _boosting_shap: (ensemble.GradientBoostingClassifier, ensemble.GradientBoostingRegressor),
        _histogram_boosting_shap: (ensemble.HistGradientBoostingClassifier, ensemble.HistGradientBoostingRegressor),
        _linear_shap: (linear_model.LinearRegression, linear_model.Ridge, linear_model.RidgeCV, linear_model.Lasso,
                  linear_model.LassoCV, linear_model.ElasticNet, linear_model.ElasticNetCV, linear_model.Lars,
                  linear_model.LassoLars, linear_model.BayesianRidge, linear_model.ARDRegression,
                  linear_model.HuberRegressor, linear_model.QuantileRegressor, linear_model.SGDRegressor,
                  svm.LinearSVR, linear_model.LogisticRegression, linear_model.LogisticRegressionCV,
                  linear_model.RidgeClassifier, linear_model.RidgeClassifierCV, linear_model.SGDClassifier,
                  linear_model.Perceptron, svm.LinearSVC),
    }
    return {cls: builder for builder, classes in families.items() for cls in classes}


class _Linear:
    """coef · (z - reference) for the rows z a linear model takes; the expected value is its output at the
    reference.  Proved: the model's own method must answer z @ coef.T + intercept."""

    def __init__(self, estimator, reference):
        import numpy as np

        coef = np.asarray(estimator.coef_, dtype=np.float64)
        self.coef = coef.reshape(-1, coef.shape[-1])                            # (outputs, features)
        intercept = np.asarray(estimator.intercept_, dtype=np.float64).reshape(-1)
        self.reference = np.zeros(self.coef.shape[1]) if reference is None else reference
        self.expected = self.coef @ self.reference + np.broadcast_to(intercept, self.coef.shape[:1])
        self.width = len(self.expected)

    def contributions(self, Z):
        return (Z - self.reference)[:, :, None] * self.coef.T[None]


def _linear_shap(estimator, n_features, reference=None):
    explained = _class_outputs(estimator, "decision_function") if hasattr(estimator, "classes_") else \
        _regression_outputs(1 if getattr(estimator, "coef_").ndim == 1 else estimator.coef_.shape[0])
    return [_Linear(estimator, reference)], explained


def _split_pipeline(estimator, n_features):
    """(final estimator, the transform of the steps before it or None, owners or None): owners[j] is the input
    column that column j of the transformed rows comes from."""
    import numpy as np
    from sklearn.pipeline import Pipeline

    if type(estimator) is not Pipeline:
        return estimator, None, None
    owners = np.arange(n_features)
    for _, step in estimator.steps[:-1]:
        owners = owners[_column_owners(step, len(owners))]
    return estimator.steps[-1][1], estimator[:-1].transform, owners


def _column_owners(step, width):
    """For each column a fitted transformer answers, the index of the input column (of `width`) it comes from."""
    import numpy as np
    from sklearn import compose, impute, pipeline, preprocessing

    same, kind = np.arange(width), type(step)
    if step is None or (isinstance(step, str) and step == "passthrough") or kind in (
            preprocessing.StandardScaler, preprocessing.MinMaxScaler, preprocessing.MaxAbsScaler,
            preprocessing.RobustScaler, preprocessing.OrdinalEncoder) or (
            kind is preprocessing.FunctionTransformer and step.func is None):
        return same
    if kind is preprocessing.OneHotEncoder:
        return np.repeat(same, step._n_features_outs)
    if kind is preprocessing.KBinsDiscretizer:
        return same if step.encode == "ordinal" else np.repeat(same, step.n_bins_)
    if kind is impute.SimpleImputer:
        dropped = np.array([value != value for value in step.statistics_], dtype=bool)   # NaN: an empty column
        kept = same if step.keep_empty_features or step.strategy == "constant" else same[~dropped]
        return np.concatenate([kept, step.indicator_.features_]) if step.add_indicator else kept
    if kind is pipeline.Pipeline:
        for _, inner in step.steps:
            same = same[_column_owners(inner, len(same))]
        return same
    if kind is compose.ColumnTransformer:
        blocks = []
        for name, transformer, _ in step.transformers_:
            columns = step.output_indices_[name]
            if columns.stop > columns.start:
                inputs = np.asarray(step._transformer_to_input_indices[name], dtype=np.intp)
                blocks.append((columns.start, inputs[_column_owners(transformer, len(inputs))]))
        return np.concatenate([owners for _, owners in sorted(blocks, key=lambda block: block[0])] or
                              [np.zeros(0, dtype=np.intp)])
    raise _NotExplained(f"its step {kind.__name__} mixes its input columns (each column must come from one)")


def _outputs_matrix(outputs):
    """A method's answer as (rows, outputs) float64: a 1-D answer is one output."""
    import numpy as np

    outputs = np.asarray(outputs, dtype=np.float64)
    return outputs[:, None] if outputs.ndim == 1 else outputs


def _adds_up(expected, contributions, outputs):
    """Whether expected value + contributions equal the outputs in every row, to EXPLAIN_TOLERANCE (relative
    beyond 1)."""
    import numpy as np

    total = expected + contributions.sum(axis=1)
    return total.shape == outputs.shape and bool(
        (np.abs(total - outputs) <= EXPLAIN_TOLERANCE * np.maximum(1.0, np.abs(outputs))).all())


class Explainer:
    """How one fitted estimator's predictions are explained (see "Explanations"); built once per model.

    `n_features`: the width of the rows it takes, named `feature_names` (default x0, x1, ...).
    `reference`: one row as the model takes it, from which a linear model's contributions are
    measured; without one, from the zero of its final estimator's inputs, which is the training
    mean of the features a StandardScaler standardizes.  Trees need none: path-dependent TreeSHAP
    weighs each split by the training rows that reached it.  Raises _NotExplained, saying why.
    """

    def __init__(self, estimator, n_features, feature_names=None, reference=None):
        self.n_features = n_features
        self.feature_names = [str(name) for name in feature_names] if feature_names is not None else \
            [f"x{i}" for i in range(n_features)]
        steps = getattr(estimator, "steps", None)
        self.family = type(estimator).__name__ if not steps else f"a Pipeline ending in {type(steps[-1][1]).__name__}"
        try:
            self._build(estimator, reference)
        except _NotExplained as why:
            raise _NotExplained(f"{self.family}: {why}") from None

    def _build(self, estimator, reference):
        import numpy as np

        final, self._transform, self._owners = _split_pipeline(estimator, self.n_features)
        builder = _explained_families().get(type(final))
        if builder is None:
            raise _NotExplained("not a family explained exactly here (trees, forests, gradient and histogram "
                                "boosting, linear models, and pipelines of scalers, imputers and encoders in "
                                "front of them)")
        width = self.n_features if self._owners is None else len(self._owners)
        self._parts, self.explained = builder(final, width, None if reference is None else self._rows(reference)[0])
        self.expected = np.concatenate([part.expected for part in self._parts])
        self._prove(final, width)

    def explain(self, X):
        """(expected value per output, contributions (rows, features, outputs)) for the rows X the model takes."""
        import numpy as np

        contributions = self._contributions(self._rows(X))
        if self._owners is None:
            return self.expected, contributions
        summed = np.zeros((len(contributions), self.n_features, contributions.shape[2]))
        np.add.at(summed, (slice(None), self._owners), contributions)       # a one-hot block sums to its feature
        return self.expected, summed

    def _contributions(self, Z):
        import numpy as np

        return np.concatenate([part.contributions(Z) for part in self._parts], axis=2)

    def _rows(self, X):
        """The rows the final estimator takes (transformed by the steps before it), as dense float64."""
        import numpy as np

        Z = X if self._transform is None else self._transform(X)
        Z = np.asarray(Z.toarray() if hasattr(Z, "toarray") else Z, dtype=np.float64)
        if self._owners is not None and Z.shape[1] != len(self._owners):
            raise _NotExplained(f"its steps answer {Z.shape[1]} columns where {len(self._owners)} were traced")
        return Z

    def _prove(self, final, width):
        """Refuse unless, on probe rows, expected value + contributions equal the final estimator's own answers."""
        import numpy as np

        rng = np.random.default_rng(_EXPLAIN_PROBE_SEED)
        rows = rng.normal(size=(_EXPLAIN_PROBES, width)) * 3
        trees = [part for part in self._parts if isinstance(part, _TreeShap)]
        if trees:                             # values at the trees' thresholds, where a path could go either way
            features = np.concatenate([part.feature for part in trees])
            splits = np.concatenate([np.where(np.isfinite(part.hi), part.hi, part.lo) for part in trees])
            for feature in np.unique(features):
                finite = splits[(features == feature) & np.isfinite(splits)]      # a split on NaN alone is at inf
                if len(finite):
                    rows[:, feature] = rng.choice(finite, size=len(rows))
            rows *= 1 + rng.choice([-1e-7, 0.0, 1e-7], size=rows.shape)
        missing = np.where(rng.random(rows.shape) < 0.2, np.nan, rows)
        for probe in (rows, missing):
            try:
                outputs = _outputs_matrix(getattr(final, self.explained.method)(probe))
            except ValueError:                # NaN, which the model refuses: nothing to prove there
                continue
            if not _adds_up(self.expected, self._contributions(probe), outputs):
                raise _NotExplained(f"its explanation does not add up to its own {self.explained.method} on "
                                    "probe rows")


_explainers = weakref.WeakKeyDictionary()     # LoadedModel -> (its reference as JSON, Explainer or _NotExplained)
_explainers_lock = threading.Lock()


def explain_model(model, inputs, reference=None):
    """The "explanations" of a LoadedModel's answer for `inputs` (rows as model_inputs makes them).

    The rows are answered by the model's own method first, so they are refused exactly as a
    prediction would be, and the explanation must add up to that answer in every row (else a
    500: our fault).  `reference`: model-settings.json's "explain" reference row, as a request
    would send it.  A model that cannot be explained exactly is a 501 naming its family and why.
    """
    explainer = _explainer(model, reference)
    outputs = _outputs_matrix(model.call(explainer.explained.method, inputs))
    expected, contributions = explainer.explain(inputs)
    if not _adds_up(expected, contributions, outputs):
        raise ServiceError("the explanation does not add up to the model's answer", model=model.name)
    method, output, output_names = explainer.explained
    return {"method": method, "output": output, "expected_value": to_jsonable(expected),
            "contributions": to_jsonable(contributions), "feature_names": explainer.feature_names,
            "output_names": output_names}


def _explainer(model, reference):
    """The model's Explainer, built at its first explanation (and again when its reference changes)."""
    key = json.dumps(reference, sort_keys=True)
    with _explainers_lock:
        cached = _explainers.get(model)
        if cached is None or cached[0] != key:
            cached = _explainers[model] = (key, _build_explainer(model, reference))
    if isinstance(cached[1], _NotExplained):
        raise NotImplementedHere(f"model {model.name!r} cannot be explained exactly: {cached[1]}", model=model.name)
    return cached[1]


def _build_explainer(model, reference):
    if model.n_features is None:
        return _NotExplained(f"{type(model.estimator).__name__} does not take tabular rows")
    try:
        rows = None if reference is None else model_inputs(model, [reference], 1)
    except BadRequest as error:           # the settings file's fault, not the caller's
        raise ServiceError(f'model-settings.json "explain" reference: {error.message}', model=model.name) from None
    try:
        return Explainer(model.estimator, model.n_features, model.feature_names, rows)
    except _NotExplained as error:
        return error


###############################################################################
# WSGI entry points ###########################################################
###############################################################################
# `waitress-serve service:app`, `gunicorn service:app`, mod_wsgi's
# `application`: the same object, configured from the environment.

app = application = create_app()

if __name__ == "__main__":
    sys.exit(main())
