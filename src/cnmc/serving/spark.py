"""Batch scoring on Spark: ``cnmc predict --engine spark`` (``local[N]`` by default, a cluster with
``--master URL``).

The files are found and the people named on the driver, exactly as in one process
(:mod:`cnmc.serving.batch`); the executors read each file with the serving code's own checks (an
unreadable or undecodable file becomes its error row, as in one process) and score the good ones
with the registered model, shipped to them as files and built there by :mod:`cnmc.serving.trusted`
(no code of the model's own runs; ``--trust-model`` uses MLflow's ``mlflow.pyfunc.spark_udf``): the
same classifier, the same preprocessing, the same answer. The cell rows come back to the driver, in
input order, for the same CSV or Parquet and the same per-person calls. On a cluster every executor
must see the files at the same paths (a shared disk or a mounted bucket).
"""

from __future__ import annotations

import base64
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from cnmc.core.errors import CnmcError
from cnmc.core.names import shown
from cnmc.inference.schema import CELL, CELL_COLUMNS, CELL_FILE, REQUEST_COLUMN, cell_record, no_answer

# PySpark 4.3 warns at every pandas conversion that pandas 3 is not fully supported; the answers are
# checked to equal the one-process path's (tests/serving/test_predict.py), so the warning says nothing here.
warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)

DEFAULT_MASTER = "local[*]"
# MLflow type names of the cell answer (cnmc.inference.schema) as Spark SQL types.
_SPARK_TYPES = {"string": "string", "double": "double", "long": "bigint", "boolean": "boolean"}
ANSWER_TYPE = ", ".join(f"{c.name} {_SPARK_TYPES[c.type]}" for c in CELL)


def score_on_spark(
    model_uri: str, files: list[Path], master: str = DEFAULT_MASTER, batch_size: int = 32, trust: bool = False
) -> list[dict]:
    """One row per file, in order: its ``path`` and answer (:data:`cnmc.inference.schema.CELL`) or its
    ``error``, scored by ``model_uri`` on a Spark session at ``master``."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    with spark_session(master, batch_size) as spark:
        paths = spark.createDataFrame(pd.DataFrame({"row": range(len(files)), "path": [str(f) for f in files]}))
        read = pandas_udf(read_checked, "image string, error string")  # type: ignore[call-overload]
        cells = paths.withColumn("read", read("path")).select("row", "read.image", "read.error").cache()
        model = _model_udf(spark, model_uri, trust)
        scored = cells.where(F.col("error").isNull()).withColumn(
            "answer", model(F.struct(F.col("image").alias(REQUEST_COLUMN)))
        )
        answers = scored.select("row", *(F.col(f"answer.{name}").alias(name) for name in CELL_COLUMNS)).toPandas()
        errors = cells.where(F.col("error").isNotNull()).select("row", "error").toPandas()
    rows = [{CELL_FILE.name: shown(path)} | no_answer() for path in files]
    for record in answers.to_dict("records"):
        rows[int(record["row"])].update(cell_record(record))
    for record in errors.to_dict("records"):
        rows[int(record["row"])]["error"] = str(record["error"])
    return rows


def _model_udf(spark: Any, model_uri: str, trust: bool) -> Any:
    """The model as a Spark UDF: with ``trust`` MLflow's own; else the model's folder is checked and
    shipped to the executors (``addFile``), each of which builds it once from its files."""
    import mlflow
    from pyspark.sql.functions import pandas_udf

    from cnmc.serving.scoring import load_image_model

    if trust:
        try:
            return mlflow.pyfunc.spark_udf(spark, model_uri, result_type=ANSWER_TYPE, env_manager="local")
        except Exception as exc:  # MLflow raises many types for bad URIs, missing runs, bad stores
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
            raise CnmcError(f"cannot load model {model_uri!r} on Spark: {first}") from None
    load_image_model(model_uri)  # refused here, on the driver, with its one line, if it is not ours
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    spark.sparkContext.addFile(str(local), recursive=True)
    name = local.name

    def answer(images: pd.DataFrame) -> pd.DataFrame:
        from pyspark import SparkFiles

        model = _EXECUTOR_MODELS.get(name)
        if model is None:
            model = _EXECUTOR_MODELS[name] = load_image_model(SparkFiles.get(name))
        return model.predict(images)[CELL_COLUMNS]

    return pandas_udf(answer, ANSWER_TYPE)  # type: ignore[call-overload]


# An executor's models, built once per Python worker from the files the driver shipped.
_EXECUTOR_MODELS: dict[str, Any] = {}


def read_checked(paths: pd.Series) -> pd.DataFrame:
    """Executors: each file's base64 bytes, or why it cannot be used (the one-process checks)."""
    from cnmc.serving.scoring import check_image, read_file_bytes

    images: list[str | None] = []
    errors: list[str | None] = []
    for path in paths:
        try:
            data = read_file_bytes(Path(path))
            check_image(data)
        except CnmcError as exc:
            images.append(None)
            errors.append(str(exc))
            continue
        images.append(base64.b64encode(data).decode("ascii"))
        errors.append(None)
    return pd.DataFrame({"image": images, "error": errors})


@contextmanager
def spark_session(master: str, batch_size: int) -> Iterator[Any]:
    """A Spark session at ``master`` whose Python workers run this interpreter, with Arrow batches
    of ``batch_size`` cells (a model's batch); stopped afterwards. No Java, or a master that cannot
    be reached, is a one-line error."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise CnmcError("--engine spark needs PySpark: pip install 'cnmc[spark]' (and Java 17 or later)") from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    try:
        spark = (
            SparkSession.builder.master(master)
            .appName("cnmc-predict")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
            .config("spark.ui.showConsoleProgress", "false")
            .getOrCreate()
        )
    except Exception as exc:  # py4j and the JVM raise many types: no java, a bad master URL
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
        raise CnmcError(f"cannot start Spark at {master!r}: {first}") from None
    spark.sparkContext.setLogLevel("ERROR")
    try:
        yield spark
    finally:
        spark.stop()
