"""Every named preset of every stage, in one JSON-ready table: what ``lookalike presets``
lists.

=========  ====================================================  ===================
table      what it selects                                       chosen with
=========  ====================================================  ===================
extract    descriptor settings (``--preset``)                    ``index``, ``eval``
index      vector backend and structure (``--index-preset``)     ``index``, ``eval``
rerank     re-ranking stages (``--rerank a,b,...``)              ``search``, ...
verify     local features and matching (``index --local NAME``)  ``index``, ``search``
train      training settings (``train --preset``)                ``train``
loss       metric-learning losses (``train --loss``)             ``train``
=========  ====================================================  ===================
"""

from __future__ import annotations

import dataclasses
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def presets() -> dict[str, dict[str, Any]]:
    """``{table: {name: settings}}`` for the tables above (settings as plain JSON)."""
    from lookalike.extract import EXTRACT_PRESETS
    from lookalike.index import INDEX_PRESETS
    from lookalike.local.conf import VERIFY_PRESETS
    from lookalike.rerank import ASMK, DBA_PRESETS, QE_PRESETS, VERIFY
    from lookalike.rerank.asmk_stage import AsmkConf
    from lookalike.train.conf import TRAIN_PRESETS
    from lookalike.train.losses import LOSS_PRESETS

    rerank: dict[str, Any] = {name: {"qe": _plain(c)} for name, c in QE_PRESETS.items()}
    rerank.update({name: {"dba": _plain(c)} for name, c in DBA_PRESETS.items()})
    rerank[ASMK] = {"asmk": _plain(AsmkConf())}
    rerank[VERIFY] = {"verify": "local features + MAGSAC++ on the top `budget`, always last"}
    return {
        "extract": {name: _plain(c) for name, c in EXTRACT_PRESETS.items()},
        "index": {name: c.to_dict() for name, c in INDEX_PRESETS.items()},
        "rerank": rerank,
        "verify": {name: _plain(c) for name, c in VERIFY_PRESETS.items()},
        "train": {name: c.to_dict() for name, c in TRAIN_PRESETS.items()},
        "loss": {name: _plain(c) for name, c in LOSS_PRESETS.items()},
    }
