"""Regenerate ``docs/patient-page.png``: ``cnmc serve``'s page with one person's cells picked.

Starts ``cnmc serve`` for ``--model`` on a free 127.0.0.1 port (tracking store from
``MLFLOW_TRACKING_URI`` or the project's ``mlflow.db``), picks ``--cells`` through the page's file
input in headless Chromium (as the page test does) and saves the rendered page. Usage, from the
project root after ``make demo``::

    .venv/bin/python docs/patient_page_screenshot.py --out docs/patient-page.png \\
        data/C-NMC_Leukemia/training_data/fold_0/hem/UID_H6_1*
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the helpers the page test uses
from helpers import local_server  # noqa: E402
from helpers.chromium import patient_page  # noqa: E402

from cnmc.tracking.provenance import tracking_uri  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", type=Path, help="one person's cell images")
    ap.add_argument("--model", default="models:/cnmc-classifier@champion")
    ap.add_argument("--out", type=Path, default=Path("docs/patient-page.png"))
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("headless Chromium is needed (Debian: apt-get install chromium)")
    port = local_server.free_port()
    with tempfile.TemporaryDirectory(prefix="cnmc-page-") as work:
        log = Path(work) / "serve.log"
        proc = local_server.start(
            local_server.cnmc_serve(args.model, port), Path.cwd(), local_server.serving_env(tracking_uri()), log
        )
        try:
            url = f"http://127.0.0.1:{port}"
            local_server.wait_until_up(url + "/ping", proc, log)
            shown, png = patient_page(browser, url + "/", args.cells)
        finally:
            local_server.stop(proc)
    args.out.write_bytes(png)
    print(f"{shown['call']}: {len(shown['cells'])} cells, {len(shown['errors'])} refused -> {args.out}")


if __name__ == "__main__":
    main()
