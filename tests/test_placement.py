"""The placement rule, without Ray."""

from __future__ import annotations

import pytest

from refusal_ray.pipeline.placement import GPU_SHARE, PlacementError, place
from refusal_ray.spec import ModelSpec, Resources

GiB = 2**30


def model(**resources):
    return ModelSpec(name="m", path="x", resources=resources or None)


def test_small_models_share_a_gpu_and_big_ones_take_one():
    cluster = {"CPU": 8, "GPU": 2}
    assert place(model(), 10**6, 10**7, Resources(), cluster).num_gpus == GPU_SHARE
    big = place(model(), 7 * 10**9, 15 * GiB, Resources(), cluster)
    assert (big.num_gpus, big.resources, big.memory, big.device) == (1, {}, None, "auto")


def test_cpu_cluster_sends_big_models_to_highmem_with_honest_memory():
    cluster = {"CPU": 8, "highmem": 1}
    small = place(model(), 10**6, 10**7, Resources(), cluster)
    assert (small.num_gpus, small.resources, small.memory, small.device) == (0, {}, 10**7, "cpu")
    big = place(model(), 3 * 10**9, 14 * GiB, Resources(), cluster)
    assert big.resources == {"highmem": 1} and big.memory == 14 * GiB
    assert big.ray_options() == {"num_cpus": 1, "num_gpus": 0.0, "resources": {"highmem": 1}, "memory": 14 * GiB}
    assert big.describe() == "1 CPU + highmem, memory 14.0 GiB"


def test_model_block_overrides_the_rule():
    cluster = {"CPU": 8, "GPU": 4, "highmem": 1}
    p = place(model(num_gpus=2, num_cpus=4), 10**6, 10**7, Resources(), cluster)
    assert (p.num_gpus, p.num_cpus) == (2, 4)
    forced = place(model(num_gpus=0, highmem=True), 10**6, 10**7, Resources(), cluster)
    assert forced.resources == {"highmem": 1} and forced.device == "cpu"


def test_infeasible_placement_fails_fast():
    with pytest.raises(PlacementError, match="model 'm' needs 1 highmem but the cluster has 0"):
        place(model(), 3 * 10**9, 14 * GiB, Resources(), {"CPU": 8})
    with pytest.raises(PlacementError, match="model 'm' needs 2 GPU but the cluster has 1"):
        place(model(num_gpus=2), 10**6, 10**7, Resources(), {"CPU": 8, "GPU": 1})


def test_replicas_fill_spare_slots_for_the_busiest_model():
    from refusal_ray.cluster.driver import replica_counts
    from refusal_ray.pipeline.placement import Placement

    cpu = Placement(num_cpus=1, num_gpus=0.0)
    # one model, two CPUs: two replicas; but never fewer than two batches per replica
    assert replica_counts({"a": cpu}, {"a": 10}, {"CPU": 2}) == {"a": 2}
    assert replica_counts({"a": cpu}, {"a": 3}, {"CPU": 8}) == {"a": 1}
    # four models on two CPUs: one each (the rest queue in Ray until a model's actor is released)
    assert replica_counts({m: cpu for m in "abcd"}, dict.fromkeys("abcd", 10), {"CPU": 2}) == dict.fromkeys("abcd", 1)
    # GPU shares: 4 slots on one GPU, two models; the busier one gets the spare slots
    gpu = Placement(num_cpus=1, num_gpus=0.25)
    assert replica_counts({"a": gpu, "b": gpu}, {"a": 40, "b": 4}, {"CPU": 16, "GPU": 1}) == {"a": 3, "b": 1}


@pytest.mark.parametrize("model,gpus,want", [
    ({"device": "auto"}, 0, {"device": "cpu", "device_map": None}),
    ({"device": "auto"}, 1, {"device": "cuda", "device_map": None}),
    ({"device": "auto"}, 4, {"device": "cuda", "device_map": "auto"}),       # num_gpus: 4 -> split across them
    ({"device": "cpu"}, 2, {"device": "cpu", "device_map": None}),
    ({"device": "auto", "device_map": {"": "cpu"}}, 2, {"device": "cpu", "device_map": {"": "cpu"}}),
])
def test_worker_device_from_visible_gpus(model, gpus, want):
    from refusal_ray.session import placement_kwargs

    assert placement_kwargs(model, gpus) == want
