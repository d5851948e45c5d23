"""The KL-VAE tokenizer (vqgen/tokenizers/kl.py): MAR's KL-16 shape and parameter count, the
diagonal Gaussian posterior (its KL against the closed form, its samples), dtypes, bad input.
Its outputs against the official code are in tests/test_convert_mar.py (vae_tiny.npz)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.tokenizers import LAST_LAYER, kl

# The sum over the parameters of LTH14/mar's AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)),
# built on torch's meta device from models/vae.py (66,456,019; the paper config has no other count).
OFFICIAL_KL16_PARAMS = 66_456_019


def tiny(**kw) -> kl.KLVAE:
    args = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_resolutions=(8,),
                decoder_attn_resolutions=(), resolution=16, embed_dim=3, norm_groups=4, kl_weight=0.5)
    return kl.KLVAE(**{**args, **kw})


def _images(n=4, side=16, c=1, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, side, side, c)), jnp.float32)


def test_kl16_has_the_official_parameter_count_and_layout():
    model = kl.KLVAE(**kl.VARIANTS["kl16"])
    assert kl.count_params(model, 256, 3) == OFFICIAL_KL16_PARAMS
    shapes = nn.meta.unbox(jax.eval_shape(lambda r, x: model.init({"params": r, "quantizer": r}, x),
                                          jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)))["params"]
    enc, dec = set(shapes["encoder"]), set(shapes["decoder"])
    assert {k for k in enc if "attn" in k} == {"down_4_attn_0", "down_4_attn_1", "mid_attn_1"}  # 16x16 only
    assert {k for k in dec if "attn" in k} == {"mid_attn_1"}
    assert shapes["quant_conv"]["kernel"].shape == (1, 1, 32, 32)
    assert shapes["post_quant_conv"]["kernel"].shape == (1, 1, 16, 16)
    assert shapes["encoder"]["conv_out"]["kernel"].shape == (3, 3, 512, 32)


def test_posterior_kl_loss_and_samples():
    model = tiny()
    x = _images()
    variables = model.init({"params": jax.random.key(0), "quantizer": jax.random.key(1)}, x)

    @jax.jit
    def run(variables, x):
        mean, logvar = model.apply(variables, x, method="posterior")
        out = model.apply(variables, x, method="encode")  # not training: the mean
        drawn = model.apply(variables, x, method="encode", sample_posterior=True, rngs={"quantizer": jax.random.key(2)})
        rec_train, _ = model.apply(variables, x, train=True, rngs={"quantizer": jax.random.key(2)})
        rec_eval, _ = model.apply(variables, x)
        dec = lambda z: model.apply(variables, z, method="decode")  # noqa: E731
        return dict(mean=mean, logvar=logvar, out=out, drawn=drawn.quantized, rec_train=rec_train,
                    rec_eval=rec_eval, dec_drawn=dec(drawn.quantized), dec_mean=dec(mean))

    r = run(variables, x)
    assert r["mean"].shape == (4, 8, 8, 3) and r["logvar"].shape == r["mean"].shape
    out = r["out"]
    np.testing.assert_array_equal(out.quantized, r["mean"])
    assert out.indices.shape == (4, 8, 8) and out.indices.dtype == jnp.int32 and not np.any(out.indices)
    m, lv = np.asarray(r["mean"], np.float64), np.asarray(r["logvar"], np.float64)
    kl_sum = 0.5 * np.sum(m**2 + np.exp(lv) - 1.0 - lv, axis=(1, 2, 3))  # LDM's KL to N(0, I), per example
    np.testing.assert_allclose(out.metrics["kl"], kl_sum.mean(), rtol=1e-5)
    np.testing.assert_allclose(out.loss, 0.5 * kl_sum.mean() / (16 * 16 * 1), rtol=1e-5)  # per image element
    eps = (np.asarray(r["drawn"]) - m) / np.exp(0.5 * lv)  # 768 standard normal draws
    assert abs(eps.mean()) < 0.15 and abs(eps.std() - 1.0) < 0.1
    # Training reconstructs from a posterior sample; evaluation from the mean.
    np.testing.assert_allclose(r["rec_train"], r["dec_drawn"], atol=1e-5)
    np.testing.assert_allclose(r["rec_eval"], r["dec_mean"], atol=1e-5)
    assert np.abs(np.asarray(r["rec_train"]) - np.asarray(r["rec_eval"])).max() > 1e-4
    assert nn.meta.unbox(variables["params"][LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]).ndim == 4


def test_dtypes_reach_every_layer():
    model = tiny(dtype=jnp.bfloat16)
    x = _images(2)
    variables = jax.jit(lambda x: model.init({"params": jax.random.key(0), "quantizer": jax.random.key(1)}, x))(x)
    assert {p.dtype for p in jax.tree.leaves(nn.meta.unbox(variables["params"]))} == {jnp.dtype(jnp.float32)}
    rec, q = jax.jit(model.apply)(variables, x)
    assert rec.dtype == jnp.bfloat16 and q.quantized.dtype == jnp.bfloat16 and q.loss.dtype == jnp.float32


def test_bad_input_is_one_sentence():
    model = tiny()
    x = _images(1)
    variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "quantizer": jax.random.key(1)}, x), x)
    with pytest.raises(ValueError, match="a KL tokenizer has no code ids; decode its latents with decode"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 8, 8), jnp.int32), method="decode_indices"), variables)
    with pytest.raises(ValueError, match=re.escape("latents of shape (1, 8, 8, 4) are not [B, h, w, 3]")):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 8, 8, 4)), method="decode"), variables)
    with pytest.raises(ValueError, match="image size 15x15 is not divisible by the downsampling factor 2"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 15, 15, 1)), method="encode"), variables)
    with pytest.raises(ValueError, match="scale_factor=0.0 must be positive; MAR uses 0.2325"):
        jax.eval_shape(lambda x: tiny(scale_factor=0.0).init(jax.random.key(0), x), x)
