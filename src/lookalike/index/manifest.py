"""The self-description of an index directory: ``manifest.json``, one typed :class:`Manifest`.

The manifest holds every setting an index records, in one place, read and validated once
when the index is opened:

* ``descriptor``: the descriptor settings the vectors were computed with
  (:meth:`lookalike.extract.ExtractConf.descriptor`), compared whenever the index is
  reopened with settings;
* ``model``: the backbone's identity, with a content hash of its weight tensors, so that a
  checkpoint re-trained into the same path is noticed;
* ``query``: the query-time defaults (rotations searched and their score penalty);
* ``index``: the vector backend and its structure (:class:`~lookalike.index.conf.IndexConf`);
* ``local``: the local features the index keeps in step (``index --local``), or null;
* ``dba``: the database-side augmentation kept in ``dba.npz``, or null;
* and the state readers start from: the whitening (``whitening.epoch`` grows whenever it
  changes, once before and once after ``whitening.npz`` is replaced, so that no reader labels
  one whitening with the epoch of another; a reader compares it before and after loading) and
  the backend checkpoint covering the change log up to ``checkpoint.seq``.

The files the manifest names carry their digest (``sha``: blake2b-256, hex; optional, absent
in indexes written before digests were kept): the whitening, the checkpoint and the DBA are
checked against it when loaded (:mod:`lookalike.index.check` checks them all).

It is written last when an index is created, so a directory without a manifest is not an
index, and it is always replaced atomically (:func:`lookalike.storage.atomic_write`).

Format 1 kept the query defaults and the local-feature settings in ``meta.sqlite`` and knew
no weights hash; :mod:`lookalike.index.upgrade` turns it into format 2 (in memory for a
reader, on disk for a writer, see :meth:`lookalike.index.IndexStore.open`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.confined import read_bytes
from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.conf import IndexConf
from lookalike.storage import atomic_write_bytes

if TYPE_CHECKING:
    from lookalike.local.conf import VerifyConf

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "lookalike-index"
FORMAT_VERSION = 2
REBUILD = "rebuild it with `lookalike index DIR --index NEW_DIR`"


def now_iso() -> str:
    """Current UTC time, ISO 8601 with milliseconds, e.g. ``2024-05-01T12:00:00.000+00:00``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the stored data depends on."""
    import faiss
    import numpy as np

    import lookalike

    return {
        "lookalike": lookalike.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def normalise_descriptor(descriptor: dict) -> dict:
    """The descriptor config as it will read back from JSON (tuples become lists, ...)."""
    if not isinstance(descriptor, dict):
        raise ConfigError(f"descriptor config must be a dict, got {type(descriptor).__name__}")
    try:
        return json.loads(json.dumps(descriptor, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"descriptor config must be JSON-serialisable: {error}") from None


@dataclass(frozen=True)
class ModelIdentity:
    """Which backbone, with which weights, made the vectors."""

    name: str | None  # MODELS key or timm name (the descriptor's ``model``)
    weights: str | None = None  # local checkpoint path; None: packaged or hub weights
    weights_hash: str | None = None  # content hash of the weight tensors
    #   (Backbone.weights_id); None: not recorded yet (a format 1 index), recorded on first use


MIN_CROP_SIZE = 0.2  # the smallest regional query crop: a 6 x 6 grid of views


def check_crops(sizes: object, what: str = "query crops") -> tuple[float, ...]:
    """Regional query crop sizes (fractions of the query's sides) checked: ``ValueError``
    unless each is in [MIN_CROP_SIZE, 1)."""
    try:
        values = tuple(float(s) for s in sizes)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be crop sizes, got {sizes!r}") from None
    if any(not MIN_CROP_SIZE <= s < 1 for s in values):
        raise ValueError(
            f"{what} must be fractions of the query's sides in [{MIN_CROP_SIZE}, 1), e.g. "
            f"0.7, 0.5; got {list(values)}"
        )
    return values


@dataclass(frozen=True)
class QueryDefaults:
    """How queries are searched unless a call says otherwise."""

    rotations: tuple[int, ...] = (0,)  # query angles (degrees) searched; (0,) is upright only
    rotation_penalty: float = 0.0  # subtracted from the scores of rotated views; 0 is off
    crops: tuple[float, ...] = ()  # regional query crop sizes (ExtractConf.query_crops); () off
    crop_penalty: float = 0.05  # subtracted from the scores of crop views (as ExtractConf's)

    def to_dict(self) -> dict[str, Any]:
        """The ``query`` section of ``manifest.json``."""
        return {
            "rotations": list(self.rotations),
            "rotation_penalty": self.rotation_penalty,
            "crops": list(self.crops),
            "crop_penalty": self.crop_penalty,
        }


@dataclass(frozen=True)
class WhiteningState:
    """Whether a whitening is stored (``whitening.npz``), and its epoch."""

    learned: bool = False
    dim_out: int | None = None  # its output dimension, the index space
    epoch: int = 0  # grows at every change, to an odd number before the file is replaced
    #   and to the next even one after; readers compare it before and after loading
    sha: str | None = None  # digest of whitening.npz; None: not recorded (older index)

    @property
    def changing(self) -> bool:
        """Whether a change of the file is under way (or was interrupted by a crash)."""
        return self.epoch % 2 == 1


@dataclass(frozen=True)
class CheckpointRef:
    """The backend checkpoint readers start from."""

    file: str | None = None  # file name in the index directory; None: replay from nothing
    seq: int = 0  # the newest op of the change log it covers
    fallback: bool = False  # it holds the exact stand-in of a structure not yet trained
    sha: str | None = None  # digest of the file; None: not recorded (older index)


@dataclass(frozen=True)
class DBASettings:
    """The database-side augmentation the index keeps current in ``dba.npz``."""

    k: int = 5  # neighbours per augmented vector, the image itself included
    alpha: float = 1.0  # neighbour weight exponent
    sha: str | None = field(default=None, compare=False)  # digest of dba.npz as last saved;
    #   None: not recorded. Not compared: two DBASettings are equal when their settings are

    def same(self, k: int, alpha: float) -> bool:
        """Whether these are the settings ``(k, alpha)``, whatever the file's digest."""
        return (self.k, self.alpha) == (int(k), float(alpha))


@dataclass(frozen=True)
class Manifest:
    """Everything an index records about itself (see the module docstring)."""

    descriptor: dict[str, Any]
    dim: int  # raw descriptor dimension D
    model: ModelIdentity
    index: IndexConf = IndexConf()
    query: QueryDefaults = QueryDefaults()
    whitening: WhiteningState = WhiteningState()
    checkpoint: CheckpointRef = CheckpointRef()
    local: VerifyConf | None = None  # the local features kept in step, or None
    dba: DBASettings | None = None  # the DBA kept in dba.npz, or None
    created: str = ""
    updated: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION  # as read; 1 until upgraded

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "descriptor": self.descriptor,
            "dim": self.dim,
            "model": dataclasses.asdict(self.model),
            "index": self.index.to_dict(),
            "query": self.query.to_dict(),
            "whitening": _with_sha(self.whitening),
            "checkpoint": _with_sha(self.checkpoint),
            "local": None if self.local is None else self.local.to_dict(),
            "dba": None if self.dba is None else _with_sha(self.dba),
            "created": self.created,
            "updated": self.updated,
            "versions": dict(self.versions),
        }


