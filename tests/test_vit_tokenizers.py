"""ViT-VQGAN and TiTok (vqgen/tokenizers/vit.py): shapes, the tokenizer contract, gradients,
the paper configs' parameter counts (``jax.eval_shape`` only), one-sentence errors, and a tiny
TiTok through the real tokenizer phase."""
import functools
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen import config_lib, parallel
from vqgen.losses import adversarial as adv
from vqgen.quantizers import VectorQuantizer
from vqgen.tokenizers import vit
from vqgen.train import builders, common
from vqgen.train import tokenizer as tokenizer_lib

TINY = dict(enc_width=16, enc_depth=1, enc_heads=2, enc_mlp_dim=32, dec_width=24, dec_depth=1, dec_heads=2,
            dec_mlp_dim=48)


def _vitvqgan(**kw):
    q = VectorQuantizer(codebook_size=16, code_dim=4, l2_normalize=True)
    return vit.ViTVQGAN(quantizer=q, **{**dict(in_channels=1, image_size=16, patch_size=4), **TINY, **kw})


def _titok(**kw):
    q = VectorQuantizer(codebook_size=16, l2_normalize=True)
    base = dict(in_channels=1, image_size=16, patch_size=4, num_latent_tokens=6, token_size=4)
    return vit.TiTok(quantizer=q, **{**base, **TINY, **kw})


def _images(n=2, size=16, channels=1):
    return jax.random.uniform(jax.random.key(1), (n, size, size, channels), minval=-1.0, maxval=1.0)


MODELS = {"vit_vqgan": (_vitvqgan, (4, 4)), "titok": (_titok, (6,))}
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fast_jit(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without XLA:CPU's expensive passes (tiny models, one compile)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


def _loss(model, params, x):
    rec, q = model.apply({"params": params}, x, train=True)
    return jnp.mean(jnp.abs(rec - x)) + q.loss


def _everything(model, key, x):
    """init, __call__, encode, decode_indices and the gradient of one loss, in one program."""
    params = model.init(key, x)["params"]
    rec, q = model.apply({"params": params}, x)
    enc = model.apply({"params": params}, x, method="encode")
    from_ids = model.apply({"params": params}, q.indices, method="decode_indices")
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x))(params)
    return rec, q, enc, from_ids, loss, grads


@pytest.mark.parametrize("name", list(MODELS))
def test_contract_shapes_and_gradients_to_every_parameter(name):
    make, grid = MODELS[name]
    model, x = make(), _images()
    rec, q, enc, from_ids, loss, grads = _fast_jit(functools.partial(_everything, model), jax.random.key(0), x)
    chex.assert_shape(rec, x.shape)
    chex.assert_shape(q.indices, (2, *grid))
    assert q.indices.dtype == jnp.int32 and q.loss.shape == () and "usage" in q.metrics
    chex.assert_trees_all_equal(enc.indices, q.indices)
    chex.assert_trees_all_close(from_ids, rec, atol=1e-5)  # decode_indices(encode(x)) == __call__(x)
    assert builders.quantizer_codebook_size(model.quantizer) == 16 and np.isfinite(float(loss))
    for path, g in flax.traverse_util.flatten_dict(nn.meta.unbox(grads), sep="/").items():
        if path.endswith("attn/k/bias"):  # softmax is invariant to a per-query constant: zero gradient
            continue
        assert float(jnp.max(jnp.abs(g))) > 0, f"no gradient reaches {path}"


def test_titok_indices_are_a_1d_sequence_in_the_token_spec():
    config = config_lib.load_config("tokenizers/titok", "quickstart")
    spec = builders.token_spec(config)
    assert spec.grid == (32,) and spec.token_shape == (32,) and spec.seq_len == 32 and spec.vocab_size == 256


def _hand_count_vitvqgan(enc, dec, patch=8, channels=3, grid=32 * 32, codes=8192, code_dim=32):
    """ViT-VQGAN's parameters from the paper's sizes: pre-norm blocks with biased q/k/v/out and MLP."""
    def block(d, f):
        return 4 * (d * d + d) + 2 * 2 * d + d * f + f + f * d + d

    def stack(s):
        return s["depth"] * block(s["width"], s["mlp_dim"]) + grid * s["width"] + 2 * s["width"]

    e, d = vit.VITVQGAN_SIZES[enc], vit.VITVQGAN_SIZES[dec]
    p2c = patch * patch * channels
    encoder = stack(e) + p2c * e["width"] + e["width"] + e["width"] * e["mlp_dim"] + e["mlp_dim"] + e["mlp_dim"] * e["width"] + e["width"]
    decoder = stack(d) + e["width"] * d["width"] + d["width"] + d["width"] * d["mlp_dim"] + d["mlp_dim"] + d["mlp_dim"] * p2c + p2c
    quantizer = codes * code_dim + 2 * e["width"] * code_dim + code_dim + e["width"]
    return encoder + decoder + quantizer


