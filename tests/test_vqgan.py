"""Conv tokenizer (vqgen.tokenizers.vqgan) and its blocks (vqgen.modules.conv)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.modules import conv as C
from vqgen.quantizers.lfq import LookupFreeQuantizer
from vqgen.quantizers.vq import VectorQuantizer
from vqgen.tokenizers import vqgan as V


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _init(model, x, seed=0):
    """Random variables of the right structure without compiling ``init``.

    Compiling a random initialiser is slow on CPU (tens of seconds for the threefry kernels of
    a few dozen parameters), so tests take the structure from ``jax.eval_shape(model.init)``
    (which keeps the logical-axis boxes) and fill it on the host: kernels U(+-1/sqrt(fan_in)),
    norm scales around 1, biases and codebooks small. ``test_real_init`` runs ``init`` itself.
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.float32(1.0) + 0.1 * rng.standard_normal(leaf.shape, np.float32)
        if leaf.ndim == 1 or name == "codebook":
            return 0.1 * rng.standard_normal(leaf.shape, np.float32)
        bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
        return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)

    values = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))
    return abstract, jax.tree.map(jnp.asarray, values)


@pytest.fixture(scope="module")
def quickstart():
    model = V.build("quickstart", VectorQuantizer(codebook_size=64, l2_normalize=True))
    x = _images((2, 32, 32, 1))
    abstract, variables = _init(model, x)
    return model, abstract, variables, x


def test_real_init():
    model = V.VQGAN(quantizer=VectorQuantizer(codebook_size=4), in_channels=1, ch=4, ch_mult=(1,), num_res_blocks=1,
                    z_channels=4, embed_dim=2, norm_groups=2, dtype=jnp.bfloat16)
    # An rbg key: XLA:CPU compiles threefry initialisers several times slower.
    variables = jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), jnp.zeros((1, 4, 4, 1)))
    leaves = jax.tree.leaves(nn.meta.unbox(variables))
    assert leaves and all(a.dtype == jnp.float32 and np.all(np.isfinite(a)) for a in leaves)
    kernel = nn.meta.unbox(variables["params"]["encoder"]["conv_in"]["kernel"])  # [3, 3, 1, 4]
    assert float(jnp.abs(kernel).max()) <= 1.0 / 3.0 and float(jnp.abs(kernel).max()) > 0.0  # 1/sqrt(fan_in = 9)


def test_quickstart_shapes_and_contract(quickstart):
    model, _, variables, x = quickstart

    @jax.jit
    def run(v, x):
        x_rec, out = model.apply(v, x)
        enc = model.apply(v, x, method="encode")
        dec = model.apply(v, enc.quantized, method="decode")
        return x_rec, out, enc, dec, model.apply(v, enc.indices, method="decode_indices")

    x_rec, out, enc, dec, dec_idx = run(variables, x)
    chex.assert_shape(x_rec, (2, 32, 32, 1))
    chex.assert_shape(out.indices, (2, 8, 8))
    chex.assert_shape(out.quantized, (2, 8, 8, 8))
    assert out.indices.dtype == jnp.int32 and out.loss.dtype == jnp.float32 and out.loss.shape == ()
    assert np.all(np.isfinite(np.asarray(x_rec)))
    # encode / decode / decode_indices agree with each other and with __call__.
    np.testing.assert_array_equal(enc.indices, out.indices)
    np.testing.assert_allclose(dec_idx, dec, atol=1e-5)
    np.testing.assert_allclose(dec, x_rec, atol=1e-5)
    assert V.count_params(model, 32, 1) == sum(a.size for a in jax.tree.leaves(nn.meta.unbox(variables["params"])))


def test_logical_axes_and_last_layer(quickstart):
    model, abstract, variables, x = quickstart
    specs = nn.get_partition_spec(abstract["params"])
    assert tuple(specs["decoder"]["conv_out"]["kernel"]) == ("height", "width", "conv_in", "conv_out")
    assert tuple(specs["encoder"]["down_0_block_0"]["norm1"]["scale"]) == ("conv_out",)
    assert tuple(specs["quant_conv"]["kernel"]) == ("height", "width", "conv_in", "conv_out")
    kernel = V.last_layer_kernel(variables)
    assert kernel is V.last_layer_kernel(variables["params"])
    assert kernel is variables["params"]["decoder"]["conv_out"]["kernel"]
    chex.assert_shape(kernel, (3, 3, 8, 1))  # 3x3 conv from ch * ch_mult[0] = 8 channels to 1
    # It is the decoder's output layer: zeroing it (and its bias) zeroes the reconstruction.
    params = jax.tree.map(lambda a: a, variables["params"])
    params["decoder"]["conv_out"] = jax.tree.map(jnp.zeros_like, params["decoder"]["conv_out"])
    x_rec = jax.jit(lambda p, q: model.apply({"params": p}, q, method="decode"))(params, jnp.ones((1, 8, 8, 8)))
    assert float(jnp.abs(x_rec).max()) == 0.0


