"""Regenerate ``docs/mlflow-compare.png``: the MLflow UI comparing the finished runs of one experiment.

Starts ``mlflow server`` on a copy of the given SQLite store (127.0.0.1, a free port), drives
Debian's headless Chromium over the DevTools protocol (``--remote-debugging-pipe``: standard
library only, nothing downloaded), and stacks two views into one PNG:

1. the experiment's runs table, finished runs only, sorted by ``test_f1_all``, with the columns
   a backbone comparison needs (backbone, pretrained, epochs; test_f1_all, test_roc_auc,
   test_balanced_accuracy, test_f1_macro, val_f1_macro);
2. its chart view, reduced to ``test_f1_all``, ``test_roc_auc`` (one bar per run) and
   ``val_f1_macro`` (one curve per run over the epochs).

The column choice, sort and closed assistant panel are what a user gets by clicking "Columns",
the sort menu and the panel's close button; here they are written into the UI's local storage
before the page loads. Usage (from the project root)::

    .venv/bin/python docs/mlflow_screenshot.py --db mlflow.db --out docs/mlflow-compare.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers the UI test uses
from helpers.chromium import Chromium  # noqa: E402

PARAMS = ["backbone", "train.pretrained", "train.epochs"]
METRICS = ["test_f1_all", "test_roc_auc", "test_f1_macro", "test_balanced_accuracy", "val_f1_macro"]
CHART_METRICS = ["test_f1_all", "test_roc_auc", "val_f1_macro"]
WIDTH = 1800


def start_server(db: Path, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def ui_state(experiment_id: str) -> dict[str, str]:
    """Local-storage entries: the runs table's columns and sort, no assistant panel, model-training mode."""
    state = {
        "searchFilter": "attributes.status = 'FINISHED'",
        "orderByKey": "metrics.`test_f1_all`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"params.`{p}`" for p in PARAMS] + [f"metrics.`{m}`" for m in METRICS],
        "columnOrder": [],
        "columnWidths": {"attributes.`Run Name`": 330},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": False,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    return {
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(state),
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.workflowType_v1": "machine_learning",
    }


def close_assistant(browser: Chromium) -> None:
    browser.js("""(() => { const b = [...document.querySelectorAll('button[aria-label="Close"]')]
        .find(e => e.closest('div') && document.body.innerText.includes('MLflow Assistant'));
        if (b) b.click(); })()""")


def autosize_columns(browser: Chromium, columns: list[str]) -> None:
    """Fit these columns to their content: what a double click on a column's edge does."""
    for column in columns:
        selector = json.dumps(f'.ag-header-cell[col-id="{column}"] .ag-header-cell-resize')
        browser.js(f"document.querySelector({selector})?.dispatchEvent(new MouseEvent('dblclick', {{bubbles: true}}))")


def bottom_of(browser: Chromium, elements: str, fallback: int = 1000) -> int:
    """The lowest bottom edge (px) of the elements an expression lists, capped to the viewport."""
    value = browser.js(f"Math.max(0, ...({elements}).map(e => e.getBoundingClientRect().bottom))")
    return min(int(value), fallback) if value else fallback


def screenshot(db: Path, experiment: str, out: Path, binary: str) -> Path:
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="cnmc-ui-"))
    copy = work / "mlflow.db"
    shutil.copyfile(db, copy)  # the project's store is only ever read
    with sqlite3.connect(copy) as con:
        row = con.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
        finished = con.execute(
            "SELECT r.name FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ? AND r.status = 'FINISHED' AND r.lifecycle_stage = 'active'",
            (experiment,),
        ).fetchall()
    if row is None:
        raise SystemExit(f"{db}: no experiment {experiment!r}")
    experiment_id, names = str(row[0]), [n for (n,) in finished]
    print(f"experiment {experiment} ({experiment_id}): {len(names)} finished runs: {', '.join(names)}")
    server, url = start_server(copy, work)
    browser = Chromium(binary, WIDTH, 1000)
    try:
        browser.goto(f"{url}/#/")
        browser.wait("document.body.innerText.length > 20")
        for key, value in ui_state(experiment_id).items():
            browser.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        query = urllib.parse.urlencode(
            {
                "workflowType": "machine_learning",
                "searchFilter": "attributes.status = 'FINISHED'",
                "orderByKey": "metrics.`test_f1_all`",
                "orderByAsc": "false",
            },
            quote_via=urllib.parse.quote,
        )
        browser.goto(f"{url}/#/experiments/{experiment_id}/runs?{query}")
        browser.wait(
            " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in names)
            + " && document.body.innerText.includes('test_f1_all')"
        )
        close_assistant(browser)
        autosize_columns(browser, ["attributes.`Run Name`", "params.`backbone`"])
        time.sleep(2)
        table = browser.png(height=bottom_of(browser, "[...document.querySelectorAll('.ag-row')]") + 24)

        # The chart view: once the app has generated its charts (and stored them), keep only ours.
        chart_page = f"{url}/#/experiments/{experiment_id}/runs?{query}&compareRunsMode=CHART"
        browser.goto(chart_page)
        key = json.dumps(next(iter(ui_state(experiment_id))))
        browser.wait(f"(JSON.parse(localStorage.getItem({key})).compareRunCharts || []).length > 0")
        state = json.loads(browser.js(f"localStorage.getItem({key})"))
        keep = {m: i for i, m in enumerate(CHART_METRICS)}
        charts = state["compareRunCharts"]
        for chart in charts:
            chart["deleted"] = chart.get("metricKey") not in keep
        state["compareRunCharts"] = sorted(charts, key=lambda c: keep.get(c.get("metricKey"), len(keep)))
        state["isAccordionReordered"] = True
        browser.js(f"localStorage.setItem({key}, {json.dumps(json.dumps(state))})")
        browser.goto(f"{url}/#/")
        browser.goto(chart_page)
        browser.wait("document.body.innerText.includes('Model metrics')")
        close_assistant(browser)
        time.sleep(3)
        cards = "[...document.querySelectorAll('[data-testid=\"experiment-view-compare-runs-card\"]')]"
        charts = browser.png(height=bottom_of(browser, cards) + 16)
    finally:
        browser.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(20)
        shutil.rmtree(work, ignore_errors=True)
    top, bottom = Image.open(io.BytesIO(table)), Image.open(io.BytesIO(charts))
    gap = 8
    sheet = Image.new("RGB", (WIDTH, top.height + gap + bottom.height), (200, 200, 200))
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height + gap))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("mlflow.db"), help="SQLite MLflow store (read only)")
    parser.add_argument("--experiment", default="cnmc-subject")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    print(screenshot(args.db.resolve(), args.experiment, args.out, args.chromium))


if __name__ == "__main__":
    main()