# Official counts: bytedance/1d-tokenizer's TiTok built from configs/training/TiTok/stage2/*.yaml
# (and configs/infer/TiTok/titok_bl64_vq8k.yaml) on the torch meta device, sum of numel().
PAPER_COUNTS = [
    ("titok", "L-32", 641_054_735),
    ("titok", "B-64", 204_814_095),
    ("titok", "S-128", 83_674_639),
    ("titok", "BL-64-VQ", 390_016_148),
    ("vit_vqgan", "SS", _hand_count_vitvqgan("S", "S")),
    ("vit_vqgan", "BB", _hand_count_vitvqgan("B", "B")),
    ("vit_vqgan", "SL", _hand_count_vitvqgan("S", "L")),
]


@pytest.mark.parametrize("family,variant,expected", PAPER_COUNTS, ids=[f"{f}:{v}" for f, v, _ in PAPER_COUNTS])
def test_paper_config_parameter_counts(family, variant, expected):
    config = config_lib.load_config(f"tokenizers/{family}", variant)
    model = builders.build_tokenizer(config.tokenizer, config.data.channels)
    count = vit.count_params(model, config.data.image_size, config.data.channels)
    assert abs(count - expected) <= 0.02 * expected
    assert count == expected  # structurally identical, so exact


def test_titok_freeze_encoder_is_stage_two():
    model, x = _titok(freeze_encoder=True), _images()
    _, q, _, _, loss, grads = _fast_jit(functools.partial(_everything, model), jax.random.key(0), x)
    assert float(q.loss) == 0.0 and float(loss) > 0
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(grads), sep="/")
    frozen = [k for k in flat if k.split("/")[0] in ("encoder", "latent_tokens", "quantizer")]
    assert frozen and all(float(jnp.max(jnp.abs(flat[k]))) == 0 for k in frozen)
    assert float(jnp.max(jnp.abs(flat["decoder/conv_out/kernel"]))) > 0


def test_titok_proxy_code_head_decodes_through_maskgit_vqgan():
    model = _titok(patch_size=16, decoder_head="proxy_codes", legacy_token_layout=True)
    x = _images()
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert nn.meta.unbox(shapes["pixel_codebook"]).shape == (1024, 256)
    assert model.last_layer == ("pixel_decoder", "conv_out", "kernel")
    rec, q = jax.eval_shape(lambda p: model.apply({"params": p}, x), shapes)
    assert rec.shape == x.shape and q.indices.shape == (2, 6)
    logits = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="proxy_logits"), shapes, q.quantized)
    assert logits.shape == (2, 1, 1, 1024)


def test_bfloat16_activations_float32_params():
    model, x = _titok(dtype=jnp.bfloat16), _images()
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.meta.unbox(params)))
    rec, q = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
    assert rec.dtype == jnp.bfloat16 and q.quantized.dtype == jnp.bfloat16


def test_errors_are_one_sentence():
    x = _images()
    model = _titok()
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def run(*args, **kw):
        return jax.eval_shape(lambda p: model.apply({"params": p}, *args, **kw), params)

    with pytest.raises(ValueError, match="built for 6 tokens"):
        run(jnp.zeros((2, 5), jnp.int32), method="decode_indices")
    with pytest.raises(ValueError, match="built for 6 tokens"):
        run(jnp.zeros((2, 8, 4)), method="decode")
    with pytest.raises(ValueError, match="built for 16x16 images"):
        run(_images(size=32))
    with pytest.raises(ValueError, match="built for a 4x4 token grid"):
        vq = _vitvqgan()
        p = jax.eval_shape(vq.init, jax.random.key(0), x)["params"]
        jax.eval_shape(lambda p: vq.apply({"params": p}, jnp.zeros((2, 3, 3, 16)), method="decode"), p)
    for bad, match in ((_titok(patch_size=5), "not divisible by patch_size=5"),
                       (_vitvqgan(patch_size=3), "not divisible by patch_size=3"),
                       (_titok(decoder_head="logits"), "decoder_head"),
                       (_titok(decoder_head="proxy_codes"), "use patch_size=16")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(bad.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="unknown TiTok variant"):
        config_lib.load_config("tokenizers/titok", "XL-16")
    with pytest.raises(ValueError, match="unknown ViT-VQGAN variant"):
        config_lib.load_config("tokenizers/vit_vqgan", "SB")


def test_tiny_titok_trains_through_the_tokenizer_phase():
    """The quickstart TiTok at toy width: three steps of the real phase (GAN with the adaptive
    weight on ``decoder/conv_out``), finite metrics and a moving loss."""
    config = config_lib.load_config("tokenizers/titok", "quickstart")
    config.unlock()
    t = config.tokenizer
    t.enc_width = t.dec_width = 16
    t.enc_depth = t.dec_depth = 1
    t.enc_heads = t.dec_heads = 2
    t.enc_mlp_dim = t.dec_mlp_dim = 32
    t.patch_size, t.num_latent_tokens, t.quantizer.codebook_size = 8, 8, 32
    tt = config.tokenizer_train
    tt.batch_size, tt.num_steps, tt.warmup_steps, tt.lr = 8, 3, 0, 3e-3
    tt.disc = config_lib.disc_config(type="patchgan", ch=8, n_layers=1, weight=0.1, start_step=0,
                                     adaptive_weight=True)
    config.data.eval_examples = 8
    config.lock()
    phase = tokenizer_lib.build(config)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config.logical_rules)
    state, shardings = common.create_state(phase, mesh, rules)
    step = common.compile_phase(phase, mesh, shardings, max_traces=1)
    _, it = tokenizer_lib.make_data(config, "train", train=True)
    losses = []
    with parallel.mesh_context(mesh, rules):
        for _ in range(3):
            state, metrics = step(state, common.put_batch(next(it), mesh, phase.batch), jax.random.key(0), None)
            losses.append({k: float(v) for k, v in metrics.items()})
    assert all(math.isfinite(v) for m in losses for v in m.values())
    assert losses[-1]["d_weight"] > 0 and "q/usage" in losses[-1]
    assert losses[-1]["loss"] != losses[0]["loss"]
    assert np.isfinite(np.asarray(jax.device_get(state.params["decoder"]["conv_out"]["kernel"]))).all()


