"""Write ``tests/data/rerank_golden.npz``: the rankings of every re-ranking pipeline on the
fixed index of ``rerank_fixture.py``, as computed by the code of commit 0b54257 (before the
search pipeline was redesigned around one stage protocol).

Kept for the record; it only runs against that code::

    git worktree add /tmp/golden 0b54257
    cp -r tests/golden /tmp/golden/tests/
    cd /tmp/golden && PYTHONPATH=src:tests:tests/golden .venv/bin/python \
        tests/golden/make_rerank_golden.py tests/data/rerank_golden.npz
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import rerank_fixture as fx
from PIL import Image

from lookalike.images import file_hash
from lookalike.index import IndexStore, NewImage
from lookalike.local.conf import VerifyConf
from lookalike.local.sync import sync_local
from lookalike.search import Searcher


def build(root: Path) -> Path:
    paths = fx.write_files(root / "images")
    images = []
    for path in paths:
        data = path.read_bytes()
        st = path.stat()
        with Image.open(path) as img:
            w, h = img.size
        images.append(NewImage(str(path), file_hash(data), st.st_size, st.st_mtime, w, h))
    index = root / "index"
    with IndexStore.create(index, fx.DESCRIPTOR, fx.D) as store:
        store.add(images, fx.vectors())
        store.checkpoint()
        sync_local(store, VerifyConf(**fx.VERIFY), workers=0)
    return index


def main(out: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        index = build(Path(tmp))
        with Searcher(index, verify=VerifyConf(**fx.VERIFY)) as s:
            for pipeline in fx.PIPELINES:
                name = ",".join(pipeline) or "none"
                for k in fx.K_VALUES:
                    scores, ids, inliers = s.search_ids_verified(fx.ID_QUERIES, k, pipeline)
                    arrays[f"id|{name}|{k}|scores"] = scores
                    arrays[f"id|{name}|{k}|ids"] = ids
                    arrays[f"id|{name}|{k}|inliers"] = inliers
                    if "verify" in pipeline:
                        continue
                    stages, _ = s._stages(pipeline)
                    rows = []
                    for q in fx.vector_queries():
                        k_all = len(s.store) if k <= 0 else k
                        rows.append(s._rank(q[None], k_all, np.zeros((1, 1), np.float32), stages))
                    arrays[f"vector|{name}|{k}|scores"] = np.stack([r[0] for r in rows])
                    arrays[f"vector|{name}|{k}|ids"] = np.stack([r[1] for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {len(arrays)} arrays to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
