"""Look at search results: a static HTML page with one row of thumbnails per query.

The page is self-contained: thumbnails are small JPEGs written to ``thumbs/`` next to the
HTML and linked relatively, the CSS is inline, nothing is fetched from the network. Each
thumbnail links to its full-size image.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from lookalike.errors import ConfigError, ImageError
from lookalike.images import load_image
from lookalike.index.conf import display_path, fs_path_from_display

if TYPE_CHECKING:  # search imports torch and faiss; the page only reads the hits' fields
    from lookalike.search import Hit

logger = logging.getLogger(__name__)

Truth = Callable[[str, str], "bool | None"]  # (query path, result path) -> right, wrong, unknown

THUMBS_DIR = "thumbs"  # thumbnail folder, next to the HTML file
THUMB_QUALITY = 85  # JPEG quality of the thumbnails

_CSS = """
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
       color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { color: #555; margin: 0 0 16px; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 8px; border: 3px solid; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 10px; padding: 12px 0;
       border-bottom: 1px solid #ddd; }
.cell { flex: none; width: var(--px); }
.frame { box-sizing: border-box; width: var(--px); height: var(--px); display: flex;
         align-items: center; justify-content: center; background: #fff;
         border: 3px solid #e4e4e4; overflow: hidden; }
.frame a { display: flex; align-items: center; justify-content: center; width: 100%;
           height: 100%; }
.frame img { display: block; max-width: 100%; max-height: 100%; }
.query .frame, .legend .query { border-color: #3b6fd8; }
.right .frame, .legend .right { border-color: #1f9d3a; }
.wrong .frame, .legend .wrong { border-color: #d3302f; }
.placeholder { width: 100%; height: 100%; background: #bdbdbd; color: #555;
               display: flex; align-items: center; justify-content: center; }
.sep { flex: none; align-self: stretch; width: 2px; background: #ccc; margin: 0 4px; }
.cap { margin-top: 3px; font-variant-numeric: tabular-nums; }
.cap b { margin-right: 6px; }
.name { color: #666; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.none { color: #888; align-self: center; }
"""


def write_result_grid(
    out_html: Path,
    rows: Sequence[tuple[str | Path, Sequence[Hit]]],
    title: str = "lookalike results",
    thumb_px: int = 160,
    truth: Truth | None = None,
) -> Path:
    """Write a page showing each query beside its ranked results.

    One row per query: the query thumbnail, then one thumbnail per hit with its rank, score
    and file name. With ``truth``, a hit gets a green border when ``truth(query, hit.path)``
    is True and a red one when it is False (None: no verdict), and the header counts the
    queries whose first hit is right. Files that cannot be read get a grey placeholder.

    Args:
        out_html: the HTML file to write; ``thumbs/`` is created beside it.
        rows: ``(query path, hits)`` per query, hits best first.
        title: page title and heading.
        thumb_px: long side of the thumbnails, pixels.
        truth: judges a result for a query, both given as path strings.

    Returns:
        ``out_html``.

    Raises:
        ConfigError: ``thumb_px`` is not a positive integer.
    """
    if not isinstance(thumb_px, int) or thumb_px < 1:
        raise ConfigError(f"thumb_px must be a positive integer, got {thumb_px!r}")
    out_html = Path(out_html)
    thumbs = out_html.parent / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    made: dict[str, str | None] = {}  # source path -> thumbnail src (None: unreadable)

    def thumb(path: str) -> str | None:
        if path not in made:
            made[path] = _thumbnail(path, thumbs, thumb_px)
        return made[path]

    body: list[str] = []
    judged = right = 0
    for query, hits in rows:
        query = str(query)
        cells = [_cell(query, thumb(query), out_html.parent, "query", "query")]
        cells.append('<div class="sep"></div>')
        if not hits:
            cells.append('<div class="none">no results</div>')
        for hit in hits:
            verdict = truth(query, str(hit.path)) if truth is not None else None
            state = {True: "right", False: "wrong"}.get(verdict, "")
            path = str(hit.path)
            label, score = f"#{hit.rank}", _score(hit.score)
            cells.append(_cell(path, thumb(path), out_html.parent, state, label, score))
        if truth is not None and hits:
            verdict = truth(query, str(hits[0].path))
            judged += verdict is not None
            right += verdict is True
        body.append(f'<div class="row">{"".join(cells)}</div>')

    summary = f"{len(rows)} quer{'y' if len(rows) == 1 else 'ies'}"
    if judged:
        summary += f" · top-1 right for {right}/{judged} ({100.0 * right / judged:.0f}%)"
    legend = ""
    if truth is not None:
        legend = (
            '<p class="legend"><span class="query">query</span>'
            '<span class="right">right</span><span class="wrong">wrong</span></p>'
        )
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f'<body style="--px:{thumb_px}px">\n<h1>{html.escape(title)}</h1>\n'
        f'<p class="summary">{summary}</p>{legend}\n'
        + "\n".join(body)
        + ("" if rows else '<p class="none">No queries.</p>')
        + "\n</body></html>\n"
    )
    out_html.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%d rows, %d thumbnails)", out_html, len(rows), len(made))
    return out_html


def _thumbnail(path: str, thumbs: Path, thumb_px: int) -> str | None:
    """Write (or reuse) the thumbnail of ``path``; its ``src`` relative to the page, or None."""
    path = fs_path_from_display(path)  # an indexed name that is not UTF-8 is shown escaped
    try:
        st = os.stat(path)
    except OSError:
        logger.warning("no thumbnail for %s: the file cannot be read", path)
        return None
    # The name changes with the file's contents (size, mtime) and the thumbnail size, so a
    # re-rendered page never shows a stale thumbnail and several pages can share the folder.
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{thumb_px}"
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).stem)[:40]
    name = f"{stem}-{digest}.jpg"
    target = thumbs / name
    if not target.is_file():
        try:
            img = load_image(path, max_side=thumb_px)
        except ImageError as exc:
            logger.warning("no thumbnail for %s: %s", path, exc)
            return None
        tmp = target.with_suffix(".tmp")
        img.save(tmp, "JPEG", quality=THUMB_QUALITY)
        os.replace(tmp, target)
    return f"{THUMBS_DIR}/{name}"


def _cell(
    path: str, src: str | None, page_dir: Path, state: str, label: str, detail: str = ""
) -> str:
    """One thumbnail with a bold label and detail under it; grey placeholder when no ``src``."""
    esc = html.escape(display_path(path), quote=True)
    name = html.escape(Path(display_path(path)).name, quote=True)
    if src is None:
        inner = '<div class="placeholder">unreadable</div>'
    else:
        img = f'<img src="{html.escape(src, quote=True)}" alt="{name}" loading="lazy">'
        inner = f'<a href="{html.escape(_link(path, page_dir), quote=True)}">{img}</a>'
    cap = f"<b>{html.escape(label)}</b>{html.escape(detail)}"
    return (
        f'<div class="cell {state}" title="{esc}"><div class="frame">{inner}</div>'
        f'<div class="cap">{cap}</div><div class="name">{name}</div></div>'
    )


def _link(path: str, page_dir: Path) -> str:
    """``path`` relative to the page (as a URL path), or a file URI when there is none."""
    path = fs_path_from_display(path)
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(page_dir))
    except ValueError:  # another drive on Windows
        return Path(path).absolute().as_uri()
    return "/".join(quote(os.fsencode(part), safe="") for part in Path(rel).parts)


def _score(score: float) -> str:
    return f"{score:.3f}" if math.isfinite(score) else str(score)
