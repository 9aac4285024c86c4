"""Two simulated nodes (ray.cluster_utils.Cluster): removing the node of one worker mid-run is survived."""

import json
import logging
import os
import time

import pytest

from train_support import (checkpoint_registered, make_shapes_dataset, run_in_thread, run_uri, tiny_config,
                           write_config)


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, worker_node
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_node_removed_mid_run_finishes_with_max_failures(two_nodes, tmp_path, caplog):
    cluster, worker_node = two_nodes
    caplog.set_level(logging.INFO, logger="pipeline.train.engine")
    make_shapes_dataset(str(tmp_path / "train"), images=16, seed=0)
    # SPREAD puts one worker on each node; after the removal both fit on the head (2 x 0.5 CPU)
    config = tiny_config(str(tmp_path / "train"), "", str(tmp_path / "runs"), "node-loss", max_failures=1,
                         placement_strategy="SPREAD", **{"schedule.max_iters": 10})
    path = write_config(tmp_path / "train.yaml", config)
    run = run_uri(config)
    thread, outcome = run_in_thread(path)
    deadline = time.monotonic() + 240
    while not checkpoint_registered(run, "checkpoint_0000002"):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no checkpoint before the node removal"
        time.sleep(0.2)
    cluster.remove_node(worker_node)
    thread.join(timeout=900)  # a restart takes minutes on a loaded 2-core machine
    assert not thread.is_alive(), "training did not finish after the node was removed"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["rc"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.train.engine"]
    assert any(line.startswith("resumed from") for line in lines), lines
    final = json.loads(open(os.path.join(run, "final_metrics.json")).read())
    assert final["iteration"] == 10
