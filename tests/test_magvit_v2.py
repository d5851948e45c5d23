"""MAGVIT-v2's image-and-video layout of the causal 3D tokenizer (``first_frame=True``): frame 0
is encoded alone, so an image and the first frame of a video that starts with it share tokens.

Every model is initialised and applied inside one jitted function per test to keep compiles few.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.modules.conv3d import Downsample3D, Upsample3D, avg_pool_3d
from vqgen.quantizers.lfq import LookupFreeQuantizer
from vqgen.tokenizers import magvit


def _video(seed, shape):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _model(**overrides):
    """Two temporal halvings (factor 4): 1 + 4k frames -> 1 + k token frames of 8 LFQ bits."""
    kw = dict(in_channels=1, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
              causal=True, first_frame=True, z_channels=8, embed_dim=8, num_frames=9, resolution=8, norm_groups=4)
    return magvit.MAGVIT(quantizer=LookupFreeQuantizer(dim=8, bit_order="lsb", entropy_eps=1e-5),
                         **{**kw, **overrides})


@pytest.mark.parametrize("down_mode", ["avgpool", "conv"])
def test_an_image_and_the_first_frame_of_a_video_share_their_tokens(down_mode):
    model = _model(down_mode=down_mode)
    video = _video(0, (2, 9, 8, 8, 1))  # frame 0, then two blocks of 4
    image = video[:, :1]  # [2, 1, 8, 8, 1]
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.asarray(video))["params"])()

    @jax.jit
    def run(params):
        v = model.apply({"params": params}, video, method="encode")
        i = model.apply({"params": params}, image, method="encode")
        rec_v = model.apply({"params": params}, v.quantized, method="decode")
        rec_i = model.apply({"params": params}, i.quantized, method="decode")
        return v, i, rec_v, rec_i

    v, i, rec_v, rec_i = run(params)
    assert v.indices.shape == (2, 3, 2, 2) and i.indices.shape == (2, 1, 2, 2)
    assert model.token_shape(9, 8) == (3, 2, 2) and model.token_shape(1, 8) == (1, 2, 2)
    np.testing.assert_array_equal(i.indices[:, 0], v.indices[:, 0])
    np.testing.assert_allclose(i.quantized[:, 0], v.quantized[:, 0], atol=1e-6)
    assert rec_v.shape == video.shape and rec_i.shape == image.shape
    # Decoding is causal in the same layout: frame 0 comes from token frame 0 alone.
    np.testing.assert_allclose(rec_i[:, 0], rec_v[:, 0], atol=1e-5)
    # The tokens are not all alike (the comparison above is not between constants).
    assert len(np.unique(np.asarray(v.indices))) > 1


def test_token_frame_k_sees_frame_0_and_the_blocks_up_to_k_only():
    model = _model()
    video = _video(1, (1, 9, 8, 8, 1))
    later = video.copy()
    later[:, 5:] = _video(2, (1, 4, 8, 8, 1))  # change the second block of 4 only
    first = video.copy()
    first[:, :1] = _video(3, (1, 1, 8, 8, 1))  # change frame 0 only
    both = np.concatenate([video, later, first])
    params = jax.jit(lambda: model.init(jax.random.key(1), jnp.asarray(both))["params"])()
    rec, out = jax.jit(lambda p: model.apply({"params": p}, both))(params)
    z = np.asarray(out.quantized)
    np.testing.assert_allclose(z[1, :2], z[0, :2], atol=1e-6)  # frames 0-4 unchanged -> token frames 0, 1
    assert not np.allclose(z[1, 2], z[0, 2], atol=1e-4)
    np.testing.assert_allclose(np.asarray(rec)[1, :5], np.asarray(rec)[0, :5], atol=1e-5)
    assert not np.allclose(z[2, 0], z[0, 0], atol=1e-4)  # frame 0 is seen


def test_first_frame_down_and_upsampling_layouts():
    x = _video(4, (1, 5, 4, 4, 2))
    pooled = avg_pool_3d(jnp.asarray(x), temporal=True, first_frame=True)  # [1, 3, 2, 2, 2]
    assert pooled.shape == (1, 3, 2, 2, 2)
    np.testing.assert_allclose(pooled[:, 0], x[:, 0].reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4)), atol=1e-6)
    np.testing.assert_allclose(pooled[:, 1], x[:, 1:3].reshape(1, 2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5)),
                               atol=1e-6)
    down = Downsample3D(temporal=True, mode="conv", causal=True, first_frame=True)
    y, _ = down.init_with_output(jax.random.key(0), jnp.asarray(x))
    assert y.shape == (1, 3, 2, 2, 2)
    up = Upsample3D(temporal=True, causal=True, first_frame=True)
    z, _ = up.init_with_output(jax.random.key(0), jnp.asarray(x[:, :3]))
    assert z.shape == (1, 5, 8, 8, 2)  # 1 + 2 * 2 frames


def test_bad_first_frame_settings_are_one_sentence():
    with pytest.raises(ValueError, match="needs causal=True"):
        _model(causal=False).init(jax.random.key(0), jnp.zeros((1, 9, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"use 1 \+ k\*4 frames"):
        _model().init(jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)))
