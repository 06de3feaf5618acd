"""Training benchmark: fine-tuning on the Grocery Store train split, measured on val.

    .venv/bin/python benchmarks/train.py --data ../shared/data [--out bench_out/train] \
        [--stages same,iconic,disjoint,transfer] [--losses arcface,...]

Stages (each writes ``OUT/<stage>.json`` and is skipped when that file exists, so a long
run can be done in parts; ``--again`` recomputes):

* ``same``: same-class retrieval. The 2,640 train photos are indexed, labelled by fine
  class (their parent folder), with the off-the-shelf ``default`` preset (the baseline)
  and, through :func:`lookalike.indexing.reembed.reembed_index` (what ``lookalike train
  --index`` runs), with the model fine-tuned by the ``default`` training preset (trained
  into ``OUT/grocery-default`` unless it is there; validation for the best epoch: 10 % of
  train held out, never val). Each of the 296 val photos queries both: P@1 (the first
  result is of the same fine class), mAP over the whole ranking, mAP@R, and recognition
  accuracy (soft vote of the top 10). Plus the training time and images/s per epoch.
* ``same_losses``: ``same`` again with the loss presets of ``--same-losses`` (the
  default's loss was chosen with it).
* ``iconic``: the 81 iconic product images (one per class) are the only gallery; the val
  photos are recognised against it (P@1 = accuracy of the nearest image), before / after.
* ``disjoint``: the metric-learning protocol. The 41 classes of even class id train
  (their train photos), the 40 of odd id are never seen; every photo (train + val) of
  those 40 queries the others: Recall@1 and mAP@R (labelled_metrics), for the
  off-the-shelf default preset and for each loss preset trained with the default preset
  (``--disjoint-sizes`` to shorten it), with the seconds per epoch.
* ``transfer``: Holidays and Oxford5k mAP with the off-the-shelf default preset and with
  the Grocery model: a model tuned on one domain is not a general upgrade.
* ``wise``: how the default weight-space ensemble was chosen: the last epoch of the
  ``same`` and the ``disjoint`` ``arcface`` models mixed with their starting weights at
  ``--wise-alphas``, each measured on its protocol (run after those two stages).
* ``throughput``: training images/s at 224 px (frozen and unfrozen backbone), against the
  forward pass alone; run it on a quiet machine (``--device cuda`` on a GPU machine: AMP).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

STAGES = ("same", "iconic", "disjoint", "transfer", "throughput", "wise")
DISJOINT_LOSSES = (
    "arcface", "subcenter-dynamic", "curricularface", "triplet", "multisimilarity", "contrastive",
)  # fmt: skip


def parent_labels(paths):
    from lookalike.labels import LABEL_KEY

    return {str(Path(p).resolve()): {LABEL_KEY: Path(p).parent.name} for p in paths}


def fresh(index_dir: Path) -> Path:
    """``index_dir`` removed: an index left by an earlier run may hold another model's
    descriptors (the index refuses them) or stale ones (sync would keep them)."""
    shutil.rmtree(index_dir, ignore_errors=True)
    return index_dir


def build_index(paths, index_dir: Path, conf, labels: dict) -> float:
    from lookalike.indexing import index_files

    fresh(index_dir)
    started = time.perf_counter()
    index_files(paths, index_dir, conf, metadata=lambda p: labels.get(str(p), {}))
    return time.perf_counter() - started


def score(index_dir: Path, queries, truth) -> dict:
    from lookalike.evaluate.labelled import gallery_metrics
    from lookalike.search import Searcher

    with Searcher.open(index_dir) as searcher:
        report = gallery_metrics(searcher, [str(q) for q in queries], truth)
    return {k: v for k, v in report.to_dict().items() if k != "failed"}


def trained(out: Path, name: str, data, conf, val=None) -> tuple[Path, float]:
    """Train into ``out/name`` unless a complete model is there; returns (dir, seconds)."""
    from lookalike.train.loop import train
    from lookalike.train.model_dir import read_info

    model_dir = out / name
    if (model_dir / "model.json").exists():
        info = read_info(model_dir)
        if info.get("complete") and info["settings"] == conf.to_dict():
            return model_dir, sum(e["seconds"] for e in info["epochs"])
        shutil.rmtree(model_dir)
    started = time.perf_counter()
    train(data, conf, model_dir, val=val)
    return model_dir, time.perf_counter() - started


def grocery(data: Path):
    from lookalike.train.data import labelled_images

    root = data / "grocery"
    return labelled_images(root / "train"), labelled_images(root / "val")


def stage_same(args, out: Path) -> dict:
    from lookalike.extract import get_preset
    from lookalike.indexing.reembed import reembed_index
    from lookalike.train.conf import train_preset
    from lookalike.train.model_dir import extract_conf, read_info

    train_set, val_set = grocery(args.data)
    labels = parent_labels(train_set.paths)
    base = out / "same-base.idx"
    base_seconds = build_index(list(train_set.paths), base, get_preset("default"), labels)
    conf = train_preset("default").replace(device=args.device)
    model_dir, train_seconds = trained(out, "grocery-default", train_set, conf)
    new = fresh(out / "same-trained.idx")
    started = time.perf_counter()
    reembed_index(base, new, extract_conf(model_dir))
    reembed_seconds = time.perf_counter() - started
    queries = list(val_set.paths)
    truth = [val_set.classes[t] for t in val_set.targets]
    info = read_info(model_dir)
    return {
        "baseline": {**score(base, queries, truth), "index_seconds": round(base_seconds, 1)},
        "trained": {**score(new, queries, truth), "reembed_seconds": round(reembed_seconds, 1)},
        "training": {
            "seconds": round(train_seconds, 1),
            "settings": info["settings"],
            "epochs": info["epochs"],
            "best_epoch": info["best_epoch"],
            "learned_p": info["pooling"]["p"],
        },
    }


def stage_same_losses(args, out: Path) -> dict:
    """``same`` for other loss presets (``--same-losses``): the default training preset
    with only the loss changed, against the same baseline index."""
    from lookalike.indexing.reembed import reembed_index
    from lookalike.train.conf import train_preset
    from lookalike.train.model_dir import extract_conf, read_info

    train_set, val_set = grocery(args.data)
    queries = list(val_set.paths)
    truth = [val_set.classes[t] for t in val_set.targets]
    result = {}
    for loss in filter(None, args.same_losses.split(",")):
        conf = train_preset("default").replace(loss=loss, device=args.device)
        model_dir, seconds = trained(out, f"grocery-{loss}", train_set, conf)
        new = fresh(out / f"same-{loss}.idx")
        reembed_index(out / "same-base.idx", new, extract_conf(model_dir))
        info = read_info(model_dir)
        result[loss] = {
            **score(new, queries, truth),
            "train_seconds": round(seconds, 1),
            "best_epoch": info["best_epoch"],
        }
        _save(out / "same_losses.partial.json", result)
    return result


def stage_iconic(args, out: Path) -> dict:
    from lookalike.evaluate.datasets import grocery_classes
    from lookalike.extract import get_preset
    from lookalike.labels import LABEL_KEY
    from lookalike.train.model_dir import extract_conf

    classes = grocery_classes(args.data / "grocery")
    gallery = [c.iconic for c in classes]
    labels = {str(c.iconic): {LABEL_KEY: c.name} for c in classes}
    _, val_set = grocery(args.data)
    queries = list(val_set.paths)
    truth = [val_set.classes[t] for t in val_set.targets]
    model_dir = out / "grocery-default"
    result = {}
    for name, conf in (("baseline", get_preset("default")), ("trained", extract_conf(model_dir))):
        index = out / f"iconic-{name}.idx"
        build_index(gallery, index, conf, labels)
        result[name] = score(index, queries, truth)
    return result


def disjoint_split(data: Path):
    """The class-disjoint protocol: (the train photos of the 41 classes of even class id,
    relabelled 0..40; every photo, train and val, of the 40 of odd id)."""
    from lookalike.evaluate.datasets import grocery_classes
    from lookalike.train.data import LabelledImages

    train_set, val_set = grocery(data)
    ids = {c.name: c.id for c in grocery_classes(data / "grocery")}
    seen = {c for c in train_set.classes if ids[c] % 2 == 0}
    rows = [i for i, t in enumerate(train_set.targets) if train_set.classes[t] in seen]
    part = train_set.subset(rows)
    names = tuple(sorted(seen))
    index = {c: i for i, c in enumerate(names)}
    part = LabelledImages(part.paths, tuple(index[part.classes[t]] for t in part.targets), names)
    test = [p for s in (train_set, val_set) for p, t in zip(s.paths, s.targets, strict=True)
            if s.classes[t] not in seen]  # fmt: skip
    return part, test


def unseen_metrics(test, index_dir: Path, conf, nmi: bool = False, worst: int = 0):
    """``test`` indexed with ``conf`` into ``index_dir``, each image against the others:
    :func:`~lookalike.evaluate.labelled.labelled_metrics` of the stored vectors."""
    from lookalike.evaluate.labelled import labelled_metrics
    from lookalike.index import IndexStore
    from lookalike.labels import label_of

    build_index(test, index_dir, conf, parent_labels(test))
    with IndexStore.open(index_dir) as store:
        records = [r for r in store.records() if r.status == "ok"]
        x = store.vector_source().vectors([r.id for r in records])
        y = [label_of(r.metadata) for r in records]
    return labelled_metrics(x, y, (1, 5), nmi=nmi, worst=worst)


def stage_disjoint(args, out: Path) -> dict:
    from lookalike.extract import get_preset
    from lookalike.train.conf import parse_sizes, train_preset
    from lookalike.train.model_dir import extract_conf

    part, test = disjoint_split(args.data)

    def measure(conf, tag: str) -> dict:
        report = unseen_metrics(test, out / f"disjoint-{tag}.idx", conf, nmi=True, worst=3)
        return {
            "recall_at_1": report.recall_at[1],
            "map_at_r": report.map_at_r,
            "nmi": report.nmi,
            "queries": report.queries,
            "worst": [vars(c) for c in report.worst],
        }

    result = {
        "train_classes": len(part.classes),
        "train_images": len(part),
        "test_classes": len({Path(p).parent.name for p in test}),
        "test_images": len(test),
        "baseline": measure(get_preset("default"), "baseline"),
        "losses": {},
    }
    preset = train_preset("default")
    sizes = parse_sizes(args.disjoint_sizes) if args.disjoint_sizes else preset.sizes
    for loss in args.losses.split(","):
        conf = preset.replace(loss=loss, sizes=sizes, device=args.device)
        model_dir, seconds = trained(out, f"disjoint-{loss}", part, conf)
        result["losses"][loss] = {
            **measure(extract_conf(model_dir), loss),
            "train_seconds": round(seconds, 1),
            "seconds_per_epoch": round(seconds / conf.epochs, 1),
        }
        _save(out / "disjoint.partial.json", result)
    return result


def stage_transfer(args, out: Path) -> dict:
    from lookalike.evaluate import evaluate_dataset, load_dataset
    from lookalike.extract import get_preset
    from lookalike.train.model_dir import extract_conf

    model_dir = out / "grocery-default"
    result = {}
    for kind, folder in (("holidays", "holidays"), ("oxford5k", "oxford5k")):
        dataset = load_dataset(kind, args.data / folder)
        for name, conf in (
            ("baseline", get_preset("default")),
            ("trained", extract_conf(model_dir)),
        ):
            r = evaluate_dataset(dataset, fresh(out / f"transfer-{kind}-{name}.idx"), conf)
            result.setdefault(kind, {})[name] = {
                "mAP": r["metrics"]["mAP"],
                "images": r["images"],
                "images_per_second": r["images_per_second"],
            }
    return result


def _mixed_model(model_dir: Path, alpha: float, dest: Path) -> Path:
    """A copy of ``model_dir`` whose backbone is ``(1 - alpha) * its starting weights +
    alpha * the fine-tuned ones of its last epoch`` (``checkpoint.pt``), as training with
    ``wise=alpha`` saves it (for the last epoch)."""
    import torch

    from lookalike.models import create_backbone, tensor_hash
    from lookalike.train.loop import weight_space_ensemble
    from lookalike.train.model_dir import CHECKPOINT, read_info, write_json, write_torch

    info = read_info(model_dir)
    tuned = torch.load(model_dir / CHECKPOINT, weights_only=False)["model"]
    start = create_backbone(info["settings"]["model"], info["settings"]["weights"])
    state = weight_space_ensemble(tuned, start.state_dict(), alpha)
    dest.mkdir(parents=True, exist_ok=True)
    write_torch(dest / "weights.pt", state)
    write_json(
        dest / "model.json", {**info, "weights": {"file": "weights.pt", "hash": tensor_hash(state)}}
    )
    return dest


def stage_wise(args, out: Path) -> dict:
    """How the default ``wise`` was chosen: the last epoch of the ``same`` and ``disjoint``
    ``arcface`` models mixed with their starting weights at ``--wise-alphas``, measured on
    both protocols (same-class P@1 / mAP on val; class-disjoint R@1 / mAP@R)."""
    from lookalike.train.model_dir import extract_conf

    train_set, val_set = grocery(args.data)
    _, test = disjoint_split(args.data)
    result = {}
    for alpha in (float(a) for a in args.wise_alphas.split(",")):
        same = _mixed_model(out / "grocery-default", alpha, out / f"wise-same-{alpha}")
        idx = out / f"wise-same-{alpha}.idx"
        build_index(list(train_set.paths), idx, extract_conf(same), parent_labels(train_set.paths))
        truth = [val_set.classes[t] for t in val_set.targets]
        row = {"same": score(idx, list(val_set.paths), truth)}
        unseen = _mixed_model(out / "disjoint-arcface", alpha, out / f"wise-disjoint-{alpha}")
        report = unseen_metrics(test, out / f"wise-disjoint-{alpha}.idx", extract_conf(unseen))
        row["disjoint"] = {"recall_at_1": report.recall_at[1], "map_at_r": report.map_at_r}
        result[str(alpha)] = row
        same_row, unseen_row = row["same"], row["disjoint"]
        print(
            f"wise {alpha}: same P@1 {100 * same_row['p_at_1']:.1f} mAP "
            f"{100 * same_row['map']:.1f} | disjoint R@1 {100 * unseen_row['recall_at_1']:.1f} "
            f"mAP@R {100 * unseen_row['map_at_r']:.1f}",
            flush=True,
        )
    return result


def stage_throughput(args, out: Path) -> dict:
    """Training images/s at 224 px, batch 32 (random images: decoding is done once before
    training and not part of a step), with the default preset's frozen stages and with the
    whole backbone frozen, after two warm-up steps; the naive baseline (the whole backbone
    trained, channels-first tensors) and the forward pass alone (inference mode)."""
    import torch

    from lookalike.models import create_backbone
    from lookalike.train.conf import TrainConf
    from lookalike.train.loop import _Run

    conf = TrainConf(device=args.device)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    run = _Run(conf, out / "throughput-unused", device, None)
    from lookalike.train.losses import build_loss, loss_preset
    from lookalike.train.model import DescriptorModel

    model = DescriptorModel(create_backbone(conf.model), conf.pooling, conf.dim)
    run.early = model.early_stages(conf.frozen_stages)
    run.model = model.to(device, memory_format=torch.channels_last)
    run.loss, run.miner = build_loss(loss_preset(conf.loss), 81, run.model.dim)
    run.loss = run.loss.to(device)
    params = [*run.model.parameters(), *run.loss.parameters()]
    run.optimizer = torch.optim.AdamW(params, lr=1e-5)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)
    run.scaler = torch.amp.GradScaler("cuda", enabled=run._amp)
    x = torch.randn(32, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 81, (32,), device=device)
    result = {"device": device.type, "amp": run._amp, "batch": 32, "size": 224}
    result["frozen_stages"] = conf.frozen_stages
    for name, frozen in (("frozen", True), ("unfrozen", False)):
        run._set_frozen(frozen)
        for _ in range(2):
            run._step(x, y, frozen)
        started = time.perf_counter()
        steps = 8
        for _ in range(steps):
            run._step(x, y, frozen)
        result[f"{name}_images_per_s"] = round(32 * steps / (time.perf_counter() - started), 2)
    # the naive baseline: the whole backbone trained, default (channels-first) tensors
    naive = DescriptorModel(create_backbone(conf.model), conf.pooling, conf.dim).to(device)
    naive.train()
    optimizer = torch.optim.AdamW([*naive.parameters(), *run.loss.parameters()], lr=1e-5)
    plain = x.contiguous()
    for i in range(10):
        if i == 2:
            started = time.perf_counter()
        loss = run.loss(naive(plain), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result["naive_images_per_s"] = round(32 * 8 / (time.perf_counter() - started), 2)
    run.model.eval()
    with torch.inference_mode():
        run.model(x)
        started = time.perf_counter()
        for _ in range(4):
            run.model(x)
        result["forward_only_images_per_s"] = round(128 / (time.perf_counter() - started), 2)
    return result


def _save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def print_gallery_row(name: str, r: dict) -> None:
    """P@1, mAP, mAP@R and recognition accuracy of a ``gallery_metrics`` result, in %."""
    cells = (r["p_at_1"], r["map"], r["map_at_r"], r["accuracy"])
    print(f"  {name:<22}" + "".join(f"{100 * v:>7.1f}" for v in cells))


def print_report(report: dict) -> None:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    if "same" in report:
        s = report["same"]
        print("same-class retrieval, val photos against the indexed train photos")
        print(f"  {'':<22}{'P@1':>7}{'mAP':>7}{'mAP@R':>7}{'recog':>7}")
        for name in ("baseline", "trained"):
            print_gallery_row(name, s[name])
        t = s["training"]
        rates = [e["images_per_s"] for e in t["epochs"] if not e["frozen"]]
        print(
            f"  training {t['seconds'] / 60:.1f} min, best epoch {t['best_epoch']}, learned "
            f"p {t['learned_p']}, unfrozen {min(rates):.1f}-{max(rates):.1f} img/s"
        )
    if "same_losses" in report:
        print("same-class retrieval with other losses (default training preset otherwise)")
        for loss, r in report["same_losses"].items():
            if isinstance(r, dict) and "p_at_1" in r:
                print_gallery_row(loss, r)
    if "iconic" in report:
        r = report["iconic"]
        print("iconic gallery (81 product shots), val photos recognised")
        for name in ("baseline", "trained"):
            print(f"  {name:<22}accuracy {pct(r[name]['accuracy'])}  P@1 {pct(r[name]['p_at_1'])}")
    if "disjoint" in report:
        d = report["disjoint"]
        print(
            f"class-disjoint: train {d['train_classes']} classes ({d['train_images']} photos), "
            f"test {d['test_classes']} unseen classes ({d['test_images']} photos)"
        )
        print(f"  {'':<22}{'R@1':>7}{'mAP@R':>7}{'NMI':>7}{'s/epoch':>9}")
        rows = [("off-the-shelf", d["baseline"]), *list(d["losses"].items())]
        for name, r in rows:
            spe = f"{r['seconds_per_epoch']:.0f}" if "seconds_per_epoch" in r else "-"
            print(
                f"  {name:<22}{pct(r['recall_at_1']):>7}{pct(r['map_at_r']):>7}"
                f"{pct(r['nmi']):>7}{spe:>9}"
            )
    if "transfer" in report:
        print("other domains, mAP (off-the-shelf -> Grocery model)")
        for kind, r in report["transfer"].items():
            if not isinstance(r, dict) or "baseline" not in r:
                continue
            print(f"  {kind:<22}{r['baseline']['mAP']:.1f} -> {r['trained']['mAP']:.1f}")
    if "throughput" in report:
        print_throughput(report["throughput"])


def print_throughput(r: dict) -> None:
    print(
        f"training throughput, {r['size']} px, batch {r['batch']}, {r['device']}"
        f"{' + AMP' if r['amp'] else ''}: unfrozen {r['unfrozen_images_per_s']} img/s, "
        f"backbone frozen {r['frozen_images_per_s']} img/s; naive (whole backbone, "
        f"channels-first) {r['naive_images_per_s']} img/s; forward pass alone "
        f"{r['forward_only_images_per_s']} img/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/train"))
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--losses", default=",".join(DISJOINT_LOSSES))
    parser.add_argument(
        "--disjoint-sizes", default="", help="size:epochs for stage disjoint; default: the preset's"
    )
    parser.add_argument("--same-losses", default="", help="stage same_losses: loss presets")
    parser.add_argument("--wise-alphas", default="0.5,0.6,0.7,0.85,1.0", help="stage wise")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--again", action="store_true", help="recompute stages already saved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("lookalike.images").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for stage in args.stages.split(","):
        path = args.out / f"{stage}.json"
        if path.exists() and not args.again:
            report[stage] = json.loads(path.read_text())
            continue
        started = time.perf_counter()
        report[stage] = globals()[f"stage_{stage}"](args, args.out)
        report[stage]["stage_seconds"] = round(time.perf_counter() - started, 1)
        report[stage]["measured"] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "load": os.getloadavg()[0],
        }
        _save(path, report[stage])
    print_report(report)


if __name__ == "__main__":
    main()
