"""A simulated multi-node cluster (ray.cluster_utils.Cluster): placement, and a node lost mid-sweep."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

import refusal_ray
from refusal_ray.plan import make_plan
from refusal_ray.runner import run
from refusal_ray.store import Store
from refusal_ray.analysis.summary import summarize

from conftest import TOY_MODELS
from test_e2e import small_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {"gpu-a": c.add_node(num_cpus=1, num_gpus=1), "gpu-b": c.add_node(num_cpus=1, num_gpus=1),
             "highmem": c.add_node(num_cpus=1, resources={"highmem": 1})}
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def cluster_spec(tmp_path):
    spec = small_spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["models"].append({"name": "qwen-s", "path": str(TOY_MODELS / "toy-qwen-s"),
                          "resources": {"num_gpus": 0, "highmem": True}})
    spec.write_text(yaml.safe_dump(raw))
    return spec


def test_cells_land_where_the_plan_says_and_survive_a_lost_node(cluster, tmp_path):
    c, nodes = cluster
    node_id = {name: n.node_id for name, n in nodes.items()}
    plan = make_plan(cluster_spec(tmp_path))
    total = len(plan.cells)

    reference = tmp_path / "reference"
    assert run(plan, reference, address=c.address, progress=False, log=lambda m: None) == 0
    cells = refusal_ray.read(reference, "cells")
    assert set(cells.loc[cells["model"] == "qwen-s", "node"]) == {node_id["highmem"]}
    gpu_nodes = {node_id["gpu-a"], node_id["gpu-b"]}
    assert set(cells.loc[cells["model"] != "qwen-s", "node"]) <= gpu_nodes

    out = tmp_path / "lost-node"
    removed = threading.Event()
    removed_at = [float("inf")]

    per_model = plan.counts()
    by_id = {n.node_id: n for name, n in nodes.items() if name.startswith("gpu")}

    def remove_a_busy_gpu_node():
        """Once a GPU model has some cells done and many to go, remove the node that runs it."""
        deadline = time.time() + 300
        while time.time() < deadline:
            cells = Store(out).read("cells")
            if not cells.empty:
                for model, group in cells[cells["node"].isin(list(by_id))].groupby("model"):
                    todo = per_model[(model, "directions")] + per_model[(model, "steer")] - len(group)
                    if len(group) >= 1 and todo >= 6:
                        c.remove_node(by_id[group["node"].iloc[0]])
                        removed_at[0] = time.time()
                        removed.set()
                        return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_a_busy_gpu_node, daemon=True)
    remover.start()
    assert run(plan, out, address=c.address, progress=False, log=lambda m: None) == 0
    remover.join(timeout=10)
    assert removed.is_set()
    raw = pd.read_parquet(out / "cells")
    done = raw[raw["status"] == "done"]
    assert len(done) == total and done["cell_id"].is_unique              # every cell stored exactly once
    # the lost node really hosted work: a model's cells moved to another node, or a batch was retried
    assert (done.groupby("model")["node"].nunique() > 1).any() or (done["attempts"] > 1).any()
    lost = set(by_id) - {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(lost) == 1 and not (set(done.loc[done["finished"] > removed_at[0] + 1, "node"]) & lost)
    pd.testing.assert_frame_equal(summarize(out), summarize(reference))
