"""Makes ``tests/fixtures/maskgit/maskgit_tiny.npz``: golden outputs of the official MaskGIT code
(tiny, random weights).

    git clone https://github.com/google-research/maskgit /tmp/maskgit
    python tools/make_maskgit_fixture.py --maskgit-repo /tmp/maskgit

Models, built on CPU in float32 from the checkout's ``maskgit/nets/vqgan_tokenizer.py`` and
``maskgit/nets/maskgit_transformer.py`` with ``maskgit/configs/maskgit_class_cond_config.py``
(the released settings: GroupNorm, swish, average-pool downsampling, plain VQ), sizes made small:

- ``tok``: ``VQVAE`` with the released channel multipliers (1, 1, 2, 2, 4) and 2 res blocks, but
  32 filters and 64 codes of width 16; a 64x64 image has a 4x4 token grid.
- ``tok_b``: multipliers (1, 2, 4), 1 res block, 32 filters, 32 codes of width 8 (32x32 images,
  8x8 tokens).
- ``transformer``: ``Transformer`` with 2 layers, width 64, 4 heads, MLP 128, over 64 codes +
  10 classes + the mask token (vocabulary 75) and a 4x4 grid (17 positions with the class
  token), as ``inference.py`` builds it (``vocab_size = codebook + classes + 1``,
  ``max_position_embeddings = grid + 1``).

The official code runs unchanged on this JAX/Flax except two shims applied here (not to the
checkout): ``jnp.DeviceArray`` (used only in ``parallel_decode``'s type annotations) is aliased
to ``jax.Array``, and ``VQVAE.__call__`` (which decodes the ``(quantized, dict)`` tuple that
``encode`` returns) is bypassed: the parameters are initialised through ``encode`` then
``decode``, and the outputs are computed with the methods ``inference.py`` calls.

The weights are not stored: the ``.npz`` holds a manifest of every parameter (its path in the
Flax tree, ``/``-joined, in the tree's order), and each is ``standard_normal(shape) * scale +
offset`` drawn in manifest order from ``numpy.random.RandomState(seed)``, with a per-parameter
scale chosen so that every parameter matters. The test rebuilds each ``{"params": tree}`` and
serialises it with ``flax.serialization.msgpack_serialize``: the bytes of a released checkpoint
(``utils.restore_from_path`` reads them back with ``flax.serialization.from_bytes(None, ...)``).

Outputs (official layouts, NHWC images in [0, 1] as the released tokenizer takes them):
``image`` / ``image_b`` (inputs), ``{tok,tok_b}_tokens`` (``encode_to_indices``), ``_quant`` (the
quantized latents of ``encode``), ``_recon`` (``decode`` of them), ``_decoded``
(``decode_from_indices`` of ``codes`` / ``codes_b``, random code grids); ``margin`` is the relative
perturbation of the encoder outputs (1e-4) under which the tokens were checked not to change.
``input_ids`` ``[B, 17]`` (class token ``K + label`` first, image tokens with ``mask_token_id = -1``
at the masked positions, as ``create_latent_mask_and_input_tokens_for_image_editing`` builds them)
and ``logits`` ``[B, 17, 75]`` (``Transformer.apply(..., deterministic=True)``; checked equal to the
logits with the mask written as ``K + C``, the last row). ``decode_*``: the official
``parallel_decode.decode`` run on ``decode_input_ids`` (a class token, some known and some masked
tokens) with ``choice_temperature`` 4.5 and ``decode_steps`` iterations, the transformer's
``logits[..., :K]`` as in ``inference.py``; ``decode_masked`` ``[B, T]`` is how many positions it
re-masked after each iteration (recorded from ``mask_by_random_topk``'s output; it does not depend
on the random draws) and ``decode_tokens`` its last iteration's tokens (which do).

The manifest also lists the parameter paths and shapes of the released checkpoints
(``tokenizer_imagenet{256,512}_checkpoint``: the tokenizer of ``vqgan_config``;
``maskgit_imagenet{256,512}_checkpoint``: the transformer of ``maskgit_class_cond_config`` with 257
or 1025 positions), from ``jax.eval_shape`` of the official modules, which the test compares with
the converter's manifests.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "maskgit", "maskgit_tiny.npz")

CONFIG = dict(
    batch=2, labels=(3, 7), decode_labels=(1, 8), decode_steps=8, choice_temperature=4.5,
    tok=dict(filters=32, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2, embedding_dim=16, codebook_size=64,
             image_size=64),
    tok_b=dict(filters=32, channel_multipliers=(1, 2, 4), num_res_blocks=1, embedding_dim=8, codebook_size=32,
               image_size=32),
    transformer=dict(codebook_size=64, num_classes=10, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, grid=4),
)


def _import_official(repo: str):
    """The official modules of the checkout (with ``jnp.DeviceArray`` aliased for this JAX)."""
    if not os.path.isfile(os.path.join(repo, "maskgit", "nets", "maskgit_transformer.py")):
        sys.exit(f"error: {repo} is not a google-research/maskgit checkout (no maskgit/nets/maskgit_transformer.py); "
                 "pass --maskgit-repo.")
    import jax
    import jax.numpy as jnp

    if not hasattr(jnp, "DeviceArray"):
        jnp.DeviceArray = jax.Array  # parallel_decode's State annotations name the removed class
    sys.path.insert(0, os.path.abspath(repo))
    from maskgit.configs import maskgit_class_cond_config  # noqa: E402  (the official code)
    from maskgit.libml import parallel_decode  # noqa: E402
    from maskgit.nets import maskgit_transformer, vqgan_tokenizer  # noqa: E402

    return maskgit_class_cond_config, vqgan_tokenizer, maskgit_transformer, parallel_decode


def tokenizer_config(maskgit_class_cond_config, c: dict | None):
    """The released class-conditional config with the tokenizer sizes of ``c`` (None: as released)."""
    cf = maskgit_class_cond_config.get_config()
    if c is not None:
        cf.vqvae.filters = c["filters"]
        cf.vqvae.channel_multipliers = list(c["channel_multipliers"])
        cf.vqvae.num_res_blocks = c["num_res_blocks"]
        cf.vqvae.embedding_dim = c["embedding_dim"]
        cf.vqvae.codebook_size = c["codebook_size"]
    return cf


def _encode_decode(module, inputs):
    """``decode(encode(x))``: what ``VQVAE.__call__`` means (it passes encode's tuple to the decoder)."""
    quantized, _ = module.encode(inputs)
    return module.decode(quantized)


def build_transformer(maskgit_transformer, c: dict, positions: int, cf=None):
    """The transformer as ``inference.py`` builds it (``cf``: the released config, else the sizes of ``c``)."""
    if cf is not None:
        return maskgit_transformer.Transformer(
            vocab_size=cf.vqvae.codebook_size + cf.num_class + 1, hidden_size=cf.transformer.num_embeds,
            num_hidden_layers=cf.transformer.num_layers, num_attention_heads=cf.transformer.num_heads,
            intermediate_size=cf.transformer.intermediate_size, hidden_dropout_prob=cf.transformer.dropout_rate,
            attention_probs_dropout_prob=cf.transformer.dropout_rate, max_position_embeddings=positions)
    return maskgit_transformer.Transformer(
        vocab_size=c["codebook_size"] + c["num_classes"] + 1, hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], max_position_embeddings=positions)