class _OwnLastLayer(nn.Module):
    """A tokenizer whose last layer is not the conv VQGAN's ``decoder/conv_out/kernel`` (it has no
    ``decoder`` at all): the trainer must read ``last_layer``."""

    quantizer: nn.Module
    last_layer = ("out", "kernel")

    @nn.compact
    def __call__(self, x, train=False):
        q = self.quantizer(nn.Dense(4, name="enc")(x), train=train)  # [B, H, W, 4]
        h = nn.Dense(8, name="mid")(q.quantized)
        return nn.Dense(x.shape[-1], name="out")(jnp.tanh(h)), q


@pytest.mark.parametrize("name", ["vit_vqgan", "titok", "titok_proxy"])
def test_vit_last_layer_names_a_parameter(name):
    """Each ViT tokenizer's ``last_layer`` is a kernel of its own tree (shapes only, no compile)."""
    model = _titok(patch_size=16, image_size=32, decoder_head="proxy_codes") if name == "titok_proxy" else MODELS[name][0]()
    size = 32 if name == "titok_proxy" else 16
    params = jax.eval_shape(model.init, jax.random.key(0), _images(size=size))["params"]
    leaf = functools.reduce(lambda t, k: t[k], model.last_layer, nn.meta.unbox(params))
    assert model.last_layer[-1] == "kernel" and leaf.ndim >= 2
    assert model.last_layer == (("pixel_decoder", "conv_out", "kernel") if name == "titok_proxy" else vit.LAST_LAYER)


def test_adaptive_gan_weight_reads_the_models_last_layer():
    """d_weight of the tokenizer step = ||g_rec|| / (||g_gan|| + eps) at ``model.last_layer``,
    the two gradients taken separately with jax.grad (a model without ``decoder/conv_out``)."""
    model = _OwnLastLayer(quantizer=VectorQuantizer(codebook_size=8, l2_normalize=True))
    disc = builders.build_discriminator(config_lib.disc_config(type="patchgan", ch=4, n_layers=1), 16)
    tx = disc_tx = common.make_optimizer(lr=1e-3, num_steps=2, schedule="constant")
    lc = tokenizer_lib.LossConfig(disc_weight=0.5, adaptive_weight=True)
    state = parallel.unbox(_fast_jit(functools.partial(
        tokenizer_lib.init_state, model=model, disc=disc, tx=tx, disc_tx=disc_tx, example=(16, 16, 1)),
        jax.random.key(0)))
    x, rng = _images(4), jax.random.key(3)

    def part(p, s, i):  # the reconstruction (i=0) or the GAN (i=1) side of the loss, as the step folds its rng
        (losses, _) = tokenizer_lib.generator_losses(p, s, x, jax.random.fold_in(rng, s.step), None,
                                                     model=model, disc=disc, lc=lc)
        return losses[i]

    def expected(s):
        at = lambda g: functools.reduce(lambda t, k: t[k], model.last_layer, g)
        return adv.adaptive_weight(at(jax.grad(part)(s.params, s, 0)), at(jax.grad(part)(s.params, s, 1)))

    step = functools.partial(tokenizer_lib.train_step, model=model, disc=disc, tx=tx, disc_tx=disc_tx, lc=lc)
    want, (_, metrics) = _fast_jit(lambda s: (expected(s), step(s, {"image": x, "label": jnp.zeros(4, jnp.int32)},
                                                                rng, None)), state)
    assert float(want) > 0
    np.testing.assert_allclose(metrics["d_weight"], want, rtol=1e-5)