def _with_sha(section: object) -> dict[str, Any]:
    """A section as JSON; ``sha`` only when recorded (format 2 readers before it ignore it)."""
    out = dataclasses.asdict(section)  # type: ignore[call-overload]
    if out.get("sha") is None:
        out.pop("sha", None)
    return out


def new_manifest(
    descriptor: dict,
    dim: int,
    conf: IndexConf,
    query: QueryDefaults = QueryDefaults(),
    weights_hash: str | None = None,
) -> Manifest:
    """The manifest of a freshly created, empty index."""
    descriptor = normalise_descriptor(descriptor)
    for key in ("model", "weights"):
        if not isinstance(descriptor.get(key), str | None):
            raise ConfigError(
                f"descriptor {key} must be a string or absent, got {descriptor[key]!r}"
            )
    stamp = now_iso()
    model = ModelIdentity(descriptor.get("model"), descriptor.get("weights"), weights_hash)
    return Manifest(descriptor, int(dim), model, conf, query, created=stamp, updated=stamp)


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Stamp ``updated`` and the versions, replace ``root/manifest.json`` atomically; returns
    the manifest as written."""
    manifest = manifest.replace(
        updated=now_iso(), versions=library_versions(), format_version=FORMAT_VERSION
    )
    data = json.dumps(manifest.to_json(), indent=2).encode("utf-8") + b"\n"
    atomic_write_bytes(root / MANIFEST_NAME, data)
    return manifest


def _create_hint(root: Path) -> str:
    return f"create one with `lookalike index DIR --index {root}`"


def read_manifest(root: Path) -> Manifest:
    """Load and validate ``root/manifest.json``.

    A format 1 manifest reads with default query settings, no local features and no DBA:
    :func:`lookalike.index.upgrade.upgrade_v1` completes it from where format 1 kept them.

    Raises:
        IndexStateError: ``root`` is missing, a file, not an index, damaged or too new.
    """
    if not root.exists():
        raise IndexStateError(f"index directory {root} does not exist; {_create_hint(root)}")
    if not root.is_dir():
        raise IndexStateError(f"{root} is a file, not an index directory; {_create_hint(root)}")
    path = root / MANIFEST_NAME
    try:
        data = json.loads(read_bytes(path)[0].decode("utf-8"))
    except FileNotFoundError:
        raise IndexStateError(
            f"{root} is not a lookalike index (no {MANIFEST_NAME}); {_create_hint(root)}"
        ) from None
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise IndexStateError(
            f"{path} is unreadable ({type(error).__name__}: {error}); the index is damaged, "
            f"{REBUILD}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise IndexStateError(
            f"{root} is not a lookalike index ({MANIFEST_NAME} has format {found!r}, expected "
            f"{FORMAT!r}); {_create_hint(root)}"
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IndexStateError(
            f"{path} has no valid format_version; the index is damaged, {REBUILD}"
        )
    if version > FORMAT_VERSION:
        raise IndexStateError(
            f"index {root} has format version {version}, this lookalike reads up to "
            f"{FORMAT_VERSION}; upgrade lookalike (pip install -U lookalike)"
        )
    try:
        return _parse(data, version)
    except (KeyError, TypeError, ValueError) as error:  # ConfigError is a ValueError
        what = error.args[0] if isinstance(error, KeyError) else error
        reason = f"no {what!r} entry" if isinstance(error, KeyError) else f"{what}"
        raise IndexStateError(f"{path} is damaged ({reason}); {REBUILD}") from None


def _int(value: object, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _opt_str(value: object, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what} must be a string or null, got {value!r}")
    return value


_SHA = re.compile(r"[0-9a-f]{64}")


def _sha(value: object, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not _SHA.fullmatch(value)):
        raise ValueError(f"{what} must be a blake2b-256 hex digest or absent, got {value!r}")
    return value


def _section(data: dict, key: str, prefix: str = "") -> dict:
    """``data[key]``, which must be an object (``KeyError`` naming ``prefix + key``)."""
    if key not in data:
        raise KeyError(prefix + key)
    value = data[key]
    if not isinstance(value, dict):
        raise ValueError(f"{prefix}{key} must be an object, got {type(value).__name__}")
    return value


def _required(data: dict, key: str, prefix: str) -> object:
    if key not in data:
        raise KeyError(prefix + key)
    return data[key]


# What writer.checkpoint_name() writes: <backend>-<seq>.index (never a path).
_CHECKPOINT_FILE = re.compile(r"[a-z0-9_]+-[0-9]+\.index")


def _parse(data: dict, version: int) -> Manifest:
    """A :class:`Manifest` from its JSON, every field checked."""
    descriptor = _section(data, "descriptor")
    name = _opt_str(descriptor.get("model"), "descriptor.model")
    weights = _opt_str(descriptor.get("weights"), "descriptor.weights")
    dim = _int(_required(data, "dim", ""), "dim", low=1)
    whitening = _whitening(data.get("whitening", {}))
    index = IndexConf.from_dict(_section(data, "index"))
    from lookalike.index.backends import validate_conf  # imports faiss: after the cheap checks

    validate_conf(index, whitening.dim_out if whitening.dim_out is not None else dim)
    checkpoint = _checkpoint(_section(data, "checkpoint"))
    model = ModelIdentity(name, weights)
    query, local, dba = QueryDefaults(), None, None
    if version >= 2:
        m = _section(data, "model")
        model = ModelIdentity(
            _opt_str(m.get("name"), "model.name"),
            _opt_str(m.get("weights"), "model.weights"),
            _opt_str(m.get("weights_hash"), "model.weights_hash"),
        )
        if (model.name, model.weights) != (name, weights):
            raise ValueError("model disagrees with the descriptor's model and weights")
        query = parse_query(_section(data, "query"))
        local = parse_local(data.get("local"))
        if data.get("dba") is not None:
            d = _section(data, "dba")
            dba = DBASettings(
                _int(_required(d, "k", "dba."), "dba.k", 1),
                _number(_required(d, "alpha", "dba."), "dba.alpha"),
                _sha(d.get("sha"), "dba.sha"),
            )
    versions = data.get("versions", {})
    if not isinstance(versions, dict):
        raise ValueError(f"versions must be an object, got {type(versions).__name__}")
    return Manifest(
        descriptor=descriptor,
        dim=dim,
        model=model,
        index=index,
        query=query,
        whitening=whitening,
        checkpoint=checkpoint,
        local=local,
        dba=dba,
        created=_opt_str(data.get("created", ""), "created") or "",
        updated=_opt_str(data.get("updated", ""), "updated") or "",
        versions={str(k): str(v) for k, v in versions.items()},
        format_version=version,
    )


def _whitening(w: object) -> WhiteningState:
    if not isinstance(w, dict):
        raise ValueError(f"whitening must be an object, got {type(w).__name__}")
    dim_out = w.get("dim_out")
    return WhiteningState(
        _bool(w.get("learned", False), "whitening.learned"),
        None if dim_out is None else _int(dim_out, "whitening.dim_out", 1),
        _int(w.get("epoch", 0), "whitening.epoch"),
        _sha(w.get("sha"), "whitening.sha"),
    )


def _checkpoint(c: dict) -> CheckpointRef:
    checkpoint = CheckpointRef(
        _opt_str(c.get("file"), "checkpoint.file"),
        _int(c.get("seq", 0), "checkpoint.seq"),
        _bool(c.get("fallback", False), "checkpoint.fallback"),
        _sha(c.get("sha"), "checkpoint.sha"),
    )
    if checkpoint.file is not None and not _CHECKPOINT_FILE.fullmatch(checkpoint.file):
        raise ValueError(
            f"checkpoint.file must be a checkpoint file name like 'faiss-12.index', got "
            f"{checkpoint.file!r}"
        )
    return checkpoint


def parse_query(q: dict) -> QueryDefaults:
    """The ``query`` section (``ValueError`` saying which value is wrong)."""
    rotations = q.get("rotations", [0])
    if not isinstance(rotations, list) or not rotations:
        raise ValueError(f"query.rotations must be a list of angles, got {rotations!r}")
    angles = tuple(_int(r, "query.rotations") for r in rotations)
    if any(a % 90 for a in angles):
        raise ValueError(f"query.rotations must be multiples of 90, got {list(angles)}")
    crops = q.get("crops", [])  # absent before regional queries: none
    if not isinstance(crops, list):
        raise ValueError(f"query.crops must be a list of crop sizes, got {crops!r}")
    sizes = check_crops([_number(c, "query.crops") for c in crops], "query.crops")
    return QueryDefaults(
        angles,
        _number(q.get("rotation_penalty", 0.0), "query.rotation_penalty"),
        sizes,
        _number(q.get("crop_penalty", QueryDefaults.crop_penalty), "query.crop_penalty"),
    )


def parse_local(value: object) -> VerifyConf | None:
    """The ``local`` section: a :class:`VerifyConf`, or None."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"local must be an object or null, got {type(value).__name__}")
    from lookalike.local.conf import VerifyConf  # OpenCV: only for indexes that have them

    return VerifyConf.from_dict(value)


