"""Sub-commands that write what people read about the models: ``explain`` (Grad-CAM overlays of
images) and ``report`` (the backbones against the paper)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnmc.cli.common import add_command, add_model, add_params, model_uri, params_from_args


def cmd_explain(args: argparse.Namespace) -> None:
    from cnmc.jobs.explain import explain_images

    for path in explain_images(model_uri(args), args.inputs, Path(args.out_dir), trust=args.trust_model):
        print(path)


def cmd_report(args: argparse.Namespace) -> None:
    from cnmc.jobs.report import report_backbones

    print(report_backbones(params_from_args(args), Path(args.metrics_dir), Path(args.out_dir)))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub, "explain", cmd_explain, "Write Grad-CAM overlays showing what the model looked at in each image."
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    add_model(p)
    p.add_argument("-o", "--out-dir", default="explanations", help="where the overlays go (default: %(default)s)")

    p = add_command(
        sub, "report", cmd_report, "Compare the trained backbones with the paper's Table 2 (markdown, CSV, bar chart)."
    )
    add_params(p)
    p.add_argument("--metrics-dir", default="outputs/metrics", help="metrics JSON files (default: %(default)s)")
    p.add_argument("--out-dir", default="outputs/report", help="where the report goes (default: %(default)s)")