def _flat(tree) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


def _tok_draw(key: str, shape: tuple[int, ...], last_conv: str = "") -> tuple[float, float]:
    """``(scale, offset)`` of a tokenizer parameter (``last_conv``: the decoder's output conv kernel)."""
    if key == "quantizer/codebook":
        return 1.0, 0.0
    if key.endswith("/kernel"):  # conv kernel [kh, kw, in, out]
        gain = 0.35 if key == last_conv else 1.0
        return gain / math.sqrt(shape[0] * shape[1] * shape[2]), 0.0
    if "GroupNorm" in key:
        return 0.2, (1.0 if key.endswith("/scale") else 0.0)
    return 0.05, 0.0  # conv biases


def _transformer_draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a transformer parameter."""
    if key.endswith("word_embeddings/embedding"):
        return 0.3, 0.0
    if key.endswith("position_embeddings/embedding"):
        return 0.3, 0.0
    if key.endswith("/scale"):  # LayerNorm
        return 0.2, 1.0
    if key.endswith("/kernel"):
        fan_in = shape[0] if not key.endswith("out/kernel") else shape[0] * shape[1]
        return 1.0 / math.sqrt(fan_in), 0.0
    if key == "MlmLayer_0/mlm_bias/bias":
        return 0.5, 0.0
    return 0.05, 0.0  # biases (LayerNorm and Dense)


def randomise(tree, draw, rs: np.random.RandomState) -> tuple[dict, list]:
    """A tree like ``tree`` with every parameter drawn in flatten order; and its manifest entries."""
    from flax import traverse_util

    flat, entries = {}, []
    for key, value in _flat(tree).items():
        shape = tuple(int(n) for n in value.shape)
        scale, offset = draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        flat[key] = w
        entries.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
    return traverse_util.unflatten_dict(flat, sep="/"), entries


def _images(rs: np.random.RandomState, batch: int, size: int) -> np.ndarray:
    """Smooth images in [0, 1] (NHWC): a few random sinusoids per channel and a mean level per image."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.zeros((batch, size, size, 3))
    for b in range(batch):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, :, :, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image = 0.5 + 0.3 * image + np.linspace(-0.15, 0.15, batch)[:, None, None, None]
    return (image + 0.05 * rs.uniform(-1, 1, image.shape)).clip(0, 1).astype(np.float32)


