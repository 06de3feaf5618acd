"""The self-description of an index directory: ``manifest.json``.

The manifest names the descriptor settings the vectors were computed with, the faiss
structure, the whitening state, the library versions and the faiss checkpoint that readers
start from. It is written last when an index is created, so an index directory without a
manifest is not an index, and it is always replaced atomically.

``whitening.epoch`` grows by one whenever the whitening changes. A reader compares it before
and after loading to detect a whitening swapped under its feet (see ``loader.py``).
"""

from __future__ import annotations

import json
import logging
import platform
from datetime import UTC, datetime
from pathlib import Path

from lookalike.errors import ConfigError, IndexStateError
from lookalike.index.conf import IndexConf
from lookalike.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "lookalike-index"
FORMAT_VERSION = 1


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


def new_manifest(descriptor: dict, dim: int, conf: IndexConf) -> dict:
    """The manifest of a freshly created, empty index."""
    stamp = now_iso()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "descriptor": normalise_descriptor(descriptor),
        "dim": int(dim),
        "index": conf.to_dict(),
        "whitening": {"learned": False, "dim_out": None, "epoch": 0},
        "versions": library_versions(),
        "created": stamp,
        "updated": stamp,
        "checkpoint": {"file": None, "seq": 0, "fallback": False},
    }


def write_manifest(root: Path, manifest: dict) -> None:
    """Stamp ``updated`` and the versions, then replace ``root/manifest.json`` atomically."""
    manifest["updated"] = now_iso()
    manifest["versions"] = library_versions()
    data = json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8") + b"\n"
    atomic_write_bytes(root / MANIFEST_NAME, data)


def _create_hint(root: Path) -> str:
    return f"create one with `lookalike index DIR --index {root}`"


def read_manifest(root: Path) -> dict:
    """Load and validate ``root/manifest.json``.

    Raises:
        IndexStateError: ``root`` is missing, a file, not an index, damaged or too new.
    """
    if not root.exists():
        raise IndexStateError(f"index directory {root} does not exist; {_create_hint(root)}")
    if not root.is_dir():
        raise IndexStateError(f"{root} is a file, not an index directory; {_create_hint(root)}")
    path = root / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IndexStateError(
            f"{root} is not a lookalike index (no {MANIFEST_NAME}); {_create_hint(root)}"
        ) from None
    try:
        manifest = json.loads(text)
    except ValueError as error:
        raise IndexStateError(
            f"{path} is not valid JSON ({error}); the index is damaged, rebuild it into a new "
            "--index directory"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IndexStateError(
            f"{root} is not a lookalike index ({MANIFEST_NAME} has format {found!r}, expected "
            f"{FORMAT!r}); {_create_hint(root)}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexStateError(
            f"index {root} has format version {version}, this lookalike reads up to "
            f"{FORMAT_VERSION}; upgrade lookalike (pip install -U lookalike)"
        )
    for key in ("dim", "descriptor", "index", "checkpoint"):
        if key not in manifest:
            raise IndexStateError(
                f"{path} has no {key!r} entry; the index is damaged, rebuild it into a new "
                "--index directory"
            )
    manifest.setdefault("whitening", {"learned": False, "dim_out": None, "epoch": 0})
    manifest["whitening"].setdefault("epoch", 0)
    manifest["checkpoint"].setdefault("fallback", False)
    return manifest


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


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
    a, b = _flatten(built), _flatten(requested)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k, _MISSING) != b.get(k, _MISSING)]
    if not keys:
        return None
    have = ", ".join(f"{k}={_show(a.get(k, _MISSING))}" for k in keys)
    want = ", ".join(f"{k}={_show(b.get(k, _MISSING))}" for k in keys)
    return (
        f"index {root} was built with {have}; the requested settings have {want}. "
        "Use the same preset or a new --index directory."
    )