def _differences(a: object, b: object, name: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, a's value, b's value)`` where two settings differ; dicts on both sides
    are compared key by key, anything else (``null`` against a dict, say) as a whole."""
    if isinstance(a, dict) and isinstance(b, dict) and (a or b):
        out = []
        for key in sorted(a.keys() | b.keys()):
            sub = f"{name}.{key}" if name else str(key)
            out += _differences(a.get(key, _MISSING), b.get(key, _MISSING), sub)
        return out
    return [] if a == b else [(name, a, b)]


_MISSING = object()


def _show(value: object) -> str:
    if value is _MISSING:
        return "<unset>"
    return value if isinstance(value, str) else json.dumps(value)


def incompatibility(root: Path, built: dict, requested: dict) -> str | None:
    """The message naming every setting that differs between two flat-ish dicts, or None.

    Args:
        root: the index directory, for the message.
        built: settings recorded in the manifest (descriptor keys plus ``factory``/``dim``).
        requested: the same keys as the caller asks for them now.
    """
    diff = _differences(built, requested)
    if not diff:
        return None
    have = ", ".join(f"{k}={_show(a)}" for k, a, _ in diff)
    want = ", ".join(f"{k}={_show(b)}" for k, _, b in diff)
    return (
        f"index {root} was built with {have}; the requested settings have {want}. "
        "Use the same preset or a new --index directory."
    )


def weights_mismatch(root: Path, manifest: Manifest, weights_hash: str) -> str | None:
    """The message when a model's weights are not those the index was built with, or None
    (also when the index has not recorded them yet)."""
    recorded = manifest.model.weights_hash
    if recorded is None or recorded == weights_hash:
        return None
    where = manifest.model.weights or "its packaged or hub weights"
    return (
        f"the weights of model {manifest.model.name} ({where}) are not those index {root} was "
        f"built with (content hash {weights_hash}, the index has {recorded}): its vectors "
        f"would not match new ones. Restore those weights, or {REBUILD}"
    )