def test_gradient_reaches_encoder_and_bf16():
    model = V.VQGAN(quantizer=VectorQuantizer(codebook_size=16), in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), resolution=8, z_channels=8, embed_dim=4, norm_groups=4, dtype=jnp.bfloat16)
    x = _images((2, 8, 8, 1))
    abstract, variables = _init(model, x, seed=1)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.meta.unbox(abstract)))  # param_dtype
    params = variables["params"]

    def loss_fn(params):
        (x_rec, out), state = model.apply({"params": params}, x, train=True, capture_intermediates=True)
        return jnp.mean((x_rec.astype(jnp.float32) - x) ** 2) + out.loss, (x_rec, state["intermediates"])

    grads, (x_rec, inter) = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
    assert x_rec.dtype == jnp.bfloat16
    conv_outs = [
        leaf for path, leaf in jax.tree_util.tree_leaves_with_path(inter)
        if any(getattr(k, "key", None) in ("conv1", "conv2", "conv_out", "conv_in", "q") for k in path)
    ]
    assert len(conv_outs) > 10 and all(a.dtype == jnp.bfloat16 for a in conv_outs)
    assert "down_1_attn_0" in params["encoder"] and "up_1_attn_1" in params["decoder"]  # attention at 4x4
    g_in = nn.meta.unbox(grads["encoder"]["conv_in"]["kernel"])
    assert g_in.dtype == jnp.float32 and float(jnp.abs(g_in).sum()) > 0.0  # straight-through worked
    assert float(jnp.abs(nn.meta.unbox(grads["quantizer"]["codebook"])).sum()) > 0.0


@pytest.mark.parametrize("style", ["maskgit", "magvit2"])
def test_other_styles_decode_indices(style):
    if style == "maskgit":
        q = VectorQuantizer(codebook_size=32)
        kw = dict(style="maskgit", use_quant_conv=False, z_channels=16, embed_dim=16, num_res_blocks=1)
    else:
        q = LookupFreeQuantizer(dim=6)
        kw = dict(style="magvit2", use_quant_conv=False, z_channels=6, embed_dim=6, num_res_blocks=1)
    model = V.VQGAN(quantizer=q, in_channels=3, ch=8, ch_mult=(1, 2), resolution=16, norm_groups=4, **kw)
    x = _images((2, 16, 16, 3), seed=2)
    _, variables = _init(model, x, seed=2)

    def run(v, x):
        x_rec, out = model.apply(v, x)
        return x_rec, out.indices, model.apply(v, out.indices, method="decode_indices")

    x_rec, idx, dec_idx = jax.jit(run)(variables, x)
    chex.assert_shape(x_rec, (2, 16, 16, 3))
    chex.assert_shape(idx, (2, 8, 8))
    np.testing.assert_allclose(dec_idx, x_rec, atol=1e-5)
    p = variables["params"]
    assert "quant_conv" not in p and not any("attn" in k for k in p["encoder"]) and not any("attn" in k for k in p["decoder"])
    if style == "maskgit":
        assert "down_0_downsample" not in p["encoder"]  # parameter-free average pooling
        # MaskGIT's shortcut acts on the branch output: a C_out x C_out 1x1 kernel, no bias.
        assert set(p["encoder"]["down_1_block_0"]["nin_shortcut"]) == {"kernel"}
        assert "bias" not in p["encoder"]["conv_in"] and "bias" in p["decoder"]["conv_in"]
        chex.assert_shape(p["encoder"]["down_1_block_0"]["nin_shortcut"]["kernel"], (1, 1, 16, 16))
        assert set(p["decoder"]) >= {"up_0_block_0", "up_1_block_0"} and "up_0_block_1" not in p["decoder"]
    else:
        assert "up_1_adaptive" in p["decoder"] and "up_0_adaptive" in p["decoder"]
        chex.assert_shape(p["decoder"]["up_1_upsample"]["conv"]["kernel"], (3, 3, 16, 64))


