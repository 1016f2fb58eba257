"""Batch prediction (``cnmc.serving.batch.predict_paths``) with a model from a real tiny run: every file
gets a row, bad files are reported and don't stop the batch, globs and folders expand."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers.params import tiny_params
from helpers.runs import TrainingCopy
from PIL import Image

from cnmc.core.errors import CnmcError
from cnmc.inference.schema import BATCH_COLUMNS
from cnmc.serving.batch import predict_paths
from cnmc.serving.pyfunc import encode_file
from cnmc.serving.scoring import find_images

BACKBONE = "test_resnet"


@dataclass(frozen=True)
class TinyModel:
    tracking_uri: str
    model_uri: str
    threshold: float


@pytest.fixture(scope="module")
def tiny_model(tiny_store: Path, mlflow_db_template: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A one-epoch ``train_and_evaluate`` run of the tiny test backbone, logged to its own SQLite store."""
    copy = TrainingCopy(tiny_store, mlflow_db_template, tmp_path_factory.mktemp("predict-run"))
    document = copy.train(tiny_params(), BACKBONE)
    return TinyModel(copy.tracking_uri, f"runs:/{document.run_id}/model", document.threshold)


@pytest.fixture
def model(tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> TinyModel:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_model.tracking_uri)
    return tiny_model


