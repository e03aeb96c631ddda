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
artifacts you trust in the store.

Sections, in the order data flows (``grep -n '^# .*####' service.py``):

    Imports and logging, Configuration, Errors, JSON model format, Artifact loaders,
    Model store, Model registry, Codecs, HTTP application, Serving, Command line,
    WSGI entry points
"""

__version__ = "0.1.0"

__all__ = [
    "Config", "ServiceError", "ArtifactRef", "ModelStore", "LoadedModel",
    "ModelRegistry", "create_app", "serve", "main", "app", "application",
    "dump_json_model", "save_json_model", "load_json_model", "to_jsonable",
]

###############################################################################
# Imports and logging #########################################################
###############################################################################
# Only the standard library and bottle here: numpy, scikit-learn, joblib and
# pandas are imported when the first model is loaded, so `import service` stays
# fast and a bad store can never break it.

import argparse
import ast
import base64
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import pickle
import re
import sys
import threading
import time
import uuid
import warnings

import bottle

logger = logging.getLogger("service")

SERVICE_NAME = "model-service"

###############################################################################
# Configuration ###############################################################
###############################################################################
# One table drives the flags, the environment variables and the defaults, so a
# setting has exactly one source of truth: flag, then environment, then default.

ENV_PREFIX = "MODEL_SERVICE_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, not {text!r}")
    return value


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port number 0-65535, not {text!r}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"must be a finite number >= 0, not {text!r}")
    return value


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


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the service can be told; built by `Config.load` or `create_app`."""

    #: folder holding the models (flat files and/or <name>/<version>/ folders)
    store: str = "model_store"
    #: address to bind; 127.0.0.1 keeps the service private to this machine
    host: str = "127.0.0.1"
    #: TCP port to listen on (0 picks a free one)
    port: int = 8080
    #: WSGI server adapter; waitress unless told otherwise
    server: str = "waitress"
    #: worker threads of the server (waitress)
    threads: int = 4
    #: model behind GET /predict/<sen> and POST /predict; default: the only model in the store
    default_model: str = None
    #: largest request body accepted, in bytes (413 above it)
    max_body_bytes: int = 10 * 1024 * 1024
    #: most rows (instances) accepted in one request (400 above it)
    max_rows: int = 100_000
    #: deepest JSON nesting accepted in a request (400 above it)
    max_depth: int = 64
    #: seconds before a failed model load is tried again
    load_retry_seconds: float = 10.0
    #: seconds between looks at the store for new, changed and removed artifacts (0: never)
    poll_interval: float = 2.0
    #: logging level of the command line (embedded, the host's logging applies)
    log_level: str = "INFO"

    @classmethod
    def load(cls, flags=None, environ=None):
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


@dataclasses.dataclass(frozen=True)
class Setting:
    field: str
    convert: object
    help: str
    metavar: str = None

    @property
    def flag(self):
        return "--" + self.field.replace("_", "-")

    @property
    def env(self):
        return ENV_PREFIX + self.field.upper()


SETTINGS = (
    Setting("store", str, "folder holding the models", "DIR"),
    Setting("host", str, "address to bind (0.0.0.0 exposes the service to the network)", "HOST"),
    Setting("port", _port, "TCP port (0 picks a free one)", "PORT"),
    Setting("server", _server_name, "WSGI server: waitress, wsgiref, gunicorn, ...", "NAME"),
    Setting("threads", _positive_int, "worker threads (waitress)", "N"),
    Setting("default_model", _model_name_setting,
            "model behind GET /predict/<sen> and POST /predict (default: the only model)", "NAME"),
    Setting("max_body_bytes", _positive_int, "largest request body in bytes (413 above)", "N"),
    Setting("max_rows", _positive_int, "most rows in one request (400 above)", "N"),
    Setting("max_depth", _positive_int, "deepest JSON nesting in a request (400 above)", "N"),
    Setting("load_retry_seconds", _non_negative_float,
            "seconds before a failed model load is tried again", "SECONDS"),
    Setting("poll_interval", _non_negative_float,
            "seconds between looks at the store for new, changed and removed models (0: never)", "SECONDS"),
    Setting("log_level", _log_level, "logging level: " + ", ".join(LOG_LEVELS), "LEVEL"),
)

