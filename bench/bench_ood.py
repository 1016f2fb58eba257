"""Knowing when not to call, measured on a trained model through its served answer.

What it measures, for the model at ``--model`` (any MLflow model URI or a logged model folder),
with the same code ``cnmc predict`` uses (no model code run, :mod:`cnmc.serving.trusted`):
- cells of people the model never saw (``--unseen``, C-NMC layout or any folder): the share
  flagged ``ood`` (goal: at most 5%), and each person's call (goal: every one still called);
- the same cells turned upside down: the share flagged (a rotation is not another domain);
- cells of another lab (``--other``, e.g. ``../shared/data/allidb2-dev``): the share flagged, the
  ROC AUC of ``ood_score`` against the unseen C-NMC cells (goal: at least 0.95), and the call for a
  person made of those cells (goal: ``none``);
- generated non-cells (black, white, grey, noise, text, a strip cut from a cell): each flagged?

Run (from the project root; a minute or two on 2 CPU cores for a few hundred cells):
    .venv/bin/python bench/bench_ood.py --model MODEL_URI_OR_FOLDER --unseen DIR --other DIR
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

from cnmc.data.layout import parse_cell_name
from cnmc.metrics.patients import call_people
from cnmc.serving.scoring import find_images, load_image_model


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def answers(model: object, images: list[Image.Image], batch: int = 32) -> pd.DataFrame:
    """The served answer of every image, in order."""
    parts = []
    for start in range(0, len(images), batch):
        frame = pd.DataFrame({"image": [encoded(im) for im in images[start : start + batch]]})
        parts.append(model.predict(frame))  # type: ignore[attr-defined]
    return pd.concat(parts, ignore_index=True)


def non_cells(a_cell: Image.Image) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    text = Image.new("RGB", (450, 450), "white")
    ImageDraw.Draw(text).text((20, 200), "PATIENT 42  smear 2026-12-07  ok", fill="black")
    label = Image.new("RGB", (450, 450))  # a slide label's white text on black, as a segmented cell's frame is
    ImageDraw.Draw(label).text((20, 200), "PATIENT 42  smear", fill="white", font_size=40)
    cell = np.asarray(a_cell.convert("RGB").resize((450, 450)))
    return {
        "black": Image.new("RGB", (450, 450)),
        "white": Image.new("RGB", (450, 450), "white"),
        "grey": Image.new("RGB", (450, 450), (128, 128, 128)),
        "noise": Image.fromarray(rng.integers(0, 256, (450, 450, 3), dtype=np.uint8)),
        "text": text,
        "text on black": label,
        "strip": Image.fromarray(cell[200:230]),
    }


def person_of(path: Path) -> str:
    parsed = parse_cell_name(path.name)
    return parsed.subject if parsed else path.parent.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model URI or logged model folder")
    ap.add_argument("--unseen", type=Path, required=True, help="cells of C-NMC people the model never saw")
    ap.add_argument("--other", type=Path, required=True, help="cells of another lab (e.g. allidb2-dev)")
    args = ap.parse_args(argv)
    for folder in (args.unseen, args.other):
        if not folder.is_dir():
            print(f"skipped: {folder} not found", file=sys.stderr)
            return 0
    model = load_image_model(args.model)
    unseen_files, other_files = find_images([str(args.unseen)]), find_images([str(args.other)])
    unseen_images = [Image.open(p).convert("RGB") for p in unseen_files]
    unseen = answers(model, unseen_images)
    flipped = answers(model, [im.transpose(Image.Transpose.ROTATE_180) for im in unseen_images])
    other = answers(model, [Image.open(p).convert("RGB") for p in other_files])
    junk = answers(model, list(non_cells(unseen_images[0]).values()))
    truth = np.r_[np.zeros(len(unseen)), np.ones(len(other))]
    auc = roc_auc_score(truth, np.r_[unseen["ood_score"], other["ood_score"]])
    threshold = float(unseen["threshold"].iat[0])
    people = call_people(
        [person_of(p) for p in unseen_files], unseen["prob_all"], threshold, unseen["ood"], unseen["pixel_hash"]
    )
    lab = call_people(["other lab"] * len(other), other["prob_all"], threshold, other["ood"], other["pixel_hash"])
    print(f"model {args.model}")
    print(f"unseen C-NMC cells: {len(unseen)}, flagged {unseen['ood'].mean():.1%} (goal <= 5%)")
    print(f"  the same turned upside down: flagged {flipped['ood'].mean():.1%}")
    print(f"other lab ({args.other}): {len(other)} cells, flagged {other['ood'].mean():.1%}")
    print(f"ROC AUC of ood_score, other lab against unseen C-NMC cells: {auc:.3f} (goal >= 0.95)")
    print(f"a person made of the other lab's cells: call {lab['call'].iat[0]!r} ({lab['note'].iat[0]})")
    called = int((people["call"] != "none").sum())
    print(f"unseen C-NMC people called: {called} of {len(people)} (goal: all)")
    print(people[["subject", "cells", "cells_ood", "call", "mean_prob_all"]].to_string(index=False))
    print("generated non-cells:")
    for name, row in zip(non_cells(unseen_images[0]), junk.to_dict("records"), strict=True):
        print(f"  {name:>6}: ood {row['ood']!s:5}  score {row['ood_score']:.2f}  {row['ood_reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
