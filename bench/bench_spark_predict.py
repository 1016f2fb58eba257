"""Batch scoring throughput: ``cnmc predict --engine spark`` on ``local[N]`` vs one process.

Scores the shipped demo cells (523 real C-NMC cells; ``--repeat`` lists them that many times, as an
archive's Parquet index would) with a random-weight pyfunc of ``--backbone`` at ``--image-size``
(default the pipeline's ``tf_efficientnet_lite0`` at 96 px; a random head costs what a trained one
does), first in this process (``predict_paths``), then on Spark through ``mlflow.pyfunc.spark_udf``
(``predict_paths(spark_master=...)``), and prints images/second for each, the ratio, and whether the
two answers agree (max |difference| of P(ALL)). Spark's start-up (JVM, Python workers, each loading
the model) is included, as a user pays it; ``--repeat`` shows where it stops mattering.

Run (from the project root):
    .venv/bin/python bench/bench_spark_predict.py [--master local[2]] [--repeat 4] [--backbone test_resnet]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import log_random_model  # noqa: E402

from cnmc.data.demo import demo_cells  # noqa: E402
from cnmc.serving.batch import predict_paths  # noqa: E402
from cnmc.serving.scoring import find_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master", default="local[2]", help="Spark master (default local[2]: this machine's 2 cores)")
    ap.add_argument("--repeat", type=int, default=4, help="times the demo cells are listed (default 4: 2,092 cells)")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cells = find_images([str(demo_cells())])
    with tempfile.TemporaryDirectory(prefix="cnmc-bench-spark-") as tmp_name:
        tmp = Path(tmp_name)
        uri, model_uri = log_random_model(tmp, args.backbone, args.image_size, cells[0].read_bytes())
        os.environ["MLFLOW_TRACKING_URI"] = uri
        index = tmp / "archive.parquet"
        pd.DataFrame({"path": [str(p) for p in cells] * args.repeat}).to_parquet(index)
        n = len(cells) * args.repeat
        print(f"{n:,} cells ({len(cells)} demo cells x {args.repeat}), {args.backbone} at {args.image_size} px")
        timings, answers = {}, {}
        for name, master in (("one process", None), (f"Spark {args.master}", args.master)):
            out = tmp / f"{name.split()[0]}.parquet"
            started = time.perf_counter()
            predict_paths(model_uri, [str(index)], out, args.batch_size, progress=False, spark_master=master)
            timings[name] = time.perf_counter() - started
            answers[name] = pd.read_parquet(out)["prob_all"].to_numpy(dtype=float)
            print(f"{name}: {timings[name]:.1f} s, {n / timings[name]:.1f} images/s", flush=True)
    local, spark = timings.values()
    gap = float(np.nanmax(np.abs(np.subtract(*answers.values()))))
    print(f"Spark / one process throughput: {local / spark:.2f}x; max |P(ALL) difference| {gap:.2e}")


if __name__ == "__main__":
    main()