###############################################################################
# Errors ######################################################################
###############################################################################
# Every failure the caller should see is a ServiceError carrying its status; the
# HTTP layer turns it into the one JSON error shape in one place.


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message safe to show."""

    status = 500
    code = "internal_error"

    def __init__(self, message, **fields):
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self):
        return {"error": self.message, "code": self.code, **self.fields}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class ModelUnavailable(ServiceError):
    """503: the model exists but cannot serve now (failed or refused load)."""

    status, code = 503, "model_unavailable"

    def __init__(self, message, retry_after=None, **fields):
        super().__init__(message, **fields)
        self.retry_after = retry_after


class ArtifactError(Exception):
    """An artifact could not be turned into a model; the message says why."""


###############################################################################
# JSON model format ###########################################################
###############################################################################
# A fitted estimator written as data: an allow-listed class name plus the state
# pickle would restore (`__getstate__`), with numbers stored bit for bit.
#
#   {"format": "model-service/sklearn-json", "format_version": 1,
#    "sklearn_version": "1.9.1", "estimator": <node>}
#
# A <node> is a JSON null, boolean, string, integer, finite float or list, or an
# object tagged with "$type":
#   estimator  {"$type": "estimator", "class": "sklearn.linear_model.Ridge", "state": {attr: node}}
#   ndarray    {"$type": "ndarray", "dtype": "<f8", "shape": [2, 3], "data": base64 of the C-order bytes}
#              (string and object arrays carry "items": [node, ...] instead of "data")
#   scalar     {"$type": "scalar", "dtype": "<i8", "data": base64}   a numpy scalar
#   float      {"$type": "float", "value": "nan" | "inf" | "-inf"}
#   tuple      {"$type": "tuple", "items": [node, ...]}
#   dict       {"$type": "dict", "items": [[key node, value node], ...]}
#   dtype      {"$type": "dtype", "dtype": "<f8"}                   a numpy dtype
#   type       {"$type": "type", "name": "float64"}                 a numpy scalar type
#
# Loading imports only the modules of the classes in JSON_ESTIMATORS, builds the
# class with `__new__` and restores its state: nothing in a file can name a
# function or another class to call.

JSON_FORMAT = "model-service/sklearn-json"
JSON_FORMAT_VERSION = 1

JSON_ESTIMATORS = frozenset({
    "sklearn.linear_model.LinearRegression",
    "sklearn.linear_model.Ridge",
    "sklearn.linear_model.RidgeClassifier",
    "sklearn.linear_model.Lasso",
    "sklearn.linear_model.ElasticNet",
    "sklearn.linear_model.LogisticRegression",
    "sklearn.preprocessing.StandardScaler",
    "sklearn.preprocessing.MinMaxScaler",
    "sklearn.preprocessing.MaxAbsScaler",
    "sklearn.preprocessing.RobustScaler",
    "sklearn.preprocessing.LabelBinarizer",       # held inside a fitted RidgeClassifier
    "sklearn.pipeline.Pipeline",
})

# dtypes the format stores: booleans, integers, floats, complex, unicode, object
_DTYPE_PATTERN = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248]|c(8|16)|U\d{1,6}|O)$")
_NUMPY_TYPES = ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64", "float16", "float32", "float64", "complex64", "complex128", "str_")


def _estimator_class_name(cls):
    """The allow-listed public name of an estimator class, or None."""
    for public in JSON_ESTIMATORS:
        module, _, attr = public.rpartition(".")
        if attr == cls.__name__ and cls.__module__.split(".")[0] == module.split(".")[0]:
            if getattr(importlib.import_module(module), attr) is cls:
                return public
    return None


def _encode_node(value, where):
    """Encode one value of an estimator's state; `where` names it in errors."""
    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.generic):
        return value
    if isinstance(value, float) and not isinstance(value, np.generic):
        return value if math.isfinite(value) else {"$type": "float", "value": repr(value)}
    if isinstance(value, list):
        return [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"$type": "tuple", "items": [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, dict):
        return {"$type": "dict", "items": [[_encode_node(k, f"{where} key"), _encode_node(v, f"{where}[{k!r}]")]
                                           for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        return _encode_array(value, where)
    if isinstance(value, np.generic):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            return _encode_node(value.item(), where)
        return {"$type": "scalar", "dtype": array.dtype.str, "data": base64.b64encode(array.tobytes()).decode()}
    if isinstance(value, np.dtype):
        return {"$type": "dtype", "dtype": _checked_dtype(value.str, where).str}
    if isinstance(value, type) and issubclass(value, np.generic):
        names = {getattr(np, name): name for name in _NUMPY_TYPES}
        if value in names:
            return {"$type": "type", "name": names[value]}
    cls_name = _estimator_class_name(type(value))
    if cls_name is not None:
        state = value.__getstate__()
        return {"$type": "estimator", "class": cls_name,
                "state": {key: _encode_node(item, f"{where}.{key}") for key, item in sorted(state.items())}}
    raise ArtifactError(f"cannot write {where} as JSON: {type(value).__module__}.{type(value).__qualname__} "
                        "is not supported by the JSON model format")


def _encode_array(array, where):
    dtype = _checked_dtype(array.dtype.str, where)
    node = {"$type": "ndarray", "dtype": dtype.str, "shape": list(array.shape)}
    if dtype.kind in "biufc":
        node["data"] = base64.b64encode(array.tobytes(order="C")).decode()
    else:
        node["items"] = [_encode_node(item, f"{where}[{i}]") for i, item in enumerate(array.ravel().tolist())]
    return node


def _checked_dtype(text, where):
    import numpy as np

    if not isinstance(text, str) or not _DTYPE_PATTERN.match(text):
        raise ArtifactError(f"{where}: dtype {text!r} is not allowed")
    return np.dtype(text)


def dump_json_model(estimator):
    """The JSON model document (a str) for a fitted estimator of an allow-listed class."""
    import sklearn

    if _estimator_class_name(type(estimator)) is None:
        raise ArtifactError(f"{type(estimator).__qualname__} is not supported by the JSON model format; "
                            f"supported: {', '.join(sorted(JSON_ESTIMATORS))}")
    document = {"format": JSON_FORMAT, "format_version": JSON_FORMAT_VERSION,
                "sklearn_version": sklearn.__version__, "estimator": _encode_node(estimator, "estimator")}
    return json.dumps(document, indent=1, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


def save_json_model(estimator, path):
    """Write a fitted estimator as a JSON model file (by write-then-rename, so never half-written)."""
    import tempfile

    try:
        data = dump_json_model(estimator).encode("utf-8")
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


def load_json_model(source):
    """Build the estimator a JSON model document describes (text, bytes or a path)."""
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        with open(source, "rb") as handle:
            source = handle.read()
    try:
        document = json.loads(source)
    except (ValueError, RecursionError) as error:
        raise ArtifactError(f"not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise ArtifactError(f"not a JSON model document (expected \"format\": \"{JSON_FORMAT}\")")
    if document.get("format_version") != JSON_FORMAT_VERSION:
        raise ArtifactError(f"unsupported format_version {document.get('format_version')!r}; "
                            f"this service reads version {JSON_FORMAT_VERSION}")
    try:
        estimator = _decode_node(document.get("estimator"), "estimator")
    except RecursionError:
        raise ArtifactError("the document is nested too deeply") from None
    if not hasattr(estimator, "get_params"):
        raise ArtifactError("the document's \"estimator\" is not an estimator")
    return estimator


def _decode_node(node, where):
    import numpy as np

    if node is None or isinstance(node, (bool, str, int)):
        return node
    if isinstance(node, float):
        return node
    if isinstance(node, list):
        return [_decode_node(item, f"{where}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        raise ArtifactError(f"{where}: unexpected JSON value")
    kind = node.get("$type")
    try:
        if kind == "estimator":
            return _decode_estimator(node, where)
        if kind == "ndarray":
            dtype = _checked_dtype(node["dtype"], where)
            shape = node["shape"]
            if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
                raise ArtifactError(f"{where}: shape must be a list of sizes")
            count = math.prod(shape)
            if dtype.kind in "biufc":
                raw = _raw_bytes(node, dtype, count, where)
                return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            items = [_decode_node(item, f"{where}[{i}]") for i, item in enumerate(node["items"])]
            if len(items) != count:
                raise ArtifactError(f"{where}: {len(items)} items do not fill shape {shape}")
            array = np.empty(len(items), dtype=dtype)
            array[:] = items if dtype.kind != "O" else _object_items(items)
            return array.reshape(shape)
        if kind == "scalar":
            dtype = _checked_dtype(node["dtype"], where)
            return np.frombuffer(_raw_bytes(node, dtype, 1, where), dtype=dtype)[0]
        if kind == "float":
            if node["value"] not in ("nan", "inf", "-inf"):
                raise ArtifactError(f"{where}: bad float {node['value']!r}")
            return float(node["value"])
        if kind == "tuple":
            return tuple(_decode_node(item, f"{where}[{i}]") for i, item in enumerate(node["items"]))
        if kind == "dict":
            return {_decode_node(key, f"{where} key"): _decode_node(value, f"{where}[{key!r}]")
                    for key, value in node["items"]}
        if kind == "dtype":
            return _checked_dtype(node["dtype"], where)
        if kind == "type":
            if node["name"] not in _NUMPY_TYPES:
                raise ArtifactError(f"{where}: numpy type {node['name']!r} is not allowed")
            return getattr(np, node["name"])
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: malformed {kind} node ({type(error).__name__}: {error})") from None
    raise ArtifactError(f"{where}: unknown node type {kind!r}")


def _raw_bytes(node, dtype, count, where):
    raw = base64.b64decode(node["data"], validate=True)
    if len(raw) != count * dtype.itemsize:
        raise ArtifactError(f"{where}: {len(raw)} bytes of data do not hold {count} values of {dtype.str}")
    return raw


def _object_items(items):
    """Assign a list into an object array without numpy re-nesting its lists."""
    import numpy as np

    holder = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        holder[i] = item
    return holder


def _decode_estimator(node, where):
    class_name = node["class"]
    if class_name not in JSON_ESTIMATORS:
        raise ArtifactError(f"{where}: class {class_name!r} is not allowed in JSON models; "
                            f"allowed: {', '.join(sorted(JSON_ESTIMATORS))}")
    module, _, attr = class_name.rpartition(".")
    cls = getattr(importlib.import_module(module), attr)
    state = node["state"]
    if not isinstance(state, dict):
        raise ArtifactError(f"{where}: estimator state must be an object")
    estimator = cls.__new__(cls)
    estimator.__setstate__({key: _decode_node(value, f"{where}.{key}") for key, value in state.items()})
    return estimator


###############################################################################
# Artifact loaders ############################################################
###############################################################################
# The format comes from the file's extension, decided by the operator who put it
# in the store, never from a request or from the artifact's own contents.


def _load_pickle(data):
    return pickle.loads(data)


def _load_joblib(data):
    import io

    import joblib

    return joblib.load(io.BytesIO(data))


def _load_json(data):
    return load_json_model(data)


ARTIFACT_LOADERS = {".joblib": ("joblib", _load_joblib), ".pkl": ("pickle", _load_pickle),
                    ".pickle": ("pickle", _load_pickle), ".json": ("json", _load_json)}

PREDICT_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function",
                   "transform", "score_samples")


def load_artifact(ref):
    """Read, hash and deserialise one artifact; every failure becomes ArtifactError."""
    _, loader = ARTIFACT_LOADERS[ref.extension]
    try:
        with open(ref.path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ArtifactError(f"cannot read {ref.file}: {error.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        estimator = loader(data)
    except ArtifactError:
        raise
    except (Exception, SystemExit) as error:  # a pickle may raise anything, even SystemExit
        logger.debug("loading %s failed", ref.file, exc_info=True)
        raise ArtifactError(f"cannot load {ref.file} as {ref.format}: {type(error).__name__}: "
                            f"{_clip(str(error))}") from None
    if not any(callable(getattr(estimator, method, None)) for method in PREDICT_METHODS):
        raise ArtifactError(f"{ref.file} holds a {type(estimator).__name__}, which has none of the methods "
                            f"{', '.join(PREDICT_METHODS)}")
    return estimator, digest, len(data)


def _clip(text, limit=300):
    return text if len(text) <= limit else text[:limit] + "..."


###############################################################################
# Model store #################################################################
###############################################################################
# Finds artifacts on disk.  It knows nothing of loading or HTTP: a scan returns
# the catalogue {name: {version: ArtifactRef}} and logs what it skipped.

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")     # used with fullmatch: "$" would let "\n" in
VERSION = re.compile(r"[1-9][0-9]{0,17}")
_TEMPORARY_SUFFIXES = ("~", ".tmp", ".temp", ".part", ".partial", ".swp", ".crdownload")


def _is_dir(entry):
    """DirEntry.is_dir, treating a link loop or an unreadable entry as "not a folder" (warned later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entries(path, where):
    """A folder's entries in name order; an unreadable folder is skipped with a warning."""
    try:
        return sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError as error:
        logger.warning("skipping %s: %s", where, error.strerror)
        return []


def valid_model_name(name):
    return isinstance(name, str) and MODEL_NAME.fullmatch(name) is not None and not name.endswith(".")


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
        return ARTIFACT_LOADERS[self.extension][0]

    @property
    def fingerprint(self):
        return (self.path, self.size, self.mtime_ns)


class ModelStore:
    """The folder of artifacts; every path it returns resolves strictly inside it."""

    def __init__(self, root):
        self.path = os.fspath(root)
        self.root = None      # resolved at each scan, so a symlinked store may be re-pointed

    def scan(self):
        """Return {name: {version: ArtifactRef}} for everything valid; warn about the rest."""
        self.root = os.path.realpath(self.path)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"model store {self.root} is not a folder")
        found = {}
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
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
                logger.warning("skipping %s: %r is not a valid model name", entry.name, name)
            elif name in found:
                logger.warning("skipping model %r: more than one artifact or folder has that name", name)
                found[name] = None
            else:
                found[name] = versions
        return {name: versions for name, versions in found.items() if versions}

    def _scan_versions(self, folder):
        versions = {}
        for entry in _entries(folder.path, folder.name):
            where = f"{folder.name}/{entry.name}"
            if self._skipped(entry.name, where):
                continue
            if not _is_dir(entry) or not VERSION.fullmatch(entry.name):
                logger.warning("skipping %s: versions are folders named by a positive integer", where)
                continue
            artifacts = []
            for item in _entries(entry.path, where):
                if self._skipped(item.name, f"{where}/{item.name}"):
                    continue
                _, extension = os.path.splitext(item.name)
                ref = self._artifact(folder.name, int(entry.name), item, extension)
                if ref:
                    artifacts.append(ref)
            if len(artifacts) == 1:
                versions[int(entry.name)] = artifacts[0]
            elif artifacts:
                logger.warning("skipping %s: it holds %d artifacts, a version holds exactly one",
                               where, len(artifacts))
            else:
                logger.warning("skipping %s: no artifact in it", where)
        return versions

    @staticmethod
    def _skipped(basename, where):
        if basename.startswith(".") or basename.endswith(_TEMPORARY_SUFFIXES) or basename.startswith("~"):
            logger.warning("skipping %s: hidden or temporary file", where)
            return True
        return False

    def _artifact(self, name, version, entry, extension):
        relative = os.path.relpath(entry.path, self.root)
        if extension not in ARTIFACT_LOADERS:
            logger.warning("skipping %s: unknown extension (use %s)", relative, ", ".join(ARTIFACT_LOADERS))
            return None
        real = os.path.realpath(entry.path)
        if os.path.commonpath([self.root, real]) != self.root:
            logger.warning("skipping %s: it resolves outside the model store", relative)
            return None
        try:
            stat = os.stat(real)
        except OSError as error:
            logger.warning("skipping %s: %s", relative, error.strerror)
            return None
        if not os.path.isfile(real):
            logger.warning("skipping %s: not a regular file", relative)
            return None
        return ArtifactRef(name, version, real, relative.replace(os.sep, "/"), extension,
                           stat.st_size, stat.st_mtime_ns)


###############################################################################
# Model registry ##############################################################
###############################################################################
# Holds each version's state and its loaded model.  Loads are lazy and
# single-flight per version; a failed load is retried only after a pause.  A
# request keeps the LoadedModel it got, so later swaps never disturb it.

UNLOADED, LOADING, AVAILABLE, FAILED = "UNLOADED", "LOADING", "AVAILABLE", "FAILED"


class LoadedModel:
    """A deserialised estimator with the facts about it computed once, at load."""

    def __init__(self, ref, estimator, sha256, size, load_seconds):
        self.ref = ref
        self.name = ref.name
        self.version = str(ref.version)
        self.estimator = estimator
        self.sha256 = sha256
        self.size = size
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        self.methods = tuple(m for m in PREDICT_METHODS if callable(getattr(estimator, m, None)))
        self.n_features = _attribute(estimator, "n_features_in_")
        names = _attribute(estimator, "feature_names_in_")
        self.feature_names = None if names is None else [str(n) for n in names]
        self.feature_index = None if names is None else {n: i for i, n in enumerate(self.feature_names)}
        classes = _attribute(estimator, "classes_")
        self.classes = None if classes is None else to_jsonable(classes)
        self.estimator_class = f"{type(estimator).__module__}.{type(estimator).__qualname__}"
        self.make_frame = _frame_maker() if names is not None else None

    def run(self, method, inputs):
        """Call one method; the estimator's complaints about the input are the caller's 400."""
        try:
            return getattr(self.estimator, method)(inputs)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            # e.g. a text pipeline given numbers: 'int' object has no attribute 'lower'
            raise BadRequest(f"{method} failed: {_clip(str(error))}", model=self.name) from None

    def describe(self):
        return {"estimator": self.estimator_class, "methods": list(self.methods),
                "n_features_in_": self.n_features, "feature_names_in_": self.feature_names,
                "classes_": self.classes}


def _attribute(estimator, attr):
    try:
        value = getattr(estimator, attr)
    except Exception:  # properties of unfitted or partial pipelines raise anything
        return None
    return int(value) if attr == "n_features_in_" and value is not None else value


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


class ModelVersion:
    """One version's slot: its artifact, state, loaded model and load history."""

    def __init__(self, ref):
        self.ref = ref
        self.state = UNLOADED
        self.model = None
        self.error = None
        self.retry_at = 0.0
        self.loads = 0
        self.lock = threading.Lock()
        self.replacing = None      # ArtifactRef of a changed artifact loading beside the model that serves
        self.rejected = None       # fingerprint of a changed artifact that failed to load (not retried)

    def describe(self):
        model = self.model
        info = {"version": str(self.ref.version), "state": self.state, "format": self.ref.format,
                "artifact": {"file": self.ref.file, "size": self.ref.size,
                             "modified": _iso_time(self.ref.mtime_ns / 1e9),
                             "sha256": model.sha256 if model else None},
                "loaded_at": _iso_time(model.loaded_at) if model else None,
                "load_seconds": round(model.load_seconds, 6) if model else None,
                "loads": self.loads, "last_error": self.error}
        info.update(model.describe() if model else
                    {"estimator": None, "methods": None, "n_features_in_": None,
                     "feature_names_in_": None, "classes_": None})
        return info


def _build_model(ref):
    """Load one artifact into a LoadedModel; an unexpected failure is logged with its traceback."""
    started = time.perf_counter()
    try:
        estimator, digest, size = load_artifact(ref)
    except ArtifactError:
        raise
    except Exception:
        logger.exception("unexpected error loading %s", ref.file)
        raise
    return LoadedModel(ref, estimator, digest, size, time.perf_counter() - started)


def _describe_model(name, versions, latest):
    return {"name": name, "latest_version": str(latest.ref.version),
            "versions": [versions[v].describe() for v in sorted(versions, reverse=True)]}


def _in_background(function, *args):
    threading.Thread(target=function, args=args, name="model-loader", daemon=True).start()


def _iso_time(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class ModelRegistry:
    """Every model in the store and the state of each of its versions.

    The catalogue is one pair ({name: {version: ModelVersion}}, {name: ModelVersion
    served by default}) that a rescan replaces whole, so a request reads a
    consistent view without a lock.  Rescans are driven by requests, at most every
    `poll_interval` seconds: that works in every WSGI host (threads, pre-fork
    workers, uWSGI without threads), and loads they start run beside the requests.
    """

    def __init__(self, config, clock=time.monotonic):
        self.config = config
        self.store = ModelStore(config.store)
        self.clock = clock
        self._catalogue = ({}, {})
        self._scanned = False
        self._scan_error = None
        self._scan_lock = threading.Lock()
        self._last_scan = None
        self._unsettled = {}     # (name, version) -> fingerprint seen once, waiting to be seen again

    def refresh(self):
        """Scan the store at the first call, then at most every poll_interval; a rescan never blocks a request."""
        if not self._scanned:
            with self._scan_lock:
                if not self._scanned:
                    self._scan()
            return
        interval = self.config.poll_interval
        if interval <= 0 or self.clock() - self._last_scan < interval:
            return
        if self._scan_lock.acquire(blocking=False):
            try:
                self._scan()
            finally:
                self._scan_lock.release()

    def _scan(self):
        self._last_scan = self.clock()
        try:
            found = self.store.scan()
        except OSError as error:
            self._scan_error = str(error)
            logger.error("cannot scan the model store: %s", error)
            return
        first = not self._scanned
        self._apply(found, settle=not first)
        self._scan_error, self._scanned = None, True
        if first:
            logger.info("model store %s: %d model(s): %s", self.store.root, len(found),
                        ", ".join(sorted(found)) or "none")

    def _apply(self, found, settle):
        """Make the catalogue match the store: add new versions, replace changed ones, drop removed ones.

        With `settle`, a new or changed artifact is used only once two scans in a row
        saw the same size and mtime (a file still being written changes between them).
        A version in use is replaced only after its new artifact has loaded.
        """
        old_models, old_latest = self._catalogue
        models, latest, unsettled = {}, {}, {}
        for name, refs in found.items():
            old, slots = old_models.get(name, {}), {}
            for number, ref in refs.items():
                slot = old.get(number)
                if slot is not None and slot.ref.fingerprint == ref.fingerprint:
                    slots[number] = slot
                elif settle and self._unsettled.get((name, number)) != ref.fingerprint:
                    unsettled[(name, number)] = ref.fingerprint
                    if slot is not None:
                        slots[number] = slot        # the old artifact serves until the new one settles
                elif slot is None or slot.model is None:
                    slots[number] = ModelVersion(ref)
                else:
                    slots[number] = slot
                    if slot.replacing is None and slot.rejected != ref.fingerprint:
                        slot.replacing = ref
                        _in_background(self._replace, slot, ref)
            if slots:
                models[name] = slots
                latest[name] = self._pick_latest(old_latest.get(name), slots)
        for name, slots in old_models.items():
            for number, slot in slots.items():
                if models.get(name, {}).get(number) is not slot and slot.model is not None:
                    logger.info("model %r version %s left the store: unloaded", name, number)
                    slot.model, slot.state = None, UNLOADED    # requests holding it finish on it
        self._unsettled = unsettled
        self._catalogue = (models, latest)

    def _pick_latest(self, current, slots):
        """The highest version; but a model in use keeps its version until the new one has loaded."""
        highest = slots[max(slots)]
        if highest.model is not None or current is None or current.model is None or \
                current not in slots.values():
            return highest
        if highest.state != LOADING:
            _in_background(self._promote, highest)
        return current

    def _promote(self, slot):
        try:
            self._load(slot)
        except ModelUnavailable:
            return                     # recorded in the slot's status; the previous version keeps serving
        with self._scan_lock:
            models, latest = self._catalogue
            versions = models.get(slot.ref.name, {})
            if versions.get(slot.ref.version) is slot and max(versions) == slot.ref.version:
                self._catalogue = (models, {**latest, slot.ref.name: slot})
                logger.info("model %r now serves version %s", slot.ref.name, slot.ref.version)

    def _replace(self, slot, ref):
        """Load a changed artifact beside the model that serves, then swap; a failure keeps the old one."""
        try:
            model = _build_model(ref)
        except Exception as error:
            slot.rejected = ref.fingerprint
            slot.error = f"changed artifact not loaded, the previous one still serves: {error}"
            logger.error("model %r version %s: %s", ref.name, ref.version, slot.error)
        else:
            slot.ref, slot.model, slot.error, slot.rejected = ref, model, None, None
            slot.loads += 1
            logger.info("model %r version %s reloaded from its changed artifact", ref.name, ref.version)
        finally:
            slot.replacing = None

    @property
    def ready(self):
        return self._scanned

    @property
    def not_ready_reason(self):
        return self._scan_error or "the model store has not been scanned yet"

    def names(self):
        return sorted(self._catalogue[0])

    def default_model_name(self):
        if self.config.default_model:
            return self.config.default_model
        models = self._catalogue[0]
        if len(models) == 1:
            return next(iter(models))
        raise NotFound(f"no default model: the store holds {len(models)} models "
                       f"({', '.join(sorted(models)) or 'none'}); start the service with --default-model NAME")

    def version(self, name, version=None):
        """The ModelVersion for a name and an optional version string; 400/404 if there is none."""
        models, latest = self._catalogue
        versions = models.get(name)
        if versions is None:
            self.require_store()
            if not valid_model_name(name):
                raise BadRequest(f"invalid model name {_clip(repr(name), 80)}: names match ^{MODEL_NAME.pattern}$")
            raise NotFound(f"model {name!r} not found", model=name, models=sorted(models))
        if version is None:
            return latest[name]
        slot = versions.get(int(version)) if VERSION.fullmatch(version) else None
        if slot is None:
            if not VERSION.fullmatch(version):
                raise BadRequest(f"invalid version {_clip(repr(version), 40)}: versions are positive integers",
                                 model=name)
            raise NotFound(f"model {name!r} has no version {version}", model=name,
                           versions=[str(v) for v in sorted(versions)])
        return slot

    def require_store(self):
        """503 unless the store has been scanned (it may be missing or unreadable)."""
        if not self._scanned:
            raise ModelUnavailable(f"model store unavailable: {self.not_ready_reason}")

    def get(self, name, version=None):
        """The loaded model, loading it on first use (one load however many callers wait)."""
        slot = self.version(name, version)
        model = slot.model
        return model if model is not None else self._load(slot)

    def _load(self, slot):
        with slot.lock:
            if slot.model is not None:
                return slot.model
            ref = slot.ref
            wait = slot.retry_at - self.clock()
            if slot.state == FAILED and wait > 0:
                raise ModelUnavailable(f"model {ref.name!r} version {ref.version} failed to load: {slot.error}",
                                       retry_after=math.ceil(wait), model=ref.name, version=str(ref.version))
            slot.state, slot.loads = LOADING, slot.loads + 1
            try:
                model = _build_model(ref)
            except Exception as error:
                slot.state, slot.error = FAILED, str(error) or type(error).__name__
                slot.retry_at = self.clock() + self.config.load_retry_seconds
                logger.error("model %r version %s failed to load: %s", ref.name, ref.version, slot.error)
                raise ModelUnavailable(f"model {ref.name!r} version {ref.version} failed to load: {slot.error}",
                                       retry_after=math.ceil(self.config.load_retry_seconds) or None,
                                       model=ref.name, version=str(ref.version)) from None
            slot.model, slot.state, slot.error = model, AVAILABLE, None
            logger.info("loaded model %r version %s (%s, %.3f s)", ref.name, ref.version, ref.format,
                        model.load_seconds)
            return model

    def describe(self, name):
        models, latest = self._catalogue
        if name not in models:                     # removed by a rescan since the caller looked
            raise NotFound(f"model {name!r} not found", model=name)
        return _describe_model(name, models[name], latest[name])

    def describe_all(self):
        models, latest = self._catalogue
        return [_describe_model(name, models[name], latest[name]) for name in sorted(models)]


###############################################################################
# Codecs ######################################################################
###############################################################################
# Turning request bodies into estimator inputs and estimator outputs into strict
# JSON.  Nothing here chooses a decoder from what the client claims: JSON is the
# only body format, whatever the Content-Type says.  That includes curl -d's
# default, application/x-www-form-urlencoded (TF Serving's own examples send
# JSON that way); forms are never decoded, and multipart bodies are refused.


def read_body(environ, limit):
    """The request body as bytes, at most `limit` of them (413 above, decided before reading)."""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            length = int(length)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
        return environ["wsgi.input"].read(length) if length > 0 else b""
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    stream, chunks, total = environ["wsgi.input"], [], 0
    while True:
        chunk = stream.read(min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")


def check_content_type(environ):
    """Refuse the body types that cannot be JSON (multipart) or are not UTF-8."""
    content_type = environ.get("CONTENT_TYPE", "").lower()
    if content_type.startswith("multipart/"):
        raise UnsupportedMediaType(f"send JSON, not {content_type.split(';')[0]}")
    if "charset=" in content_type:
        charset = content_type.split("charset=", 1)[1].split(";")[0].strip().strip('"')
        if charset not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"JSON must be UTF-8, not {charset}")
    if environ.get("HTTP_CONTENT_ENCODING", "identity").lower() not in ("identity", ""):
        raise UnsupportedMediaType("compressed request bodies are not accepted")


def parse_json(data, max_depth, what="request body"):
    """Parse JSON text (bytes or str) with a nesting bound; every failure is a 400."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"{what} is not valid UTF-8") from None
    if not data.strip():
        raise BadRequest(f"{what} is empty: send JSON")
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except ValueError as error:
        raise BadRequest(f"{what} is not valid JSON: {error}") from None
    check_depth(value, max_depth, data, what)
    return value


def check_depth(value, max_depth, text, what):
    """400 if containers nest deeper than max_depth; counting brackets first skips the walk."""
    if text.count("[") + text.count("{") + text.count("(") <= max_depth:
        return
    level = [value]
    for _ in range(max_depth):
        level = [child for item in level if isinstance(item, (list, dict, tuple))
                 for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return
    if any(isinstance(item, (list, dict, tuple)) for item in level):
        raise BadRequest(f"{what} is nested deeper than {max_depth} levels")


def parse_literal(text, max_depth, max_length=100_000):
    """A JSON value or Python literal from a URL (the seed's GET /predict/<sen>), parsed safely."""
    if len(text) > max_length:
        raise BadRequest(f"input is longer than {max_length} characters")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        depth = deepest = 0
        for char in text:
            if char in "[({":
                depth += 1
                deepest = max(deepest, depth)
            elif char in "])}":
                depth -= 1
        if deepest > max_depth:
            raise BadRequest(f"input is nested deeper than {max_depth} levels") from None
        try:
            value = _tuples_to_lists(ast.literal_eval(text))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise BadRequest("input is neither JSON nor a Python literal") from None
    check_depth(value, max_depth, text, "input")
    return value


def _tuples_to_lists(value):
    """Python literals may use tuples where JSON has lists; the model sees lists either way."""
    if isinstance(value, (list, tuple)):
        return [_tuples_to_lists(item) for item in value]
    return value


def choose_method(model, requested):
    """The method to call: 404 for a name that is no prediction method, 400 for one the model lacks."""
    method = requested or "predict"
    if method not in model.methods:
        error = NotFound if method not in PREDICT_METHODS else BadRequest
        raise error(f"model {model.name!r} has no method {_clip(repr(method), 60)}; it has: "
                    f"{', '.join(model.methods)}", model=model.name, methods=list(model.methods))
    return method


def decode_payload(payload, query_method):
    """Split a predict body into (instances or columns, method) per the native API."""
    if isinstance(payload, list):
        rows, method = payload, None
    elif isinstance(payload, dict):
        has_instances, has_inputs = "instances" in payload, "inputs" in payload
        if has_instances and has_inputs:
            raise BadRequest("expecting only one of 'inputs' or 'instances' keys")
        if not has_instances and not has_inputs:
            raise BadRequest("Missing 'inputs' or 'instances' key")
        rows = payload["instances"] if has_instances else payload["inputs"]
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
    import numpy as np

    try:
        matrix = np.asarray(rows, dtype=float)
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


def dumps(value):
    """Strict JSON (no NaN tokens: a value to_jsonable missed fails loudly)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode_prediction(model, method, outputs):
    answer = {"model": model.name, "version": model.version, "method": method,
              "predictions": to_jsonable(outputs)}
    if method in ("predict_proba", "predict_log_proba") and model.classes is not None:
        answer["classes"] = model.classes
    return answer


###############################################################################
# HTTP application ############################################################
###############################################################################
# Thin routes: find the model, decode, run, encode.  One plugin turns results
# and ServiceErrors into JSON; one error handler does the same for Bottle's own
# errors (unknown route, wrong method, unexpected faults), so no answer is HTML.

JSON_TYPE = "application/json"


def _json_plugin(callback):
    """Serialise what a route returns; map ServiceError to its status; hide internal faults."""

    def wrapper(*args, **kwargs):
        response = bottle.response
        try:
            result = callback(*args, **kwargs)
        except ServiceError as error:
            result = _error_result(response, error)
        except bottle.HTTPResponse:
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("internal error %s on %s %s", error_id, bottle.request.method, bottle.request.path)
            result = _error_result(response, ServiceError("internal server error", error_id=error_id))
        response.content_type = JSON_TYPE
        return dumps(result)

    return wrapper


def _error_result(response, error):
    response.status = error.status
    if getattr(error, "retry_after", None):
        response.set_header("Retry-After", str(error.retry_after))
    return error.to_dict()


def _error_page(http_error):
    """JSON for Bottle's own errors: 404 and 405 routes, faults outside a route."""
    status = http_error.status_code
    response = bottle.response
    response.content_type = JSON_TYPE
    response.set_header("X-Content-Type-Options", "nosniff")
    if status >= 500:
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error %s: %s", error_id, http_error.traceback or http_error.body)
        return dumps({"error": "internal server error", "code": "internal_error", "error_id": error_id})
    if status == 404:
        return dumps({"error": f"no route for {bottle.request.method} {_clip(bottle.request.path, 200)}",
                      "code": "not_found"})
    if status == 405:
        return dumps({"error": f"method {bottle.request.method} is not allowed here; allowed: "
                               f"{response.get_header('Allow', '')}", "code": "method_not_allowed"})
    return dumps({"error": str(http_error.body), "code": "http_error"})


def create_app(store=None, config=None, registry=None, **options):
    """The WSGI application: a Bottle app over one ModelRegistry.

    `config` defaults to the environment (MODEL_SERVICE_*); `store` and keyword
    options override its fields.  Creating the app touches no disk: the store is
    scanned on the first request.
    """
    config = config or Config.load({})
    if store is not None:
        options["store"] = os.fspath(store)
    if options:
        config = dataclasses.replace(config, **options)
    registry = registry or ModelRegistry(config)
    app = bottle.Bottle()
    app.uninstall(bottle.JSONPlugin)     # it would write NaN tokens; every body goes through dumps()
    app.config["service.config"] = config
    app.config["service.registry"] = registry
    app.default_error_handler = _error_page
    app.install(_json_plugin)
    request = bottle.request

    @app.hook("before_request")
    def _before():
        raw = request.environ.get("bottle.raw_path", "")
        if not raw.isascii():
            try:
                raw.encode("latin-1").decode("utf-8")
            except UnicodeError:
                raise bottle.HTTPError(400, "the request path is not valid UTF-8") from None
        registry.refresh()

    @app.hook("after_request")
    def _after():
        bottle.response.set_header("X-Content-Type-Options", "nosniff")

    def predict(name, version, payload):
        model = registry.get(name, version)
        rows, method = decode_payload(payload, request.query.get("method"))
        method = choose_method(model, method)
        inputs = model_inputs(model, rows, config.max_rows)
        return encode_prediction(model, method, model.run(method, inputs))

    def body_json():
        check_content_type(request.environ)
        return parse_json(read_body(request.environ, config.max_body_bytes), config.max_depth)

    def query_instances():
        text = request.query.get("instances")
        if text is None:
            raise BadRequest("GET predict needs ?instances=<JSON list of instances>")
        return {"instances": parse_json(text, config.max_depth, "?instances")}

    # -- service ------------------------------------------------------------
    @app.get("/")
    def index():
        return {"name": SERVICE_NAME, "version": __version__, "status": "alive",
                "models": registry.names(),
                "links": {"models": "/models", "health": "/healthz", "ready": "/readyz",
                          "predict": "/models/{name}/predict"}}

    @app.get("/healthz")
    def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz():
        if not registry.ready:
            raise ModelUnavailable(f"not ready: {registry.not_ready_reason}", ready=False)
        return {"ready": True, "models": len(registry.names())}

    # -- models -------------------------------------------------------------
    @app.get("/models")
    def list_models():
        registry.require_store()
        return {"models": registry.describe_all()}

    @app.get("/models/<name>")
    def show_model(name):
        registry.version(name)          # 400 or 404 unless the model exists
        return registry.describe(name)

    @app.get("/models/<name>/versions/<version>")
    def show_version(name, version):
        slot = registry.version(name, version)
        return {"name": name, **slot.describe()}

    @app.post("/models/<name>/predict")
    def predict_latest(name):
        return predict(name, None, body_json())

    @app.post("/models/<name>/versions/<version>/predict")
    def predict_version(name, version):
        return predict(name, version, body_json())

    @app.get("/models/<name>/predict")
    def predict_latest_get(name):
        return predict(name, None, query_instances())

    @app.get("/models/<name>/versions/<version>/predict")
    def predict_version_get(name, version):
        return predict(name, version, query_instances())

    # -- the seed course's routes, on the default model ----------------------
    @app.get("/predict/<sentence:path>")
    def seed_predict(sentence):
        return predict(registry.default_model_name(), None,
                       {"instances": parse_literal(sentence, config.max_depth)})

    @app.post("/predict")
    def seed_predict_post():
        return predict(registry.default_model_name(), None, body_json())

    return app


###############################################################################
# Serving #####################################################################
###############################################################################


def serve(app, config):
    """Run a server until interrupted: waitress (tuned here) or any Bottle adapter."""
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the service is reachable from other machines", config.host)
    if config.server == "waitress":
        import waitress

        # waitress refuses bodies far over our limit itself (as plain text); below that the
        # service's own check answers 413 in JSON.
        waitress.serve(app, host=config.host, port=config.port, threads=config.threads,
                       max_request_body_size=2 * config.max_body_bytes, ident=SERVICE_NAME,
                       expose_tracebacks=False, clear_untrusted_proxy_headers=True)
    else:
        bottle.run(app, server=config.server, host=config.host, port=config.port, quiet=True)


###############################################################################
# Command line ################################################################
###############################################################################


def build_parser():
    parser = argparse.ArgumentParser(
        prog="model-service",
        description="Serve the scikit-learn models in a folder over HTTP (JSON in, JSON out).",
        epilog=f"Every option can also be set by an environment variable ({ENV_PREFIX}<OPTION>, "
               "for example MODEL_SERVICE_PORT=9000); a flag beats the environment, which beats the default.")
    defaults = Config()
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.metavar, default=None,
                            help=f"{setting.help} (env {setting.env}; default: "
                                 f"{getattr(defaults, setting.field)})")
    parser.add_argument("--version", action="version", version=f"{SERVICE_NAME} {__version__}")
    return parser


def main(argv=None, serve=serve):
    """Command line entry point; returns the exit code.  `serve` is injectable for tests."""
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        config = Config.load(flags)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(config.store):
        parser.error(f"model store {config.store!r} is not a folder (set --store or {ENV_PREFIX}STORE)")
    application = create_app(config=config)
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
# WSGI entry points ###########################################################
###############################################################################
# `waitress-serve service:app`, `gunicorn service:app`, mod_wsgi's
# `application`: the same object, configured from the environment.

if __name__ == "__main__":
    sys.exit(main())

app = application = create_app()
