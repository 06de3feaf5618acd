"""End-to-end demo on the sample photos bundled with scikit-image and scikit-learn.

Writes the photos to ``<out>/collection/``, edited copies of them (crop, rotations, scale,
colour shift, strong JPEG compression) to ``<out>/queries/``, indexes the collection, searches
with every copy, prints whether each one finds its original and writes ``<out>/results.html``.
Runs offline (only images shipped inside the packages are used), in about 40 s on two CPU
cores. Re-running it re-syncs the existing index::

    python -m lookalike.demo [OUT_DIR] [-k 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageEnhance
from rich.console import Console
from rich.table import Table

from lookalike.errors import ConfigError, LookalikeError

if TYPE_CHECKING:
    from lookalike.indexing import IndexReport

logger = logging.getLogger(__name__)

# skimage.data images that ship inside the wheel (the others are downloaded with pooch).
SKIMAGE_IMAGES: dict[str, str] = {
    "astronaut": "astronaut",
    "camera": "camera",
    "chelsea": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "horse": "horse",
    "hubble_deep_field": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",  # returns (left, right, disparity); left is kept
    "page": "page",
    "rocket": "rocket",
}
ORIGINAL_QUALITY = 95  # JPEG quality of the collection and of most queries
LOW_QUALITY = 30  # JPEG quality of the "jpeg30" queries
SEARCH_CHUNK = 10  # queries searched between two progress lines


def _crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.crop((round(0.10 * w), round(0.15 * h), round(0.80 * w), round(0.90 * h)))


def _rotate(img: Image.Image) -> Image.Image:
    return img.rotate(12, resample=Image.Resampling.BICUBIC, expand=True)


def _rotate90(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.ROTATE_90)


def _scale(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)


def _colour(img: Image.Image) -> Image.Image:
    """Hue turned by 1/6 of the circle, more saturation, darker and flatter."""
    hsv = np.array(img.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + 43) % 256
    img = Image.fromarray(hsv, "HSV").convert("RGB")
    img = ImageEnhance.Color(img).enhance(1.4)
    img = ImageEnhance.Brightness(img).enhance(0.8)
    return ImageEnhance.Contrast(img).enhance(0.8)


def _same(img: Image.Image) -> Image.Image:
    return img


# name -> (edit, JPEG quality the query is saved with)
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {
    "crop": (_crop, ORIGINAL_QUALITY),  # 70% x 75% window off the centre
    "rot12": (_rotate, ORIGINAL_QUALITY),  # 12 degrees, canvas expanded, black corners
    "rot90": (_rotate90, ORIGINAL_QUALITY),  # a quarter turn counter-clockwise
    "scale50": (_scale, ORIGINAL_QUALITY),  # half the width and height
    "colour": (_colour, ORIGINAL_QUALITY),  # hue, saturation, brightness, contrast
    "jpeg30": (_same, LOW_QUALITY),  # re-compressed at quality 30
}


@dataclass
class QueryResult:
    """One demo query and what the search returned for it."""

    path: Path  # the query file
    original: str  # stem of the collection image it was made from
    transform: str  # TRANSFORMS key
    hits: list  # lookalike.search.Hit, best first
    correct: bool  # the first hit is the original


@dataclass
class DemoResult:
    """What :func:`run_demo` did."""

    out_dir: Path
    html: Path  # the results page
    originals: list[str]  # collection image stems
    queries: list[QueryResult] = field(default_factory=list)
    report: IndexReport | None = None  # what indexing the collection did
    seconds: float = 0.0  # wall time of the whole run
    match_png: Path | None = None  # the inlier matches of one query and its top result
    served: dict | None = None  # the top result of one query searched over HTTP
    page: bool = False  # the service's web page answered at /

    @property
    def accuracy(self) -> float:
        """Fraction of queries whose first hit is their original (0 without queries)."""
        return sum(q.correct for q in self.queries) / len(self.queries) if self.queries else 0.0

    def accuracy_by_transform(self) -> dict[str, float]:
        out: dict[str, list[bool]] = {}
        for q in self.queries:
            out.setdefault(q.transform, []).append(q.correct)
        return {t: sum(v) / len(v) for t, v in out.items()}


def original_of(path: str | Path) -> str:
    """The collection stem a query was made from: ``chelsea__crop.jpg`` -> ``chelsea``."""
    return Path(path).stem.split("__", 1)[0]


def is_match(query: str | Path, result: str | Path) -> bool:
    """Ground truth of the demo: the result is the image the query was made from."""
    return original_of(query) == Path(result).stem


def _to_rgb(arr: np.ndarray) -> Image.Image:
    """A skimage / sklearn array (bool, gray, RGB or RGBA) as an RGB image."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