def write_images(folder: Path) -> dict[str, Path]:
    """Good images in several formats (one nested), a truncated BMP, a non-image .png, a text file."""
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True)
    files = {}
    for i, (name, fmt) in enumerate(
        [("a.bmp", "BMP"), ("b.png", "PNG"), ("nested/c.jpg", "JPEG"), ("nested/d.TIF", "TIFF"), ("e.png", "PNG")]
    ):
        pixels = rng.integers(0, 256, size=(40 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, format=fmt)
        files[name] = folder / name
    full = (folder / "a.bmp").read_bytes()
    (folder / "truncated.bmp").write_bytes(full[: len(full) // 2])
    (folder / "text.png").write_bytes(b"this is not an image at all")
    (folder / "notes.txt").write_text("not an image extension: skipped in folders")
    files["truncated.bmp"] = folder / "truncated.bmp"
    files["text.png"] = folder / "text.png"
    return files


def test_predict_folder_reports_bad_files_and_predicts_the_rest(model: TinyModel, tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    out = tmp_path / "out" / "predictions.csv"
    summary = predict_paths(model.model_uri, [str(tmp_path / "images")], out, batch_size=3, progress=False)

    table = pd.read_csv(out)
    assert list(table.columns) == BATCH_COLUMNS
    assert sorted(table["path"]) == sorted(str(p) for p in files.values())  # notes.txt skipped
    assert (summary.total, summary.predicted, summary.failed) == (7, 5, 2)
    assert sum(summary.counts.values()) == 5 and summary.out_csv == out

    errors = table.set_index("path")["error"]
    assert "truncated" in errors[str(files["truncated.bmp"])]
    assert "not an image" in errors[str(files["text.png"])]
    good = table[table["error"].isna()]
    assert len(good) == 5
    assert good["prob_all"].between(0, 1).all()
    np.testing.assert_allclose(good["threshold"], model.threshold)
    assert (good["label"] == np.where(good["prob_all"] >= good["threshold"], "all", "hem")).all()
    bad = table[table["error"].notna()]
    assert bad[["label", "prob_all", "threshold"]].isna().all().all()

    # Batched through the pyfunc == the pyfunc on each file's bytes, as a client sends them.
    loaded = mlflow.pyfunc.load_model(model.model_uri)
    direct = loaded.predict(pd.DataFrame({"image": [encode_file(Path(p)) for p in good["path"]]}))
    np.testing.assert_allclose(good["prob_all"], direct["prob_all"], atol=1e-6)


def test_predict_glob_and_explicit_files(model: TinyModel, tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    out = tmp_path / "glob.csv"
    pattern = str(tmp_path / "images" / "**" / "*.png")
    summary = predict_paths(model.model_uri, [pattern, str(files["a.bmp"]), str(files["b.png"])], out, progress=False)
    table = pd.read_csv(out)
    expected = [files["b.png"], files["e.png"], files["text.png"], files["a.bmp"]]  # b.png once
    assert list(table["path"]) == [str(p) for p in expected]
    assert (summary.predicted, summary.failed) == (3, 1)


def test_find_images_and_predict_refuse_what_matches_nothing(model: TinyModel, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CnmcError, match="no file matches"):
        find_images([str(tmp_path / "*.bmp")])
    with pytest.raises(CnmcError, match="no such file"):
        find_images([str(tmp_path / "missing.bmp")])
    with pytest.raises(CnmcError, match="no image files"):
        find_images([str(tmp_path / "empty")])
    with pytest.raises(CnmcError, match="no input"):
        find_images([])
    out = tmp_path / "never.csv"
    with pytest.raises(CnmcError, match="no file matches"):
        predict_paths(model.model_uri, [str(tmp_path / "nothing-*.png")], out, progress=False)
    assert not out.exists()


def test_predict_refuses_a_model_it_cannot_load(model: TinyModel, tmp_path: Path) -> None:
    files = write_images(tmp_path / "images")
    for uri in ("runs:/0123456789abcdef0123456789abcdef/model", str(tmp_path / "no-model-here")):
        with pytest.raises(CnmcError, match="cannot load model") as info:
            predict_paths(uri, [str(files["a.bmp"])], tmp_path / "x.csv", progress=False)
        assert "\n" not in str(info.value)


def test_a_file_only_the_model_refuses_is_reported_and_the_batch_goes_on(
    model: TinyModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the pre-check lets a file through (e.g. a model logged with older serving code that is
    stricter), the batch is retried file by file: the refused one gets the model's reason."""
    import cnmc.serving.scoring

    files = write_images(tmp_path / "images")
    monkeypatch.setattr(cnmc.serving.scoring, "open_rgb", lambda data: None)  # no pre-check
    out = tmp_path / "p.csv"
    summary = predict_paths(
        model.model_uri, [str(files["a.bmp"]), str(files["text.png"]), str(files["b.png"])], out, progress=False
    )
    table = pd.read_csv(out)
    assert (summary.predicted, summary.failed) == (2, 1)
    assert table["error"].isna().tolist() == [True, False, True]
    assert table["error"][1] == "not an image of a format cnmc reads (BMP, PNG, JPEG, TIFF)"


@pytest.mark.timeout(60, func_only=True)  # a FIFO opened for reading would block for good
def test_broken_links_and_special_files_get_error_rows_and_folder_links_are_not_followed(
    model: TinyModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "images"
    files = write_images(folder)
    (folder / "gone.png").symlink_to("missing.png")
    (folder / "here").symlink_to(".")
    (folder / "up").symlink_to("..")
    fifo = tmp_path / "fifo.bmp"
    os.mkfifo(fifo)
    out = tmp_path / "p.csv"
    inputs = [str(folder), str(fifo), os.devnull, str(folder / "**" / "*.png"), str(folder / "*" / "a.bmp")]
    with caplog.at_level(logging.WARNING, logger="cnmc"):
        summary = predict_paths(model.model_uri, inputs, out, progress=False)
    table = pd.read_csv(out)
    in_folder = sorted([*files.values(), folder / "gone.png"], key=Path.as_posix)
    assert list(table["path"]) == [str(p) for p in [*in_folder, fifo, Path(os.devnull)]]  # each once
    errors = table.set_index("path")["error"]
    assert errors[str(folder / "gone.png")] == "broken symbolic link to missing.png (no such file)"
    assert errors[str(fifo)] == "not a regular file (FIFO)"
    assert errors[os.devnull] == "not a regular file (character device)"
    assert (summary.total, summary.predicted, summary.failed) == (10, 5, 5)
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == [f"{folder / name}: symbolic link to a folder (not followed)" for name in ("here", "up")]


def test_predict_by_subject_writes_a_call_per_person_beside_the_cells(model: TinyModel, tmp_path: Path) -> None:
    """Real C-NMC cells of two people (names give the subject), one of them with a broken file."""
    from cnmc.cli import main
    from cnmc.data.demo import demo_cells
    from cnmc.serving.batch import People

    fold = demo_cells() / "C-NMC_Leukemia" / "training_data" / "fold_0"
    cells = tmp_path / "cells"
    cells.mkdir()
    for label, subject in (("all", "11"), ("hem", "H6")):
        for path in sorted((fold / label).glob(f"UID_{subject}_*"))[:6]:
            shutil.copy(path, cells / path.name)
    (cells / "UID_11_99_1_all.bmp").write_bytes(b"not an image")
    out = tmp_path / "people.csv"
    summary = predict_paths(model.model_uri, [str(cells)], out, batch_size=4, progress=False, people=People())
    people = pd.read_csv(out, dtype={"subject": str})
    assert list(people["subject"]) == ["11", "H6"] and list(people["unreadable"]) == [1, 0]
    # Real cells are unlike the synthetic ones this tiny model trained on: flagged cells do not vote.
    assert list(people["cells"] + people["cells_ood"] + people["duplicates"]) == [6, 6]
    called = people[people["call"] != "none"]
    assert set(called["call"]) <= {"all", "hem"} and (called["cells"] >= called["cells_ood"]).all()
    assert (called["ci95_low"] <= called["mean_prob_all"]).all() and (
        called["mean_prob_all"] <= called["ci95_high"]
    ).all()
    assert people.loc[people["call"] == "none", "note"].str.contains("no call").all()
    table = pd.read_csv(tmp_path / "people.cells.csv", dtype={"subject": str})
    assert len(table) == 13 and set(table["subject"]) == {"11", "H6"} and table["error"].notna().sum() == 1
    scored = table[table["error"].isna()]
    assert (scored["ood"] == (scored["ood_score"] > 1)).all() and scored["pixel_hash"].str.len().eq(16).all()
    people_flagged = scored.groupby("subject", sort=False)["ood"].sum().astype(int)
    assert list(people_flagged) == list(people["cells_ood"])
    assert summary.cells_csv == tmp_path / "people.cells.csv" and "2 people" in summary.line()

    # One person's cells under any names; names that say no subject are refused with a way out.
    assert (
        main(["predict", "--model", model.model_uri, "--subject", "P7", "-o", str(tmp_path / "p7.csv"), str(cells)])
        == 0
    )
    assert list(pd.read_csv(tmp_path / "p7.csv")["subject"]) == ["P7"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(cells.glob("UID_11_*.png")), other / "cell.png")
    with pytest.raises(CnmcError, match=r"cell.png: not a C-NMC name .*--subjects-csv"):
        predict_paths(model.model_uri, [str(other)], tmp_path / "x.csv", progress=False, people=People())
    mapping = tmp_path / "subjects.csv"
    mapping.write_text("path,subject\ncell.png,P9\n")
    predict_paths(model.model_uri, [str(other)], tmp_path / "y.csv", progress=False, people=People(csv=mapping))
    assert list(pd.read_csv(tmp_path / "y.csv")["subject"]) == ["P9"]


def test_the_preliminary_cells_are_grouped_by_the_labels_csv_beside_them_before_any_model_loads(
    tmp_path: Path,
) -> None:
    """The renamed preliminary-phase cells (1.png ...) name no person: the Kaggle labels CSV beside
    their folder does (its Patient_ID is the original name), found by itself or given."""
    from cnmc.data.demo import demo_cells
    from cnmc.data.layout import LABELS_CSV
    from cnmc.serving.batch import People

    prelim = demo_cells() / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data"
    files = find_images([str(prelim)])
    found = People().subjects(files)
    assert len(set(found)) == 12 and len(found) == len(files)
    assert People(csv=prelim.parent / LABELS_CSV).subjects(files) == found
    # A folder without the CSV is refused at once, naming the file and the ways out.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(files[0], lone / files[0].name)
    with pytest.raises(CnmcError, match=rf"{files[0].name}: not a C-NMC name .*{LABELS_CSV}.*--subjects-csv"):
        People().subjects(find_images([str(lone)]))


@pytest.mark.slow
def test_spark_scores_an_archive_index_as_one_process_does(model: TinyModel, tmp_path: Path) -> None:
    """The demo's test cells (and one broken file), listed in a Parquet index, scored on Spark
    ``local[2]`` through mlflow.pyfunc.spark_udf: the same cells, answers, errors and calls as ``cnmc predict``."""
    from cnmc.data.demo import demo_cells
    from cnmc.data.layout import LABELS_CSV
    from cnmc.serving.batch import People

    prelim = demo_cells() / "C-NMC_Leukemia" / "validation_data" / "C-NMC_test_prelim_phase_data"
    cells = Path(shutil.copytree(prelim, tmp_path / "cells"))
    shutil.copy(prelim.parent / LABELS_CSV, cells / LABELS_CSV)
    (cells / "1.png").write_bytes((cells / "1.png").read_bytes()[:200])  # truncated: an error row both ways
    here = predict_paths(model.model_uri, [str(cells)], tmp_path / "here.csv", progress=False, people=People())
    index = tmp_path / "archive.parquet"
    pd.DataFrame({"path": [str(p) for p in find_images([str(cells)])]}).to_parquet(index)
    spark = predict_paths(
        model.model_uri, [str(index)], tmp_path / "spark.parquet", people=People(), spark_master="local[2]"
    )
    assert (spark.total, spark.predicted, spark.failed) == (here.total, here.predicted, here.failed) == (83, 82, 1)
    for name in ("", ".cells"):
        local = pd.read_csv(tmp_path / f"here{name}.csv", dtype={"subject": str})
        remote = pd.read_parquet(tmp_path / f"spark{name}.parquet")
        assert list(remote.columns) == list(local.columns) and len(remote) == len(local)
        for column in local.columns:
            if pd.api.types.is_float_dtype(local[column]):  # batches differ: float32 sums in another order
                np.testing.assert_allclose(
                    remote[column].astype(float), local[column], rtol=1e-4, atol=1e-6, err_msg=column
                )
            else:
                assert remote[column].fillna("").astype(str).tolist() == local[column].fillna("").astype(str).tolist()
    assert spark.calls == here.calls and sum(here.calls.values()) == 12


def test_what_reaches_a_spreadsheet_cannot_run_and_one_file_has_one_person(tmp_path: Path) -> None:
    from cnmc.serving.batch import People, spreadsheet_safe

    table = pd.DataFrame({"subject": ['=HYPERLINK("x")', "@cmd", "+1", "-2", "P7"], "prob_all": [0.1, -0.5, 1, 2, 3]})
    safe = spreadsheet_safe(table)
    assert list(safe["subject"]) == ['\'=HYPERLINK("x")', "'@cmd", "'+1", "'-2", "P7"]
    assert list(safe["prob_all"]) == [0.1, -0.5, 1, 2, 3]  # numbers stay numbers
    mapping = tmp_path / "subjects.csv"
    mapping.write_text("path,subject\ncell.png,P1\nother.png,P2\ncell.png,P9\n")
    with pytest.raises(CnmcError, match=r"'cell.png' is given to more than one person \(rows 2, 4\)"):
        People(csv=mapping).subjects([tmp_path / "cell.png"])


class _Marker:
    """Unpickling this touches a file: the stand-in for code a crafted model would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.path,))


def test_a_crafted_model_never_runs_its_code_unless_trusted(
    model: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import pickle

    import yaml

    from cnmc.cli import main
    from cnmc.data.demo import demo_cells

    cells = tmp_path / "cells"
    cells.mkdir()
    fold = demo_cells() / "C-NMC_Leukemia" / "training_data" / "fold_0"
    shutil.copy(next(fold.glob("all/UID_11_*")), cells / "cell.png")
    # The logged model with its pickle replaced: our loader reads weights and settings, never the pickle.
    crafted = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.model_uri, dst_path=str(tmp_path / "m")))
    marker = tmp_path / "ran-model-code"
    (crafted / "python_model.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    assert main(["predict", "--model", str(crafted), "-o", str(tmp_path / "a.csv"), str(cells)]) == 0
    assert not marker.exists() and pd.read_csv(tmp_path / "a.csv")["error"].isna().all()
    # A folder whose loader is its own module: refused with one line, its code never imported.
    (crafted / "code" / "evil_loader.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    mlmodel = yaml.safe_load((crafted / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["loader_module"] = "evil_loader"
    (crafted / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    capsys.readouterr()
    assert main(["predict", "--model", str(crafted), "-o", str(tmp_path / "b.csv"), str(cells)]) == 2
    error = capsys.readouterr().err
    assert "not laid out as cnmc logs its models (its loader is 'evil_loader'" in error and "--trust-model" in error
    assert len(error.strip().splitlines()) == 1 and not marker.exists() and not (tmp_path / "b.csv").exists()
    # Trusted, MLflow loads it its own way, and the model's code runs: the user chose that.
    mlmodel["flavors"]["python_function"]["loader_module"] = "mlflow.pyfunc.model"
    (crafted / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    main(["predict", "--model", str(crafted), "--trust-model", "-o", str(tmp_path / "c.csv"), str(cells)])
    assert marker.exists()  # (the crafted pickle is no model, so the trusted load then fails with one line)
