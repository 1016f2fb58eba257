"""Serving latency and throughput: ``cnmc serve`` (or ``mlflow models serve``) over HTTP vs the pyfunc in process.

``--server mlflow`` measures MLflow's own server instead of ``cnmc serve`` (the same scoring app,
without our guard and limits), so the two runs show what the guard costs.

Goal measured: HTTP p50 latency for one 450x450 BMP (base64 in ``dataframe_split``) at most 2x
the in-process ``pyfunc.predict`` p50 of the same request, i.e. the scoring server (JSON parse,
schema check, response) adds less than the model's own work (decode, resize, forward). Also
printed: the bare model forward on the already-preprocessed tensor, images/second with batches
of 32 (as ``dataframe_split`` and as ``inputs``), and a bounded load test: ``--clients``
concurrent clients (threads with keep-alive connections, loopback only) x ``--requests``
requests each; zero errors expected, p50/p95 and errors reported.

Without ``--model`` it logs a random-weight pyfunc of ``--backbone`` (default the pipeline's
``tf_efficientnet_lite0``; ``test_resnet`` for a quick run) to a temporary SQLite store: a
random head (or body) costs the same time as a trained one. The image is a real C-NMC cell from
``../shared/data/cnmc-sample`` when present, else random noise. The server and this process
use ``--threads`` torch threads each (default 1: steady numbers on a small shared machine);
the server is measured while the in-process model is idle and vice versa. The server is
stopped at the end, whatever happens.

Run (from the project root):
    .venv/bin/python bench/bench_serving.py [--server cnmc|mlflow] [--backbone test_resnet] [--model URI]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _samples import sample_bmps  # bench/ is on sys.path when a script here runs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the server-process helper the tests use (tests/helpers/)
from helpers import local_server  # noqa: E402

SERVERS = {
    "cnmc": ("cnmc serve", local_server.cnmc_serve),
    "mlflow": ("mlflow models serve", local_server.mlflow_serve),
}


def sample_bmp(tmp: Path) -> tuple[bytes, str]:
    """A real 450x450 C-NMC cell's BMP bytes if the shared sample is there, else a noise BMP."""
    found = sample_bmps()
    if found:
        return found[0].read_bytes(), f"real C-NMC cell {found[0].name}"
    pixels = np.random.default_rng(0).integers(0, 256, size=(450, 450, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="BMP")
    return buffer.getvalue(), "random-noise 450x450 BMP"


def log_random_model(tmp: Path, backbone: str, image_size: int, example: bytes) -> tuple[str, str]:
    """A random-weight pyfunc of ``backbone`` in a fresh SQLite store; returns (tracking URI, model URI)."""
    import mlflow

    from cnmc.inference.spec import ModelSpec
    from cnmc.models.backbones import create_backbone
    from cnmc.serving.pyfunc import log_pyfunc

    model_dir = tmp / "model"
    model_dir.mkdir()
    torch.manual_seed(0)
    net = create_backbone(backbone, pretrained=False)
    torch.save(net.model.state_dict(), model_dir / "weights.pt")
    ModelSpec(backbone, image_size, net.mean, net.std, threshold=0.5).save(model_dir / "model.json")
    (tmp / "example.bmp").write_bytes(example)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("bench-serving", artifact_location=(tmp / "mlruns").as_uri())  # not ./mlruns
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run():
        info = log_pyfunc(model_dir / "weights.pt", model_dir / "model.json", tmp / "example.bmp")
    return uri, info.model_uri


def start_server(
    server: str, model_uri: str, tracking_uri: str | None, port: int, threads: int, cwd: Path, log: Path
) -> subprocess.Popen:
    command = SERVERS[server][1](model_uri, port)
    return local_server.start(command, cwd, local_server.serving_env(tracking_uri, threads), log)


def latencies(call: Callable[[], object], n: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        call()
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        call()
        out[i] = time.perf_counter() - start
    return out * 1000.0


def pct(ms: np.ndarray) -> str:
    return f"p50 {np.percentile(ms, 50):7.2f} ms   p95 {np.percentile(ms, 95):7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=sorted(SERVERS), default="cnmc", help="server to measure (default cnmc)")
    parser.add_argument("--model", help="serve this model URI (default: log a random-weight one)")
    parser.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        help="backbone of the logged random model (default tf_efficientnet_lite0)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="model input side (params.yaml: 128)")
    parser.add_argument("--latency-samples", type=int, default=40, help="timed single requests per path")
    parser.add_argument("--batches", type=int, default=4, help="timed batches of --batch-size per path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in the load test")
    parser.add_argument("--requests", type=int, default=200, help="requests per client in the load test")
    parser.add_argument("--max-load-seconds", type=float, default=90.0, help="load test stops after this")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and here (default 1)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    warnings.filterwarnings("ignore", message=".*type hints.*")
    torch.set_num_threads(args.threads)

    import mlflow

    from cnmc.data.store import normalize_batch
    from cnmc.serving.pyfunc import decode_base64_images

    with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp_name:
        tmp = Path(tmp_name)
        image, what = sample_bmp(tmp)
        t0 = time.perf_counter()
        if args.model:
            tracking_uri, model_uri = os.environ.get("MLFLOW_TRACKING_URI"), args.model
            made = f"given model {model_uri}"
        else:
            tracking_uri, model_uri = log_random_model(tmp, args.backbone, args.image_size, image)
            made = (
                f"random-weight {args.backbone} pyfunc ({args.image_size} px), "
                f"logged in {time.perf_counter() - t0:.1f} s"
            )
        port = local_server.free_port()
        log = tmp / "server.log"
        proc = start_server(args.server, model_uri, tracking_uri, port, args.threads, tmp, log)
        server = SERVERS[args.server][0]
        http_row = f"HTTP ({server})"
        try:
            up = local_server.wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
            model = mlflow.pyfunc.load_model(model_uri)
            pyfunc = model.unwrap_python_model()
            spec, net = pyfunc.spec, pyfunc.model
            print(f"image: {what} ({len(image):,} bytes); model: {made}")
            print(
                f"server: {server} on 127.0.0.1:{port}, up in {up:.1f} s; "
                f"torch threads {args.threads}; cpus {os.cpu_count()}"
            )

            b64 = base64.b64encode(image).decode("ascii")
            frame = pd.DataFrame({"image": [b64]})
            one_body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64]]}}).encode()
            batch_body = json.dumps({"inputs": [b64] * args.batch_size}).encode()
            batch_split = json.dumps(
                {"dataframe_split": {"columns": ["image"], "data": [[b64]] * args.batch_size}}
            ).encode()
            batch_frame = pd.DataFrame({"image": [b64] * args.batch_size})
            tensor = normalize_batch(
                torch.from_numpy(decode_base64_images([b64], spec.image_size)), spec.mean, spec.std
            )
            batch_tensor = tensor.repeat(args.batch_size, 1, 1, 1)

            client = local_server.Client(port)

            def http_one() -> None:
                status, payload = client.post(one_body)
                assert status == 200, payload[:500]

            def http_batch(body: bytes) -> Callable[[], None]:
                def call() -> None:
                    status, payload = client.post(body)
                    assert status == 200, payload[:500]

                return call

            http_answer = json.loads(client.post(one_body)[1])["predictions"][0]
            local_answer = model.predict(frame).iloc[0].to_dict()
            assert abs(http_answer["prob_all"] - local_answer["prob_all"]) < 1e-5, (http_answer, local_answer)

            with torch.no_grad():
                n = args.latency_samples
                rows = {
                    http_row: latencies(http_one, n),
                    "pyfunc.predict in process": latencies(lambda: model.predict(frame), n),
                    "bare model forward": latencies(lambda: net(tensor), n),
                }
                batch_times = {
                    "HTTP, dataframe_split": latencies(http_batch(batch_split), args.batches, warmup=1),
                    "HTTP, inputs=[b64, ...]": latencies(http_batch(batch_body), args.batches, warmup=1),
                    "pyfunc.predict in process": latencies(lambda: model.predict(batch_frame), args.batches, 1),
                    "bare model forward": latencies(lambda: net(batch_tensor), args.batches, 1),
                }
            client.close()

            print(f"\nlatency, one image ({n} sequential requests after 3 warm-up):")
            for name, ms in rows.items():
                print(f"  {name:30s} {pct(ms)}")
            ratio = np.percentile(rows[http_row], 50) / np.percentile(rows["pyfunc.predict in process"], 50)
            verdict = "met" if ratio <= 2.0 else "NOT met"
            print(f"  HTTP p50 / in-process predict p50 = {ratio:.2f}x (goal <= 2x: {verdict})")
            print(f"\nthroughput, batches of {args.batch_size} ({args.batches} timed batches):")
            for name, ms in batch_times.items():
                per_s = args.batch_size / (np.median(ms) / 1000.0)
                print(f"  {name:30s} {per_s:8.1f} images/s   ({np.median(ms):.1f} ms per batch)")

            result = local_server.load_test(port, one_body, args.clients, args.requests, args.max_load_seconds)
            ms, errors = result.ms, result.errors
            planned = args.clients * args.requests
            print(f"\nload test: {args.clients} clients x {args.requests} requests (one image each), loopback:")
            print(
                f"  sent {result.sent}/{planned} in {result.wall:.1f} s "
                f"({result.sent / result.wall:.1f} req/s); {pct(ms)}; errors {len(errors)}"
            )
            for error in errors[:5]:
                print(f"    {error}")
            if result.sent < planned:
                print(f"  (stopped at --max-load-seconds {args.max_load_seconds:.0f})")
        finally:
            local_server.stop(proc)
        print(f"\nserver stopped (exit {proc.returncode}); total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
