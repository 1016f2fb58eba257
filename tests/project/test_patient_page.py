"""The patient page of ``cnmc serve`` in a real browser: headless Chromium picks real C-NMC cells
(the shipped demo cells) and a broken file through the page's file input, and the test reads what
the page rendered: each cell's label and p(ALL), sorted, flagged cells marked, the person's call,
the refused file."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.chromium import patient_page
from helpers.servers import Server

from cnmc.data.demo import demo_cells

pytestmark = pytest.mark.slow


def test_picking_a_patients_cells_shows_each_cell_and_the_call(
    browser: str, cnmc_server: Server, tmp_path: Path
) -> None:
    cells = sorted((demo_cells() / "C-NMC_Leukemia" / "training_data" / "fold_0" / "hem").glob("UID_H6_*"))[:5]
    broken = tmp_path / "UID_H6_99_1_hem.bmp"
    broken.write_bytes(b"BM not really a bitmap")
    shown, png = patient_page(browser, cnmc_server.url + "/", [*cells, broken])

    assert shown["status"] == "" and shown["call"] in ("all", "hem", "none")
    assert {c["name"] for c in shown["cells"]} == {p.name for p in cells}
    probs = [c["prob"] for c in shown["cells"]]
    assert probs == sorted(probs, reverse=True)  # most ALL-like first
    for cell in shown["cells"]:
        called = "all" if cell["prob"] >= cnmc_server.threshold else "hem"
        assert cell["label"] == called and cell["label"].upper() in cell["text"] and cell["thumbnail"] > 0
    # Real cells are unlike the synthetic ones the tiny model trained on: flagged ones are marked and left out.
    flagged = [c for c in shown["cells"] if c["ood"]]
    assert all("not judged: " in c["text"] for c in flagged)
    assert all("not judged" not in c["text"] for c in shown["cells"] if not c["ood"])
    assert f"{len(flagged)} flagged as unlike the training cells" in shown["summary"]
    assert f"{5 - len(flagged)} voting cells" in shown["summary"] and "1 unreadable" in shown["summary"]
    assert ("95% CI" in shown["summary"]) == (shown["call"] != "none")
    assert len(shown["errors"]) == 1 and shown["errors"][0].startswith(broken.name)
    assert png.startswith(b"\x89PNG")
