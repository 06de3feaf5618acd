"""Which settings a command runs with: the index's own, unless the caller asks for others.

Re-running ``lookalike index`` (or ``eval``) on an existing index needs no option repeated:
the descriptor and the structure it records are used, and asking for other descriptor
settings is refused by the index with a message naming each difference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lookalike.extract import ExtractConf, get_preset
from lookalike.index import IndexConf, get_index_conf
from lookalike.index.manifest import MANIFEST_NAME, Manifest, read_manifest

FROM_INDEX = "(from index)"  # the preset name reported for an index's own settings
TRAINED = "(trained model)"  # the preset name reported for --model MODEL_DIR


@dataclass(frozen=True)
class Settings:
    """The settings a run uses."""

    preset: str  # the extract preset's name, or FROM_INDEX
    extract: ExtractConf
    index: IndexConf


def existing_manifest(index_dir: str | Path | None) -> Manifest | None:
    """The manifest of an existing index, None where there is none yet."""
    if index_dir is None:
        return None
    root = Path(index_dir).expanduser()
    if not (root / MANIFEST_NAME).exists():
        return None
    return read_manifest(root)


def resolve_settings(
    index_dir: str | Path | None,
    preset: str | None = None,
    *,
    model: str | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    pooling: str | None = None,
    factory: str | None = None,
    index_preset: str | None = None,
    backend: str | None = None,
    memory_budget: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    milvus_uri: str | None = None,
) -> Settings:
    """The descriptor and index settings for a run on ``index_dir``.

    Descriptor: the index's own unless ``preset`` or a descriptor option is given (then that
    preset, default ``default``, with the options). Structure: ``factory`` / ``index_preset``
    (plus ``backend``, and ``memory_budget`` for ``auto``), else the index's own, else the
    default. ``device`` and ``workers``
    only change how the run goes.

    Raises:
        IndexStateError: the index's settings are not understood; ConfigError: bad names.
    """
    manifest = existing_manifest(index_dir)
    overrides: dict[str, object] = {
        k: v
        for k, v in (
            ("model", model),
            ("weights", weights),
            ("image_size", image_size),
            ("pooling", pooling),
        )
        if v is not None
    }
    if "weights" in overrides:
        overrides["weights"] = str(Path(str(overrides["weights"])).expanduser().resolve())
    if model is not None and _is_model_dir(model):
        name, conf = TRAINED, _trained_conf(model, preset, overrides)
    elif preset is None and not overrides and manifest is not None:
        name, conf = FROM_INDEX, ExtractConf.for_index(manifest)  # its query defaults too
    else:
        name = preset or "default"
        conf = get_preset(name).replace(**overrides) if overrides else get_preset(name)
    runtime = {k: v for k, v in (("device", device), ("workers", workers)) if v is not None}
    conf = conf.replace(**runtime) if runtime else conf
    index_conf = _index_conf(manifest, factory, index_preset, backend)
    if memory_budget is not None:
        index_conf = dataclasses.replace(index_conf, memory_budget=int(memory_budget))
    if milvus_uri is not None:
        index_conf = _with_uri(manifest, index_conf, milvus_uri)
    return Settings(name, conf, index_conf)


def _with_uri(manifest: Manifest | None, conf: IndexConf, uri: str) -> IndexConf:
    """``conf`` keeping its vectors at the Milvus server ``uri`` (a new index only)."""
    from lookalike.errors import ConfigError

    if manifest is not None and manifest.index.uri != uri:
        where = manifest.index.uri or "Milvus Lite inside it"
        raise ConfigError(
            f"this index keeps its vectors at {where}; --milvus-uri cannot move it (drop the "
            "option, or build a new index)"
        )
    return dataclasses.replace(conf, uri=uri)


def _is_model_dir(model: str) -> bool:
    from lookalike.train.model_dir import is_model_dir

    return is_model_dir(model)


def _trained_conf(model: str, preset: str | None, overrides: dict) -> ExtractConf:
    """The descriptor of a trained model directory; only the image size may be changed."""
    from lookalike.errors import ConfigError
    from lookalike.train.model_dir import extract_conf

    refused = sorted(set(overrides) - {"model", "image_size"})
    if refused or preset is not None:
        given = ", ".join(
            [*(f"--{k.replace('_', '-')}" for k in refused), *(["--preset"] * bool(preset))]
        )
        raise ConfigError(
            f"--model {model} is a trained model, which fixes its own descriptor: drop {given}"
        )
    size = overrides.get("image_size")
    return extract_conf(model, **({} if size is None else {"image_size": size}))


def _index_conf(
    manifest: Manifest | None, factory: str | None, preset: str | None, backend: str | None
) -> IndexConf:
    if factory is not None:
        conf = IndexConf(factory=factory)
    elif preset is not None:
        conf = get_index_conf(preset)
    elif manifest is not None:
        conf = manifest.index
    else:
        conf = IndexConf()
    if backend is not None and backend != conf.backend:
        conf = IndexConf(conf.factory, conf.nprobe, conf.ef_search, backend)
    return conf


__all__ = ["FROM_INDEX", "TRAINED", "Settings", "existing_manifest", "resolve_settings"]
