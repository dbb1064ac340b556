"""Two "nodes" on localhost: two separate torchrun launches (``--nnodes 2``, one process each,
c10d rendezvous) join one gloo job through `peftlab train` and write one run to the shared
output_dir -- the README's multi-node commands, run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from tests.ranks import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_nodes_on_localhost_train_one_run(tiny_chat_model_dir, demo_data_dir, tmp_path):
    out = tmp_path / "shared_out"
    cfg = {"model": str(tiny_chat_model_dir), "method": {"name": "lora", "r": 4, "alpha": 8},
           "data": {"train": str(demo_data_dir["train"]), "max_rows": 16},
           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "log_every": 1,
                     "device": "cpu", "num_threads": 1},
           "output_dir": str(out)}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    port = free_port()
    nodes = [subprocess.Popen(
        [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
         "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "peftlab-test", "-m", "peftlab.cli", "train", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n\n".join(logs)
    # one optimizer step = one micro-batch on each of the 2 nodes: 16 rows / 4 = 4 micro-batches
    # per epoch, so 2 steps are one epoch (a single process would be half way)
    records = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["epoch"] == 1.0
    assert load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sum("saved adapter to" in log for log in logs) == 1  # rank 0 alone writes
