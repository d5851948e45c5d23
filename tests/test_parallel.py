"""Mesh creation, logical-axis sharding and batch sharding on 8 simulated CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vqgen import parallel


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape,expected", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)),
                                            ((1, 1, -1), (1, 1, 8)), ((2, 2, 2), (2, 2, 2))])
def test_mesh_shape_auto_fill(shape, expected):
    mesh = parallel.create_mesh(shape)
    assert tuple(mesh.shape[a] for a in parallel.MESH_AXES) == expected
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape,match", [((-1, -1, 1), "more than one -1"), ((3, -1, 1), "does not fit"),
                                         ((2, 2, 1), "uses 4 of 8"), ((8, 1), "3 entries")])
def test_bad_mesh_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        parallel.create_mesh(shape)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")))(x)
        return nn.Dense(6, kernel_init=nn.with_logical_partitioning(nn.initializers.normal(), ("mlp", "embed")))(x)


def test_logical_sharding_follows_rules_and_drops_indivisible_axes():
    mesh = parallel.create_mesh((2, 4, 1))
    abstract = jax.eval_shape(_Net().init, jax.random.key(0), jnp.ones((8, 8)))
    sh = parallel.logical_to_sharding(abstract, mesh)
    assert sh["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")  # 8 % 4 == 0
    assert sh["params"]["Dense_1"]["kernel"].spec == P("tensor", None)  # 6 % 4 != 0: replicated
    assert sh["params"]["Dense_0"]["bias"].spec == P(None)


def test_shard_batch_splits_over_data_axes_and_checks_divisibility():
    mesh = parallel.create_mesh((2, 4, 1))
    batch = parallel.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert len(batch["x"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.shard_batch({"x": np.zeros((6, 2))}, mesh)