def tokenizer_outputs(name: str, module, variables, image: np.ndarray, codes: np.ndarray, margin: float) -> dict:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(image)
    quant, result = module.apply(variables, {"image": x}, method=module.encode)
    tokens = module.apply(variables, {"image": x}, method=module.encode_to_indices)
    assert np.array_equal(np.asarray(result["encoding_indices"]), np.asarray(tokens))
    recon = module.apply(variables, quant, method=module.decode)
    decoded = module.apply(variables, jnp.asarray(codes), method=module.decode_from_indices)
    raw = result["raw"]  # the encoder output
    codebook = variables["params"]["quantizer"]["codebook"]
    key = jax.random.key(1)
    for _ in range(8):  # the tokens must not sit on a tie
        key, sub = jax.random.split(key)
        noisy = raw * (1 + margin * jax.random.normal(sub, raw.shape))
        d = jnp.sum((noisy[..., None, :] - codebook) ** 2, -1)
        if not np.array_equal(np.asarray(jnp.argmin(d, -1)), np.asarray(tokens)):
            sys.exit(f"error: the {name} tokens change under a {margin} perturbation; pick another --seed.")
    return {f"{name}_tokens": np.asarray(tokens, np.int32), f"{name}_quant": np.asarray(quant),
            f"{name}_recon": np.asarray(recon), f"{name}_decoded": np.asarray(decoded)}


def official_decode(parallel_decode, module, variables, input_ids, codebook_size: int, steps: int,
                    temperature: float, seed: int):
    """``parallel_decode.decode`` as ``inference.py`` calls it, un-jitted so that the number of
    positions masked after each iteration can be read off ``mask_by_random_topk``'s result."""
    import jax
    import jax.numpy as jnp

    original, masked = parallel_decode.mask_by_random_topk, []

    def recording(rng, mask_len, probs, temperature=1.0):
        masking = original(rng, mask_len, probs, temperature)
        masked.append(np.asarray(jnp.sum(masking, axis=-1)))
        return masking

    def tokens_to_logits(seq):
        return module.apply(variables, seq, deterministic=True)[..., :codebook_size]

    parallel_decode.mask_by_random_topk = recording
    try:
        with jax.disable_jit():
            seqs = parallel_decode.decode(jnp.asarray(input_ids), jax.random.key(seed), tokens_to_logits,
                                          num_iter=steps, choice_temperature=temperature, mask_token_id=-1)
    finally:
        parallel_decode.mask_by_random_topk = original
    return np.asarray(seqs[:, -1], np.int32), np.stack(masked, axis=1).astype(np.int32)