def _maskgit_count(f=128, mults=(1, 1, 2, 2, 4), n=2, emb=256, codes=1024):
    """Parameters of MaskGIT's VQVAE, counted by hand from maskgit/nets/vqgan_tokenizer.py."""
    def res(cin, c):  # GN(cin), 3x3 no-bias, GN(c), 3x3 no-bias, 1x1 no-bias c->c shortcut
        return 2 * cin + 9 * cin * c + 2 * c + 9 * c * c + (c * c if cin != c else 0)

    total, cin = 9 * 3 * f, f  # encoder conv_in has no bias
    for m in mults:
        for _ in range(n):
            total, cin = total + res(cin, f * m), f * m
    total += n * res(cin, cin) + 2 * cin + cin * emb + emb  # mid, GN, 1x1 conv to emb
    total += 9 * emb * cin + cin + n * res(cin, cin)  # decoder conv_in, mid
    for i in reversed(range(len(mults))):
        for _ in range(n):
            total, cin = total + res(cin, f * mults[i]), f * mults[i]
        if i > 0:
            total += 9 * cin * cin + cin  # nearest x2 + 3x3 conv
    return total + 2 * cin + 9 * cin * 3 + 3 + codes * emb


def _llamagen_count(f=128, mults=(1, 1, 2, 2, 4), n=2, z=256, e=8, codes=16384):
    """Parameters of LlamaGen's VQModel, counted by hand from tokenizer_image/vq_model.py."""
    def res(cin, c):
        return 2 * cin + 9 * cin * c + c + 2 * c + 9 * c * c + c + ((cin * c + c) if cin != c else 0)

    def attn(c):
        return 2 * c + 4 * (c * c + c)

    last = len(mults) - 1
    total, cin = 9 * 3 * f + f, f
    for i, m in enumerate(mults):
        for _ in range(n):
            total, cin = total + res(cin, f * m) + (attn(f * m) if i == last else 0), f * m
        if i < last:
            total += 9 * cin * cin + cin
    total += 2 * res(cin, cin) + attn(cin) + 2 * cin + 9 * cin * z + z
    total += 2 * z * e + e + z  # quant_conv, post_quant_conv
    total += 9 * z * cin + cin + 2 * res(cin, cin) + attn(cin)
    for i in reversed(range(len(mults))):
        for _ in range(n + 1):
            total, cin = total + res(cin, f * mults[i]) + (attn(f * mults[i]) if i == last else 0), f * mults[i]
        if i > 0:
            total += 9 * cin * cin + cin
    return total + 2 * cin + 9 * cin * 3 + 3 + codes * e


def test_official_variant_parameter_counts():
    """eval_shape counts equal hand counts from the official code; LlamaGen reports VQ-16 as 72M."""
    llamagen = V.build("llamagen_vq16", VectorQuantizer(codebook_size=16384, l2_normalize=True))
    n_llamagen = V.count_params(llamagen, 256, 3)
    maskgit = V.build("maskgit", VectorQuantizer(codebook_size=1024))
    n_maskgit = V.count_params(maskgit, 256, 3)
    magvit2 = V.build("open_magvit2", LookupFreeQuantizer(dim=18, num_groups=2))
    n_magvit2 = V.count_params(magvit2, 256, 3)
    print(f"\nparams: llamagen_vq16={n_llamagen:,} maskgit={n_maskgit:,} open_magvit2={n_magvit2:,}")
    assert n_llamagen == _llamagen_count() and round(n_llamagen / 1e6) == 72
    assert n_maskgit == _maskgit_count()


def test_bad_input_messages():
    def init(x, **overrides):
        model = V.build("quickstart", VectorQuantizer(codebook_size=8), **overrides)
        return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x))

    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        init((1, 30, 30, 1))
    with pytest.raises(ValueError, match=r"expects images \[B, H, W, 1\]"):
        init((1, 32, 32, 3))
    with pytest.raises(ValueError, match="style 'nope' is unknown"):
        init((1, 32, 32, 1), style="nope")
    with pytest.raises(ValueError, match="not divisible by 32 GroupNorm groups"):
        init((1, 32, 32, 1), norm_groups=32)
    with pytest.raises(ValueError, match="use_quant_conv is False"):
        init((1, 32, 32, 1), use_quant_conv=False)
    with pytest.raises(ValueError, match="variant 'big' is unknown"):
        V.build("big", VectorQuantizer(codebook_size=8))


# ---- blocks against an independent PyTorch (NCHW) computation ---------------------------------


def _t(a):
    import torch

    return torch.from_numpy(np.asarray(a, np.float32))


def _tconv(x, p, stride=1, padding=1):
    """PyTorch conv2d with a Flax HWIO kernel (-> OIHW)."""
    import torch.nn.functional as F

    w = _t(p["kernel"]).permute(3, 2, 0, 1)
    return F.conv2d(x, w, _t(p["bias"]) if "bias" in p else None, stride=stride, padding=padding)


