"""Data-parallel training under torchrun, on CPU with gloo: two processes train one model, and
the job leaves one MLflow run, one checkpoint and one metrics file; each epoch is dealt out to
the ranks disjointly and completely."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.params import tiny_params
from mlflow import MlflowClient

from cnmc.core.config import render_params
from cnmc.core.distributed import World, evaluation_share
from cnmc.core.errors import CnmcError
from cnmc.data.sampling import epoch_rows

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(("n", "size"), [(7, 2), (8, 2), (10, 3), (2, 3)])
def test_an_epoch_is_dealt_out_disjointly_and_completely(n: int, size: int) -> None:
    targets = np.zeros(n)
    shares = [epoch_rows(targets, World(rank, size), seed=5) for rank in range(size)]
    together = np.concatenate(shares)
    assert sorted(together.tolist()) == list(range(n))  # every row once: disjoint and covering
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    held_out = [evaluation_share(n, World(rank, size)) for rank in range(size)]
    assert sorted(np.concatenate(held_out).tolist()) == list(range(n))


def test_each_epoch_deals_a_new_shuffle() -> None:
    targets = np.zeros(10)
    for rank in range(2):
        first, second = (epoch_rows(targets, World(rank, 2), seed=seed) for seed in (5, 6))
        assert not np.array_equal(first, second)


def test_one_process_keeps_the_shuffle_of_a_plain_random_sampler() -> None:
    """Without torchrun an epoch is the order RandomSampler gave before: the same runs as before."""
    expected = list(torch.utils.data.RandomSampler(range(50), generator=torch.Generator().manual_seed(9)))
    assert epoch_rows(np.zeros(50), World(), seed=9).tolist() == expected


def test_the_batch_size_is_the_global_batch(copy_store: Path) -> None:
    from cnmc.data.store import ImageStore
    from cnmc.models.backbones import create_backbone
    from cnmc.training.trainer import Trainer

    net = create_backbone("test_resnet", pretrained=False)
    stores = [ImageStore(copy_store / "images" / split) for split in ("train", "val")]
    cfg = tiny_params(batch_size=16).train
    with pytest.raises(CnmcError, match="train.batch_size 16 is the global batch: it must divide by the 3"):
        Trainer(net.model, net.mean, net.std, *stores, cfg, 0, copy_store / "c.pt", "", 1, world=World(0, 3))


@pytest.mark.slow
def test_torchrun_across_two_nodes_in_two_checkouts(tiny_store: Path, tmp_path: Path) -> None:
    """Two "machines" on loopback: two checkouts, each with its own copy of the store (as `dvc pull`
    gives one), one c10d rendezvous; one model, one MLflow run of world size 2, written by rank 0's node.

    On one machine (``torchrun --standalone --nproc-per-node=2``) cnmc sees the same environment
    (RANK, WORLD_SIZE, a c10d store), so this test stands for both."""
    from helpers.local_server import free_port

    db, port = tmp_path / "mlflow.db", free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    nodes = [tmp_path / f"node{k}" for k in range(2)]
    for node in nodes:
        shutil.copytree(tiny_store, node / "outputs")
        (node / "params.yaml").write_text(render_params(tiny_params(epochs=2, batch_size=16), "test"))
    rendezvous = [
        "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=two-checkouts", "--local-addr=127.0.0.1",
    ]  # fmt: skip
    command = [str(BIN / "torchrun"), *rendezvous, "-m", "cnmc", "train", "--backbone", "test_resnet", "--quiet"]
    procs = [
        subprocess.Popen(command, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in nodes
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-2000:] + err[-3000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("cnmc-subject").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    for name in ("train_loss", "val_f1_macro"):  # each epoch logged once, by rank 0
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
    assert len(client.get_metric_history(run.info.run_id, "test_f1_all")) == 1
    written = [node / "outputs" / "runs" for node in nodes if (node / "outputs" / "runs" / "metrics").is_dir()]
    assert len(written) == 1  # rank 0's machine alone writes the model and evaluates
    (runs,) = written  # an ad hoc run: beside the pipeline's outs, reading its store
    checkpoints = sorted(p.name for p in (runs / "checkpoints" / "test_resnet").iterdir())
    assert checkpoints == ["checkpoint.pt", "mlflow_run_id"]  # one checkpoint, no temporary left
    assert (runs / "metrics" / "test_resnet.json").is_file() and (
        runs / "models" / "test_resnet" / "fit.json"
    ).is_file()
    assert sum(out.count("test F1 (ALL)") for out, _ in outputs) == 1  # rank 0 alone reports and evaluates