def released_layouts(maskgit_class_cond_config, vqgan_tokenizer, maskgit_transformer) -> dict[str, list]:
    """The parameter paths and shapes of the released checkpoints (shapes only, ``jax.eval_shape``)."""
    import jax
    import jax.numpy as jnp

    out = {}
    cf = tokenizer_config(maskgit_class_cond_config, None)
    tok = vqgan_tokenizer.VQVAE(config=cf, dtype=jnp.float32, train=False)
    x = {"image": jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)}
    shapes = jax.eval_shape(lambda r, x: tok.init(r, x, method=_encode_decode), jax.random.key(0), x)
    out["tokenizer"] = [[k, list(v.shape)] for k, v in _flat(shapes["params"]).items()]
    for size in (256, 512):
        grid = size // cf.transformer.patch_size
        model = build_transformer(maskgit_transformer, {}, grid * grid + 1, cf=cf)
        ids = jax.ShapeDtypeStruct((1, grid * grid + 1), jnp.int32)
        shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
        out[f"maskgit_{size}"] = [[k, list(v.shape)] for k, v in _flat(shapes["params"]).items()]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maskgit-repo", required=True, help="a checkout of google-research/maskgit")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_default_matmul_precision", "highest")
    config_mod, vqgan_tokenizer, maskgit_transformer, parallel_decode = _import_official(args.maskgit_repo)
    rs = np.random.RandomState(args.seed)
    manifest = {"seed": args.seed, "config": CONFIG, "models": {}}
    arrays: dict[str, np.ndarray] = {}
    batch, margin = CONFIG["batch"], 1e-4
    variables = {}

    # Every model's weights first, in manifest order (the test redraws them in that order).
    modules = {}
    for name in ("tok", "tok_b"):
        c = CONFIG[name]
        module = vqgan_tokenizer.VQVAE(config=tokenizer_config(config_mod, c), dtype=jnp.float32, train=False)
        x = jax.ShapeDtypeStruct((1, c["image_size"], c["image_size"], 3), jnp.float32)
        shapes = jax.eval_shape(lambda r, x: module.init(r, {"image": x}, method=_encode_decode), jax.random.key(0), x)
        convs = [k for k in _flat(shapes["params"]) if k.startswith("decoder/Conv_") and k.endswith("kernel")]
        last = max(convs, key=lambda k: int(k.split("/")[1].split("_")[1]))
        tree, manifest["models"][name] = randomise(shapes["params"], functools.partial(_tok_draw, last_conv=last), rs)
        modules[name], variables[name] = module, {"params": tree}
    c = CONFIG["transformer"]
    k, classes, length = c["codebook_size"], c["num_classes"], c["grid"] ** 2
    model = build_transformer(maskgit_transformer, c, length + 1)
    ids = jax.ShapeDtypeStruct((1, length + 1), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    tree, manifest["models"]["transformer"] = randomise(shapes["params"], _transformer_draw, rs)
    variables["transformer"] = {"params": tree}

    for name in ("tok", "tok_b"):
        c = CONFIG[name]
        suffix = "" if name == "tok" else "_b"
        image = _images(rs, batch, c["image_size"])
        grid = c["image_size"] // 2 ** (len(c["channel_multipliers"]) - 1)
        codes = rs.randint(0, c["codebook_size"], (batch, grid, grid)).astype(np.int32)
        arrays.update({f"image{suffix}": image, f"codes{suffix}": codes})
        arrays.update(tokenizer_outputs(name, modules[name], variables[name], image, codes, margin))
    arrays["margin"] = np.float32(margin)

    # One pass on a partially masked sequence with a class token (mask_token_id = -1).
    labels = np.asarray(CONFIG["labels"], np.int32)
    tokens = rs.randint(0, k, (batch, length)).astype(np.int32)
    masked = rs.uniform(size=(batch, length)) < 0.5
    masked[:, 0] = True
    input_ids = np.concatenate([(labels + k)[:, None], np.where(masked, -1, tokens)], axis=1).astype(np.int32)
    logits = np.asarray(model.apply(variables["transformer"], jnp.asarray(input_ids), deterministic=True))
    last_row = np.where(input_ids == -1, k + classes, input_ids)
    again = np.asarray(model.apply(variables["transformer"], jnp.asarray(last_row), deterministic=True))
    if not np.array_equal(logits, again):
        sys.exit("error: the official model does not read mask_token_id -1 as the last embedding row.")
    arrays.update(input_ids=input_ids, logits=logits)

    # Official parallel decoding (editing: some tokens known), and the counts it re-masked.
    decode_labels = np.asarray(CONFIG["decode_labels"], np.int32)
    known = rs.uniform(size=(batch, length)) < np.array([[0.0], [0.4]])
    given = rs.randint(0, k, (batch, length))
    decode_ids = np.concatenate([(decode_labels + k)[:, None], np.where(known, given, -1)], axis=1).astype(np.int32)
    out_tokens, remasked = official_decode(parallel_decode, model, variables["transformer"], decode_ids, k,
                                           CONFIG["decode_steps"], CONFIG["choice_temperature"], args.seed)
    if not np.array_equal(out_tokens[:, 1:][known], decode_ids[:, 1:][known]) or (out_tokens[:, 1:] < 0).any():
        sys.exit("error: the official decoding changed a known token or left a masked one.")
    arrays.update(decode_input_ids=decode_ids, decode_tokens=out_tokens, decode_masked=remasked)

    manifest["released"] = released_layouts(config_mod, vqgan_tokenizer, maskgit_transformer)
    arrays["manifest"] = np.asarray(json.dumps(manifest))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    distinct = [len(np.unique(arrays[f"{n}_tokens"])) for n in ("tok", "tok_b")]
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): {distinct} distinct codes, recon in "
          f"[{arrays['tok_recon'].min():.2f}, {arrays['tok_recon'].max():.2f}] std {arrays['tok_recon'].std():.2f}, "
          f"logits std {logits.std():.2f}, argmax codes {len(np.unique(logits[:, 1:, :k].argmax(-1)))}, re-masked "
          f"per step {remasked.tolist()}")


if __name__ == "__main__":
    main()