def _tgn(x, p, groups):
    import torch.nn.functional as F

    return F.group_norm(x, groups, _t(p["scale"]), _t(p["bias"]), eps=1e-6)


def test_blocks_match_pytorch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.asarray(_images((2, 6, 6, 8), seed=3))
    xt = _t(x).permute(0, 3, 1, 2)
    to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    silu = F.silu

    # ResnetBlock (taming: bias, nin shortcut) and MaskGIT's (no bias, shortcut on the output).
    for from_output in (False, True):
        block = C.ResnetBlock(16, use_bias=not from_output, shortcut_from_output=from_output, norm_groups=4)
        p = _init(block, x, seed=4)[1]["params"]
        y = block.apply({"params": p}, x)
        h = _tconv(silu(_tgn(xt, p["norm1"], 4)), p["conv1"])
        h = _tconv(silu(_tgn(h, p["norm2"], 4)), p["conv2"])
        ref = h + _tconv(h if from_output else xt, p["nin_shortcut"], padding=0)
        np.testing.assert_allclose(y, to_nhwc(ref), atol=1e-4, rtol=1e-4)

    # AttnBlock: softmax(q k^T / sqrt(C)) v, proj_out, residual.
    attn = C.AttnBlock(norm_groups=4)
    p = _init(attn, x, seed=5)[1]["params"]
    h = _tgn(xt, p["norm"], 4)
    q, k, v = (_tconv(h, p[n], padding=0).flatten(2) for n in "qkv")  # [B, C, L]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 8**-0.5, dim=-1)
    ref = xt + _tconv(torch.einsum("bij,bcj->bci", w, v).reshape(xt.shape), p["proj_out"], padding=0)
    np.testing.assert_allclose(attn.apply({"params": p}, x), to_nhwc(ref), atol=1e-4, rtol=1e-4)

    # Downsample: taming's F.pad(0, 1, 0, 1) + stride-2 valid conv; Open-MAGVIT2's padding-1 conv.
    for mode, ref_fn in [
        ("conv_asym", lambda t, p: _tconv(F.pad(t, (0, 1, 0, 1)), p, stride=2, padding=0)),
        ("conv", lambda t, p: _tconv(t, p, stride=2, padding=1)),
        ("avgpool", lambda t, p: F.avg_pool2d(t, 2)),
    ]:
        down = C.Downsample(mode)
        p = _init(down, x, seed=6)[1].get("params", {})
        y = down.apply({"params": p}, x)
        np.testing.assert_allclose(y, to_nhwc(ref_fn(xt, p.get("conv"))), atol=1e-4, rtol=1e-4)

    # Upsample: nearest x2 + conv; Open-MAGVIT2's conv to 4C + DCR depth-to-space.
    up = C.Upsample("nearest_conv")
    p = _init(up, x, seed=7)[1]["params"]
    ref = _tconv(F.interpolate(xt, scale_factor=2.0, mode="nearest"), p["conv"])
    np.testing.assert_allclose(up.apply({"params": p}, x), to_nhwc(ref), atol=1e-4, rtol=1e-4)
    # Open-MAGVIT2's AdaptiveGroupNorm: Linear(std of z) * GN(x) + Linear(mean of z).
    z = np.asarray(_images((2, 3, 3, 5), seed=8))
    agn = C.AdaptiveGroupNorm(norm_groups=4)
    abstract = jax.eval_shape(agn.init, jax.random.key(0), x, z)
    rng = np.random.default_rng(9)
    p = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), nn.meta.unbox(abstract)["params"])
    zt = _t(z).permute(0, 3, 1, 2).flatten(2)  # [B, Dz, L]
    lin = lambda v, q: v @ _t(q["kernel"]) + _t(q["bias"])  # noqa: E731
    scale, shift = lin((zt.var(dim=-1) + 1e-6).sqrt(), p["gamma"]), lin(zt.mean(dim=-1), p["beta"])
    ref = scale[:, :, None, None] * F.group_norm(xt, 4, eps=1e-6) + shift[:, :, None, None]
    np.testing.assert_allclose(agn.apply({"params": p}, x, z), to_nhwc(ref), atol=1e-4, rtol=1e-4)

    d2s = np.asarray(C.depth_to_space(jnp.asarray(x), 2))  # 8 channels -> 2
    for i in range(2):
        for j in range(2):
            for c in range(2):  # torch DCR: channel (i*2 + j) * C' + c -> sub-pixel (i, j) of c
                np.testing.assert_array_equal(d2s[:, i::2, j::2, c], x[..., (i * 2 + j) * 2 + c])