def sample_images() -> dict[str, Image.Image]:
    """The bundled sample photos that load offline, by name; the others are skipped.

    Raises:
        ConfigError: scikit-image or scikit-learn is not installed.
    """
    try:
        from skimage import data as skdata
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ConfigError(
            f"the demo needs scikit-image and scikit-learn ({exc}); pip install 'lookalike[demo]'"
        ) from exc
    out: dict[str, Image.Image] = {}
    for name, loader in SKIMAGE_IMAGES.items():
        try:
            arr = getattr(skdata, loader)()
            out[name] = _to_rgb(arr[0] if isinstance(arr, tuple) else arr)
        except Exception as exc:  # a missing or not-bundled file must not stop the demo
            logger.warning("skipping skimage.data.%s: %s", loader, exc)
    try:
        bunch = load_sample_images()
        for filename, arr in zip(bunch.filenames, bunch.images, strict=True):
            out[Path(filename).stem] = _to_rgb(arr)
    except Exception as exc:
        logger.warning("skipping sklearn sample images: %s", exc)
    return out


def _write_jpeg(img: Image.Image, path: Path, quality: int) -> bool:
    """Save as JPEG unless the file already holds the same bytes; True when written.

    Leaving identical files alone keeps their mtime, so a re-run finds the index in sync.
    """
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def make_dataset(out_dir: Path, edits_per_image: int = 3) -> tuple[list[Path], list[Path]]:
    """Write the collection and the edited copies; their paths, sorted.

    Image ``i`` (in name order) gets ``edits_per_image`` consecutive edits of ``TRANSFORMS``
    starting at ``i * edits_per_image``, so every edit is used about equally often. Query
    files of an earlier run that are not part of this one are deleted.
    """
    if not 1 <= edits_per_image <= len(TRANSFORMS):
        raise ConfigError(f"edits_per_image must be in 1..{len(TRANSFORMS)}, got {edits_per_image}")
    originals = sample_images()
    if len(originals) < 2:
        raise LookalikeError(
            f"only {len(originals)} sample images could be loaded; reinstall scikit-image "
            "and scikit-learn (their bundled images are used)"
        )
    collection, queries = out_dir / "collection", out_dir / "queries"
    collection.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    names = list(TRANSFORMS)
    coll_paths, query_paths = [], []
    for i, (name, img) in enumerate(sorted(originals.items())):
        path = collection / f"{name}.jpg"
        _write_jpeg(img, path, ORIGINAL_QUALITY)
        coll_paths.append(path)
        for j in range(edits_per_image):
            t = names[(i * edits_per_image + j) % len(names)]
            edit, quality = TRANSFORMS[t]
            qpath = queries / f"{name}__{t}.jpg"
            _write_jpeg(edit(img), qpath, quality)
            query_paths.append(qpath)
    for stale in set(queries.glob("*__*.jpg")) - set(query_paths):
        stale.unlink()
    return coll_paths, query_paths


def run_demo(
    out_dir: Path = Path("demo_out"), k: int = 5, console: Console | None = None
) -> DemoResult:
    """Build the demo collection and queries, index, search, print, write the HTML page.

    Args:
        out_dir: working folder (collection/, queries/, index/, results.html, thumbs/).
        k: results per query.
        console: where progress and results are printed; a default console when None.

    Raises:
        LookalikeError: the sample images cannot be loaded or the index in ``out_dir`` was
            built with other settings.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    # Imported here so that importing the demo (and its helpers) does not load torch.
    from lookalike.extract import EXTRACT_PRESETS, Extractor
    from lookalike.indexing import index_folder
    from lookalike.search import Searcher
    from lookalike.viz import write_result_grid

    console = console or Console()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    console.print(f"[bold]lookalike demo[/] in {out_dir.resolve()}")

    console.print("writing sample images and their edited copies ...")
    coll_paths, query_paths = make_dataset(out_dir)
    console.print(
        f"  {len(coll_paths)} images in {out_dir / 'collection'}, {len(query_paths)} queries "
        f"in {out_dir / 'queries'} ({', '.join(TRANSFORMS)})"
    )

    conf = EXTRACT_PRESETS["default"]
    console.print(f"loading the model ({conf.model}, {conf.pooling}, {conf.image_size} px) ...")
    t0 = time.perf_counter()
    extractor = Extractor(conf)
    console.print(f"  ready in {time.perf_counter() - t0:.1f} s ({extractor.runner.name})")

    console.print(f"indexing {out_dir / 'collection'} into {out_dir / 'index'} ...")
    report = index_folder(
        out_dir / "collection", out_dir / "index", conf, remove_missing=True, extractor=extractor
    )
    console.print(
        f"  added {report.added}, updated {report.updated}, unchanged {report.unchanged}, "
        f"removed {report.removed}, failed {len(report.failed)} in {report.seconds:.1f} s"
    )
    for path, reason in report.failed:
        console.print(f"  [red]failed[/] {path}: {reason}", highlight=False)
    if report.whitening_learned:
        console.print("  whitening learned from the collection")
    elif conf.whitening is not None:
        console.print(
            f"  whitening not learned (needs >= {conf.whitening.min_images} images, the demo "
            "has fewer): raw descriptors are searched"
        )

    t0 = time.perf_counter()
    hits: list[list] = []
    with Searcher.open(out_dir / "index", extractor=extractor) as searcher:
        views = len(searcher.conf.query_rotations)
        crops = ", ".join(map(str, searcher.conf.query_crops)) or "none"
        console.print(
            f"searching {len(query_paths)} queries (top {k}, {views} view(s) each: rotations "
            f"{', '.join(map(str, searcher.conf.query_rotations))} deg; regional crops {crops}) ..."
        )
        for first in range(0, len(query_paths), SEARCH_CHUNK):
            ranking = searcher.search(query_paths[first : first + SEARCH_CHUNK], k=k)
            hits.extend(searcher.results(ranking))
            console.print(f"  {len(hits)}/{len(query_paths)} queries searched")
    seconds = time.perf_counter() - t0
    console.print(f"  {seconds:.1f} s, {seconds / max(1, len(query_paths)):.2f} s per query")

    result = DemoResult(
        out_dir=out_dir,
        html=out_dir / "results.html",
        originals=[p.stem for p in coll_paths],
        report=report,
    )
    for path, row in zip(query_paths, hits, strict=True):
        name, transform = path.stem.split("__", 1)
        correct = bool(row) and is_match(path, row[0].path)
        result.queries.append(QueryResult(path, name, transform, row, correct))
    _print_results(console, result)

    write_result_grid(
        result.html,
        [(q.path, q.hits) for q in result.queries],
        title=f"lookalike demo: top-{k} of {len(query_paths)} edited copies",
        truth=is_match,
    )
    _draw_one_match(console, result)
    _search_over_http(console, result)
    result.seconds = time.perf_counter() - start
    n_right = sum(q.correct for q in result.queries)
    console.print(
        f"[bold]top-1 accuracy: {result.accuracy:.1%}[/] ({n_right}/{len(result.queries)}); "
        f"results page: {result.html}; total {result.seconds:.1f} s"
    )
    return result


def _draw_one_match(console: Console, result: DemoResult) -> None:
    """Verify one edited copy against the image it found and draw the inlier matches.

    RootSIFT needs no downloaded weights, so the demo stays offline.
    """
    from lookalike.local.conf import VERIFY_PRESETS
    from lookalike.local.pair import match_files

    found = [q for q in result.queries if q.correct and q.transform in ("rot12", "crop")]
    if not found:
        return
    query = found[0]
    result.match_png = result.out_dir / "match.png"
    pair = match_files(query.path, query.hits[0].path, VERIFY_PRESETS["rootsift"], result.match_png)
    v = pair.verification
    console.print(f"geometric verification of {query.path.name} with its top result:")
    console.print(f"  {v.inliers} inliers of {v.tentative} RootSIFT matches")
    console.print(f"  drawn in {result.match_png}", highlight=False)


def _search_over_http(console: Console, result: DemoResult) -> None:
    """Start ``lookalike serve`` on the demo index for a moment (a free loopback port),
    search one edited copy over HTTP, and print how a user would run and open it."""
    import httpx

    from lookalike.serve import serving

    index = result.out_dir / "index"
    query = result.queries[0]
    with serving(index) as url:
        with open(query.path, "rb") as f:
            files = {"image": (query.path.name, f.read(), "application/octet-stream")}
        reply = httpx.post(f"{url}/search", files=files, params={"k": 1})
        reply.raise_for_status()
        (top,) = reply.json()["results"]
        page = httpx.get(f"{url}/")
        page.raise_for_status()
        result.page = "text/html" in page.headers["content-type"]
    (record,) = [h for h in query.hits if h.id == top["id"]] or [None]
    name = Path(record.path).stem if record is not None else f"id {top['id']}"
    result.served = top
    verified = f", {top['inliers']} inliers" if "inliers" in top else ""
    console.print(
        f"the same search over HTTP (lookalike serve): {query.path.name} -> {name} "
        f"(score {top['score']:.2f}{verified})"
    )
    console.print(
        f"  serve it yourself: .venv/bin/lookalike serve --index {index}, then open "
        "http://127.0.0.1:8000/ (the web page; the API at /docs)",
        highlight=False,
    )


def _print_results(console: Console, result: DemoResult) -> None:
    """One line per query with its ranked results, then the accuracy per edit."""
    table = Table(title="query -> results (score)", title_justify="left", box=None)
    table.add_column("", width=1)
    table.add_column("query", no_wrap=True)
    table.add_column("top results")
    for q in result.queries:
        mark = "[green]✓[/]" if q.correct else "[red]✗[/]"
        ranked = ", ".join(
            f"[green]{Path(h.path).stem}[/] {h.score:.2f}"
            if is_match(q.path, h.path)
            else f"{Path(h.path).stem} {h.score:.2f}"
            for h in q.hits
        )
        table.add_row(mark, q.path.name, ranked or "no results")
    console.print(table)
    by_t = result.accuracy_by_transform()
    console.print("top-1 by edit: " + ", ".join(f"{t} {a:.0%}" for t, a in by_t.items()))


def main(out_dir: Path = Path("demo_out"), k: int = 5) -> int:
    """Run the demo; the exit code (0 on success, a LookalikeError's code otherwise)."""
    console = Console()
    try:
        run_demo(out_dir, k, console)
    except LookalikeError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lookalike.demo", description=__doc__)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("demo_out"))
    parser.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    args = parser.parse_args()
    raise SystemExit(main(args.out_dir, args.k))
