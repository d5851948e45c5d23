"""MAR: masked autoregressive generation over continuous tokens with a per-token diffusion loss
(Li et al. 2024, "Autoregressive Image Generation without Vector Quantization", LTH14/mar
``models/mar.py``): model, loss and sampler, jitted end to end.

Tokens are continuous: a latent map ``[B, H, W, C]`` of a KL-VAE (MAR: 16x16x16 from KL-16 at
256px, scaled by 0.2325 on the tokenizer side) is cut into ``patch_size`` x ``patch_size`` patches,
``[B, L, D]`` with ``L = (H / p)(W / p)`` and ``D = C p²`` in MAR's ``(c, pi, pj)`` order
(:func:`patchify`; MAR uses ``p = 1``: 256 tokens of 16 channels).

Structure (MAR's MAE-style encoder/decoder; names as MAR's, kernels ``[in, out]``):

- ``class_emb [num_classes, De]`` and ``fake_latent [De]`` (the "no label" embedding of
  classifier-free guidance, label id ``num_classes`` here). Training replaces a label by it with
  probability ``label_drop_prob`` (0.1).
- Encoder: ``z_proj`` (``D -> De``) of every token; ``buffer_size`` (64) buffer positions in front,
  each holding the class embedding; ``encoder_pos_embed_learned [buffer + L, De]`` added, then
  ``z_proj_ln`` (LayerNorm, eps 1e-6). Masked tokens are dropped; ``encoder_depth`` ViT blocks
  ``encoder_blocks_{i}`` (timm ``Block``: pre-LN, ``qkv`` with bias, exact GELU MLP of width
  ``mlp_ratio * De``, attention dropout and projection dropout 0.1), ``encoder_norm``.
- Decoder: ``decoder_embed`` (``De -> Dd``), ``mask_token [Dd]`` at every masked position,
  ``decoder_pos_embed_learned [buffer + L, Dd]``, ``decoder_depth`` blocks ``decoder_blocks_{i}``
  over all positions, ``decoder_norm``; the buffer is removed and
  ``diffusion_pos_embed_learned [L, Dd]`` added: ``z [B, L, Dd]``, the condition of each token's
  diffusion head.
- ``diffloss``: the diffusion head (:class:`vqgen.generators.diffusion_loss.DiffusionHead`,
  MAR's ``DiffLoss.net``) of width ``diffloss_width`` and ``diffloss_depth`` blocks.
- Attention kernels keep the head axis: ``qkv [De, 3, H, hd]`` (timm's ``[3De, De]`` weight
  transposed and reshaped), ``proj [H, hd, De]``; LayerNorm ``weight`` is ``scale``.
- Initialisation as MAR: Xavier-uniform kernels (fans of the 2-D weight), zero biases, unit
  LayerNorms, ``N(0, 0.02)`` for the class table, ``fake_latent``, ``mask_token`` and the three
  position tables; the head's own init (see :mod:`~vqgen.generators.diffusion_loss`).

Training (:func:`loss_fn`): a random generation order per example; the mask ratio is drawn from
``N(1, 0.25)`` truncated to ``[mask_ratio_min, 1]`` (0.7), ``ceil(L * ratio)`` tokens are masked,
the first ones in the order; the loss is MAR's diffusion loss of the masked tokens given ``z``,
each token repeated ``diffusion_batch_mul`` (4) times with its own timestep and noise, under
the diffusion's ``noise_schedule`` (MAR's ``'cosine'``; ``'linear'`` is DDPM's, see below).

Why a linear option: under the cosine schedule the sampler's first step (training timestep 999,
``alpha_bar`` about 2e-9) multiplies the head's noise-prediction error by 316 when the sampler
is respaced to 100 steps and by 632 at 50 (``posterior_mean_coef1 * sqrt(1 / alpha_bar - 1)`` of
the respaced step), so a head must predict the noise at that step almost exactly. MAR's heads,
trained for hundreds of ImageNet epochs, do; a small head trained for minutes (the digit
quickstart's, 0.0058 mean squared error there after 3,000 steps) does not, and its samples
diverge to latents of magnitude 1e3. Under the linear schedule (``alpha_bar`` about 4e-5 at step
999) the same factor is 0.20 at 100 steps and 0.40 at 50.

Sampling (:func:`sample`): MAR's ``sample_tokens`` as one jitted ``lax.fori_loop`` over
``num_iter`` iterations. Before iteration ``t`` the first ``m_t`` tokens of a random order are
masked; ``m_{t+1} = max(1, min(m_t - 1, floor(L cos(pi/2 (t + 1) / T))))`` (the last iteration
predicts all that remain), counted in float64 on the host (:func:`iteration_counts`). The tokens
``order[m_{t+1}:m_t]`` are drawn by the diffusion sampler (``diffusion_steps``, 100, temperature
on its noise) from their ``z``. Guidance runs the model on the "no label" embedding too, guides
the head's noise prediction, and its scale is ``cfg_scale`` (``'constant'``) or MAR's
``'linear'`` ramp ``1 + (cfg_scale - 1) (L - m'_{t+1}) / L`` with ``m'`` the clamped count of
the formula above before the last-iteration override (so the last iteration uses ``m' = 1``).

Deviations from MAR, none of which changes what is computed:

- Static shapes. The encoder gathers the unmasked tokens into ``max_visible = L - ceil(L *
  mask_ratio_min)`` slots (76 of 256 at 0.7) and masks the unused slots as attention keys, which
  equals MAR's dropping of masked tokens (attention is permutation-equivariant once the position
  embedding is added). The sampler runs the encoder over all ``L`` slots (unmasked ones as keys),
  and each iteration draws ``max_t (m_t - m_{t+1})`` tokens (7 at 64 iterations over 256 tokens;
  ``[m_t - m_{t+1}]`` of them are kept), so the diffusion head samples at most that padding more
  than MAR; nothing recompiles per iteration.
- The mask ratio is drawn per example (MAR draws one per device batch, which its token dropping
  needs); each example's mask has MAR's distribution.
- Label dropout is applied in :func:`loss_fn` by replacing the label with ``num_classes`` (MAR
  mixes the embeddings in the encoder); the same function.
- Random numbers come from ``jax.random``: orders, ratios, timesteps and noise differ from
  PyTorch's draws.

Parameter counts (:func:`count_params`, 16x16 tokens of 16 channels, 1000 classes, 64 buffer
tokens, the paper's heads: B with 6 blocks of width 1024, L 8 of 1280, H 12 of 1536): MAR-B
207,924,768, MAR-L 478,326,304, MAR-H 942,403,104 — the paper's 208M, 479M and 943M (the same
sum over MAR's modules: timm blocks of ``12 D² + 13 D`` parameters, the tables, the head).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.generators import diffusion_loss as dl
from vqgen.generators import sampling

# The generator protocol (vqgen/generators/__init__.py): images, modelled as the continuous latent
# map of a KL tokenizer ([B, h, w, C] batches and samples) instead of code ids.
VIDEO = False
INPUT_KIND = "latents"

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
INIT_STD = 0.02
NORM_EPS = 1e-6
_MASK_VALUE = -1e30
MASK_RATIO_STD = 0.25  # the truncated normal of mask ratios is centred at 1 with this std

# MAR's sizes (mar_base / mar_large / mar_huge) with the diffusion heads of the paper's results.
VARIANTS: dict[str, dict[str, int]] = {
    "B": dict(encoder_width=768, encoder_depth=12, encoder_heads=12, decoder_width=768, decoder_depth=12,
              decoder_heads=12, diffloss_depth=6, diffloss_width=1024),
    "L": dict(encoder_width=1024, encoder_depth=16, encoder_heads=16, decoder_width=1024, decoder_depth=16,
              decoder_heads=16, diffloss_depth=8, diffloss_width=1280),
    "H": dict(encoder_width=1280, encoder_depth=20, encoder_heads=16, decoder_width=1280, decoder_depth=20,
              decoder_heads=16, diffloss_depth=12, diffloss_width=1536),
}
PAPER_PARAMS = {"B": 208e6, "L": 479e6, "H": 943e6}


# --------------------------------------------------------------------------------- patches


def patchify(latents: jax.Array, patch_size: int = 1) -> jax.Array:
    """``[B, H, W, C]`` latents -> ``[B, (H/p)(W/p), C p²]`` tokens, row-major over patches, each
    token's channels in MAR's ``(c, pi, pj)`` order."""
    b, h, w, c = latents.shape
    p = int(patch_size)
    if h % p or w % p:
        raise ValueError(f"a {h}x{w} latent map does not split into {p}x{p} patches; use a patch size dividing both.")
    x = latents.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, p, p]
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch_size: int = 1) -> jax.Array:
    """Inverse of :func:`patchify`: ``[B, h w, C p²]`` tokens over a ``grid = (h, w)`` of patches
    -> ``[B, h p, w p, C]`` latents."""
    b, length, d = tokens.shape
    (h, w), p = grid, int(patch_size)
    c = d // (p * p)
    x = tokens.reshape(b, h, w, c, p, p).transpose(0, 1, 4, 2, 5, 3)  # [B, h, p, w, p, C]
    return x.reshape(b, h * p, w * p, c)


# ---------------------------------------------------------------------------------- layers


class Dense(nn.Module):
    """Linear map of the last ``contract_dims`` axes to ``features`` with a Xavier-uniform kernel
    ``[*in, *features]`` (fans of the equivalent 2-D weight) and a zero bias ``[*features]``."""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    contract_dims: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = tuple(self.features)
        in_shape = x.shape[x.ndim - self.contract_dims:]
        init = dl.xavier_uniform(int(np.prod(in_shape)), int(np.prod(feats)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), in_shape + feats,
                            self.param_dtype)  # [*in, *out]
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.contract_dims:]),
                          feats, self.param_dtype)  # [*out]
        contract = (tuple(range(x.ndim - self.contract_dims, x.ndim)), tuple(range(self.contract_dims)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        return y + bias.astype(self.dtype)


class Block(nn.Module):
    """A ViT block (timm ``Block`` as MAR builds it): ``x += drop(proj(attn(norm1(x))))``,
    ``x += drop(fc2(drop(gelu(fc1(norm2(x))))))``; ``key_mask [B, S]`` (bool) hides keys."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        d, h = self.width, self.num_heads
        hd = d // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = dl.LayerNorm(self.norm_eps, "embed", name="norm1", **kw)(x)  # [B, S, D]
        qkv = Dense((3, h, hd), ("embed", None, "heads", "kv"), name="qkv", **kw)(y)  # [B, S, 3, H, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, S, H, hd] each
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * hd**-0.5  # [B, H, S, T]
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        probs = nn.Dropout(self.attn_dropout)(probs, deterministic=not train)
        out = jnp.einsum("bhst,bthd->bshd", probs.astype(self.dtype), v)  # [B, S, H, hd]
        out = Dense((d,), ("heads", "kv", "embed"), contract_dims=2, name="proj", **kw)(out)  # [B, S, D]
        x = x + nn.Dropout(self.proj_dropout)(out, deterministic=not train)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        y = dl.LayerNorm(self.norm_eps, "embed", name="norm2", **kw)(x)  # [B, S, D]
        y = Dense((int(d * self.mlp_ratio),), ("embed", "mlp"), name="fc1", **kw)(y)  # [B, S, F]
        y = nn.with_logical_constraint(jax.nn.gelu(y, approximate=False), ("batch", "length", "mlp"))
        y = nn.Dropout(self.proj_dropout)(y, deterministic=not train)
        y = Dense((d,), ("mlp", "embed"), name="fc2", **kw)(y)  # [B, S, D]
        x = x + nn.Dropout(self.proj_dropout)(y, deterministic=not train)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# ----------------------------------------------------------------------------------- model


def _table(std: float = INIT_STD):
    return nn.with_logical_partitioning(nn.initializers.normal(std), (None, "embed"))


class MAR(nn.Module):
    """MAR's encoder/decoder over ``grid = (h, w)`` tokens of ``token_dim`` channels (see the
    module docstring). ``token_dim`` is the tokenizer's latent width times ``patch_size²``.

    ``__call__(tokens [B, L, D], mask bool [B, L], labels [B], train=False, keep=None) -> z
    [B, L, Dd]``: the diffusion head's conditions. ``mask`` marks the tokens to predict (their
    values are never read); ``labels`` are class ids in ``[0, num_classes]`` (``num_classes``:
    no label). ``keep`` is how many encoder slots hold unmasked tokens (static; default ``L``);
    every example must have at most ``keep`` unmasked tokens. ``patch_size`` only says how a
    ``[B, H, W, C]`` latent map becomes tokens (:func:`patchify`): ``token_dim = C * patch_size²``.
    """

    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    token_dim: int = 16
    encoder_width: int = 1024
    encoder_depth: int = 16
    encoder_heads: int = 16
    decoder_width: int = 1024
    decoder_depth: int = 16
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_depth: int = 3
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4
    noise_schedule: str = "cosine"
    patch_size: int = 1
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return int(self.grid[0]) * int(self.grid[1])

    @property
    def max_visible(self) -> int:
        """Encoder slots for unmasked tokens in training: ``L - ceil(L * mask_ratio_min)``."""
        return self.seq_len - int(math.ceil(self.seq_len * float(self.mask_ratio_min)))

    @property
    def latent_dim(self) -> int:
        """Channels of the latent map the tokens are cut from: ``token_dim / patch_size²``."""
        return int(self.token_dim) // (int(self.patch_size) ** 2)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The ``[H, W, C]`` latent map of one example (:func:`unpatchify` of its tokens)."""
        p = int(self.patch_size)
        return (int(self.grid[0]) * p, int(self.grid[1]) * p, self.latent_dim)

    @property
    def null_class(self) -> int:
        return int(self.num_classes)

    @property
    def head(self) -> dl.DiffusionHead:
        """The diffusion head as a standalone module (its params are ``params['diffloss']``)."""
        return dl.DiffusionHead(self.token_dim, self.diffloss_width, self.diffloss_depth, dtype=self.dtype,
                                param_dtype=self.param_dtype)

    def setup(self):
        check_model(self)
        buf, length, de, dd = self.buffer_size, self.seq_len, self.encoder_width, self.decoder_width
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = functools.partial(Block, mlp_ratio=self.mlp_ratio, attn_dropout=self.attn_dropout,
                                   proj_dropout=self.proj_dropout, norm_eps=self.norm_eps, **kw)
        self.class_emb = self.param("class_emb", _table(), (self.num_classes, de), self.param_dtype)
        self.fake_latent = self.param("fake_latent", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                                  ("embed",)), (de,), self.param_dtype)
        self.z_proj = Dense((de,), (None, "embed"), **kw)
        self.z_proj_ln = dl.LayerNorm(self.norm_eps, "embed", **kw)
        self.encoder_pos_embed_learned = self.param("encoder_pos_embed_learned", _table(), (buf + length, de),
                                                    self.param_dtype)
        self.encoder_blocks = [blocks(de, self.encoder_heads) for _ in range(self.encoder_depth)]
        self.encoder_norm = dl.LayerNorm(self.norm_eps, "embed", **kw)
        self.decoder_embed = Dense((dd,), ("embed", None), **kw)
        self.mask_token = self.param("mask_token", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                                ("embed",)), (dd,), self.param_dtype)
        self.decoder_pos_embed_learned = self.param("decoder_pos_embed_learned", _table(), (buf + length, dd),
                                                    self.param_dtype)
        self.decoder_blocks = [blocks(dd, self.decoder_heads) for _ in range(self.decoder_depth)]
        self.decoder_norm = dl.LayerNorm(self.norm_eps, "embed", **kw)
        self.diffusion_pos_embed_learned = self.param("diffusion_pos_embed_learned", _table(), (length, dd),
                                                      self.param_dtype)
        self.diffloss = self.head

    def class_embedding(self, labels: jax.Array) -> jax.Array:
        """``[B, De]`` float32: ``class_emb[label]``, or ``fake_latent`` for label ``num_classes``."""
        labels = labels.astype(jnp.int32)
        table = jnp.take(self.class_emb.astype(jnp.float32), jnp.clip(labels, 0, self.num_classes - 1), axis=0)
        return jnp.where((labels == self.null_class)[:, None], self.fake_latent.astype(jnp.float32)[None], table)

    def encode(self, tokens, mask, labels, keep: int, train: bool = False):
        """Encoder output ``[B, buffer + keep, De]`` over the buffer and the unmasked tokens, and
        the order ``perm [B, L]`` (unmasked positions first, by position) its slots follow."""
        b, length, _ = tokens.shape
        buf = self.buffer_size
        x = self.z_proj(tokens.astype(jnp.float32))  # [B, L, De]
        cls = jnp.broadcast_to(self.class_embedding(labels)[:, None].astype(x.dtype), (b, buf, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.encoder_pos_embed_learned.astype(x.dtype)[None]  # [B, buf+L, De]
        x = self.z_proj_ln(x)
        perm = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)  # [B, L] unmasked first
        visible = perm[:, :keep]  # [B, K]
        valid = ~jnp.take_along_axis(mask, visible, axis=1)  # [B, K]
        x = jnp.concatenate([x[:, :buf], jnp.take_along_axis(x[:, buf:], visible[..., None], axis=1)], axis=1)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B, buf+K, De]
        key_mask = jnp.concatenate([jnp.ones((b, buf), bool), valid], axis=1)  # [B, buf+K]
        for block in self.encoder_blocks:
            x = block(x, key_mask, train)
        return self.encoder_norm(x), perm

    def decode(self, x, mask, perm, train: bool = False):
        """The decoder over ``buffer + L`` positions: ``z [B, L, Dd]``, conditions of the head."""
        buf = self.buffer_size
        x = self.decoder_embed(x)  # [B, buf+K, Dd]
        keep = x.shape[1] - buf
        rank = jnp.argsort(perm, axis=-1)  # [B, L] the encoder slot of each position
        slot = jnp.clip(rank, 0, max(keep - 1, 0))
        tok = jnp.take_along_axis(x[:, buf:], slot[..., None], axis=1) if keep else jnp.zeros(
            mask.shape + (x.shape[-1],), x.dtype)  # [B, L, Dd]
        tok = jnp.where(mask[..., None], self.mask_token.astype(x.dtype)[None, None], tok)
        x = jnp.concatenate([x[:, :buf], tok], axis=1) + self.decoder_pos_embed_learned.astype(x.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B, buf+L, Dd]
        for block in self.decoder_blocks:
            x = block(x, None, train)
        x = self.decoder_norm(x)[:, buf:]  # [B, L, Dd]
        return x + self.diffusion_pos_embed_learned.astype(x.dtype)[None]

    def __call__(self, tokens, mask, labels, train: bool = False, keep: int | None = None):
        keep = self.seq_len if keep is None else int(keep)
        x, perm = self.encode(tokens, mask.astype(bool), labels, keep, train)
        return self.decode(x, mask.astype(bool), perm, train)  # [B, L, Dd]

    def init_all(self, tokens, mask, labels):
        """Touches every parameter (the transformer and the head) for ``init``."""
        z = self(tokens, mask, labels)
        n = tokens.shape[0] * tokens.shape[1]
        return self.diffloss(tokens.reshape(n, -1), jnp.zeros((n,), jnp.int32), z.reshape(n, -1))


def check_model(model: MAR) -> None:
    """One ``ValueError`` sentence for each setting MAR cannot run with."""
    if not 0.0 < float(model.mask_ratio_min) <= 1.0:
        raise ValueError(f"mask_ratio_min={model.mask_ratio_min} is outside (0, 1]; use a fraction such as MAR's 0.7.")
    if model.buffer_size < 1:
        raise ValueError(f"buffer_size={model.buffer_size} leaves the encoder nothing to attend to when every token is "
                         "masked; use at least 1 (MAR uses 64).")
    for part in ("encoder", "decoder"):
        width, heads = getattr(model, f"{part}_width"), getattr(model, f"{part}_heads")
        if width % heads:
            raise ValueError(f"{part}_width={width} is not divisible by {part}_heads={heads}; change one of them.")
    if not 0.0 <= float(model.label_drop_prob) < 1.0:
        raise ValueError(f"label_drop_prob={model.label_drop_prob} is outside [0, 1); MAR uses 0.1.")
    p = int(model.patch_size)
    if p < 1 or model.token_dim % (p * p):
        raise ValueError(f"patch_size={model.patch_size} does not divide token_dim={model.token_dim} into p² latent "
                         "channel groups; use a patch size whose square divides the token width (MAR uses 1).")
    if int(model.diffusion_batch_mul) < 1:
        raise ValueError(f"diffusion_batch_mul={model.diffusion_batch_mul} must be at least 1; MAR trains with 4.")
    dl.check_noise_schedule(model.noise_schedule)


def mar_variant(name: str, **overrides: Any) -> MAR:
    """A :class:`MAR` of size ``name`` (one of :data:`VARIANTS`), fields overridable."""
    if name not in VARIANTS:
        raise ValueError(f"MAR variant {name!r} is unknown; choose one of {sorted(VARIANTS)}.")
    return MAR(**{**VARIANTS[name], **overrides})


def _dummy_inputs(model: MAR, batch: int = 1):
    return (jnp.zeros((batch, model.seq_len, model.token_dim), jnp.float32), jnp.ones((batch, model.seq_len), bool),
            jnp.zeros((batch,), jnp.int32))


def init_params(model: MAR, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``, the head's under ``'diffloss'``."""
    check_model(model)
    return model.init({"params": rng}, *_dummy_inputs(model), method=MAR.init_all)["params"]


def abstract_params(model: MAR) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameter tree via ``jax.eval_shape`` (nothing is allocated)."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def count_params(model: MAR) -> int:
    """Number of parameters of ``model`` including the diffusion head, from shapes only."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(model)))))


# ------------------------------------------------------------------------------------ loss


def random_orders(rng: jax.Array, batch: int, length: int) -> jax.Array:
    """``[B, L]`` int32: a uniformly random permutation of the positions per example."""
    return jnp.argsort(jax.random.uniform(rng, (batch, length)), axis=-1).astype(jnp.int32)


def mask_ratios(rng: jax.Array, batch: int, mask_ratio_min: float) -> jax.Array:
    """``[B]`` float32 draws of ``N(1, 0.25)`` truncated to ``[mask_ratio_min, 1]`` (MAR's ratios)."""
    lower = (float(mask_ratio_min) - 1.0) / MASK_RATIO_STD
    return 1.0 + MASK_RATIO_STD * jax.random.truncated_normal(rng, lower, 0.0, (batch,), jnp.float32)


def random_mask(model: MAR, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MAR's training mask: ``(mask bool [B, L], orders [B, L], num_masked [B])`` where the first
    ``ceil(L * ratio)`` positions of each random order are masked (at least ``L - max_visible``)."""
    length = model.seq_len
    o_key, r_key = jax.random.split(rng)
    orders = random_orders(o_key, batch, length)  # [B, L]
    ratio = mask_ratios(r_key, batch, model.mask_ratio_min)  # [B]
    n = jnp.clip(jnp.ceil(ratio * length).astype(jnp.int32), length - model.max_visible, length)  # [B]
    rank = jnp.argsort(orders, axis=-1)  # [B, L] index of each position in its order
    return rank < n[:, None], orders, n


def batch_tokens(model: MAR, batch: dict) -> jax.Array:
    """``batch['latents']`` as ``[B, L, D]`` float32 tokens: a ``[B, H, W, C]`` latent map is
    patchified (``model.patch_size``), a ``[B, L, D]`` array is taken as it is."""
    if "latents" not in batch:
        raise ValueError("the MAR loss reads batch['latents'], the tokenizer's continuous latents [B, H, W, C] (or "
                         "patchified [B, L, D]); encode the images with a KL tokenizer first.")
    x = jnp.asarray(batch["latents"], jnp.float32)
    if x.ndim == 4:
        p, c = int(model.patch_size), model.latent_dim
        if x.shape[-1] != c:
            raise ValueError(f"the latents have {x.shape[-1]} channels but this MAR model reads {c}-channel latents; "
                             f"use a KL tokenizer of embed_dim={c} or build the model for the tokenizer's width.")
        if x.shape[1] != model.grid[0] * p or x.shape[2] != model.grid[1] * p:
            raise ValueError(f"latents of shape {tuple(x.shape)} do not make the model's {model.grid} grid of "
                             f"{p}x{p} patches; build the model from the tokenizer's latent grid.")
        x = patchify(x, p)
    if x.ndim != 3 or x.shape[1:] != (model.seq_len, model.token_dim):
        raise ValueError(f"latents of shape {tuple(x.shape)} are not [B, {model.seq_len}, {model.token_dim}] tokens; "
                         "build the model from the tokenizer's latent grid and width.")
    return x


def drop_labels(model: MAR, labels: jax.Array, rng: jax.Array) -> jax.Array:
    """Each label replaced by the "no label" id ``num_classes`` with probability ``label_drop_prob``."""
    labels = labels.astype(jnp.int32)
    if model.label_drop_prob <= 0:
        return labels
    return jnp.where(jax.random.uniform(rng, labels.shape) < model.label_drop_prob, model.null_class, labels)


def loss_fn(model: MAR, params: Any, batch: dict, rng: jax.Array, train: bool = True):
    """MAR's training loss of ``batch = {'latents': float [B, H, W, C] or [B, L, D], 'label': int32
    [B]}`` (``'labels'`` accepted): a random order and truncated-normal mask ratio per example,
    label dropout (when ``train``), the transformer over the unmasked tokens, and the diffusion
    loss of the masked tokens (``diffusion_batch_mul`` timesteps each). ``rng`` drives all draws
    and dropout. Returns ``(loss, {'loss', 'diffusion_mse', 'diffusion_vb', 'mask_ratio'})``.
    """
    params = nn.meta.unbox(params)
    tokens = batch_tokens(model, batch)  # [B, L, D]
    labels = batch["label"] if "label" in batch else batch["labels"]
    b, length, d = tokens.shape
    mask_key, label_key, drop_key, diff_key = jax.random.split(rng, 4)
    mask, _, n = random_mask(model, mask_key, b)
    if train:
        labels = drop_labels(model, labels, label_key)
    z = model.apply({"params": params}, tokens, mask, labels, train=train, keep=model.max_visible,
                    rngs={"dropout": drop_key})  # [B, L, Dd]
    loss, metrics = dl.diffusion_loss(
        model.head, params["diffloss"], tokens.reshape(b * length, d), z.reshape(b * length, -1), diff_key,
        mask.reshape(b * length).astype(jnp.float32), model.diffusion_batch_mul,
        noise_schedule=model.noise_schedule)
    return loss, {"loss": loss, **metrics, "mask_ratio": jnp.mean(n.astype(jnp.float32)) / length}


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(sampling.SamplingOptions):
    """MAR's sampling options (static, hashable; the key is an argument).

    From :class:`~vqgen.generators.sampling.SamplingOptions`: ``temperature`` scales the noise of
    the diffusion sampler (MAR: 1.0; 0 follows the mean path), ``cfg_scale`` (1 = off; MAR-B/L/H
    use 2.9/3.0/3.2), ``cfg_schedule`` (``'linear'``, MAR's default, or ``'constant'``; see the
    module docstring), ``cfg_interval`` (fractions of the iterations). ``top_k``/``top_p`` choose
    among discrete tokens and must stay off (0 and 1). Plus:

    - ``num_iter``: autoregressive iterations T, 1 to the number of tokens (MAR: 64; 256 for the
      paper's best FID).
    - ``diffusion_steps``: DDPM steps of the diffusion head per iteration (MAR: 100).
    """

    cfg_schedule: str = "linear"
    num_iter: int = 64
    diffusion_steps: int = dl.DEFAULT_SAMPLING_STEPS

    _UNIT = "step"

    def __post_init__(self):
        if isinstance(self.num_iter, bool) or int(self.num_iter) < 1:
            raise ValueError(f"num_iter={self.num_iter} must be at least 1; MAR samples with 64 (or 256) iterations.")
        dl.check_steps(self.diffusion_steps)
        if int(self.top_k) != 0 or float(self.top_p) != 1.0:
            raise ValueError(f"top_k={self.top_k} and top_p={self.top_p} filter discrete tokens but MAR's tokens are "
                             "continuous; leave top_k=0 and top_p=1.0 (temperature scales the diffusion noise).")
        super().__post_init__()
        object.__setattr__(self, "num_iter", int(self.num_iter))
        object.__setattr__(self, "diffusion_steps", int(self.diffusion_steps))


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """:class:`SamplerOptions` from a ``config.sample`` section; a key MAR does not read is an error."""
    return SamplerOptions.from_dict(cfg, "mar", **overrides)


@functools.lru_cache(maxsize=64)
def iteration_counts(seq_len: int, num_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """MAR's cosine schedule of iterations, in float64 on the host.

    Returns ``(masked [T + 1], guide [T])`` int32: ``masked[t]`` tokens are masked before
    iteration ``t`` (``masked[0] = L``, ``masked[T] = 0``), so iteration ``t`` predicts
    ``masked[t] - masked[t + 1]`` of them; ``guide[t]`` is the clamped next count
    ``max(1, min(masked[t] - 1, floor(L cos(pi/2 (t + 1) / T))))`` that MAR's linear guidance
    ramp reads (it differs from ``masked[t + 1]`` only at the last iteration).
    """
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter={num_iter} must lie in [1, {seq_len}] (one token at least per iteration); use at "
                         f"most {seq_len} iterations.")
    masked, guide = [seq_len], []
    for t in range(num_iter):
        nxt = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (t + 1) / num_iter)))
        clamped = max(1, min(masked[-1] - 1, nxt))
        guide.append(clamped)
        masked.append(clamped if t < num_iter - 1 else 0)
    return np.asarray(masked, np.int32), np.asarray(guide, np.int32)


def _check_sample_args(model: MAR, labels: Any, opts: Any) -> None:
    if not isinstance(opts, SamplerOptions):
        raise ValueError(f"opts must be mar.SamplerOptions, got {type(opts).__name__}; build them with "
                         "mar.sampler_options(...).")
    iteration_counts(model.seq_len, opts.num_iter)
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id "
                         "per sample.")
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        if lab.size and (lab.min() < 0 or lab.max() > model.num_classes):
            raise ValueError(f"class ids must lie in [0, {model.num_classes}) (or {model.num_classes} for no label), "
                             f"got min {lab.min()} and max {lab.max()}; fix the labels or use a model with more "
                             "classes.")


@flax.struct.dataclass
class _IterState:
    tokens: jax.Array  # [B, L, D] float32, zeros where not generated yet
    step_of: jax.Array  # [B, L] int32, the iteration that generated each token (-1: not yet)


def sample_tokens(model: MAR, params: Any, labels: jax.Array, rng: jax.Array, opts: SamplerOptions,
                  return_steps: bool = False, orders: jax.Array | None = None):
    """Un-jitted body of :func:`sample` (pure; ``model``, ``opts`` and ``return_steps`` static).

    Returns ``tokens [B, L, D]`` float32, with ``return_steps`` also ``step_of [B, L]`` int32
    (the iteration at which each token was generated). The orders (``[B, L]`` permutations; the
    last positions of an order are generated first) are drawn from one split of ``rng`` unless
    given; iteration ``t`` samples the diffusion head with ``fold_in(key, t)`` of the other.
    """
    params = nn.meta.unbox(params)
    b, length, d = labels.shape[0], model.seq_len, model.token_dim
    steps = opts.num_iter
    masked_np, guide_np = iteration_counts(length, steps)
    width = int(np.max(masked_np[:-1] - masked_np[1:]))  # the most tokens one iteration predicts
    masked, guide = jnp.asarray(masked_np), jnp.asarray(guide_np)
    order_key, loop_key = jax.random.split(rng)
    orders = random_orders(order_key, b, length) if orders is None else orders.astype(jnp.int32)  # [B, L]
    rank = jnp.argsort(orders, axis=-1)  # [B, L]
    labels = labels.astype(jnp.int32)
    cond = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)]) if opts.uses_cfg else labels  # [B']
    rows = jnp.arange(b)[:, None]  # [B, 1]

    def body(t, st: _IterState) -> _IterState:
        mask = rank < masked[t]  # [B, L] still to generate
        feed, feed_mask = st.tokens, mask
        if opts.uses_cfg:
            feed, feed_mask = jnp.concatenate([feed, feed]), jnp.concatenate([mask, mask])  # [B', L, D], [B', L]
        z = model.apply({"params": params}, feed, feed_mask, cond)  # [B', L, Dd]
        j = masked[t + 1] + jnp.arange(width)  # [W] indices into the order
        valid = j < masked[t]  # [W] the tokens of this iteration
        pos = jnp.take(orders, jnp.clip(j, 0, length - 1), axis=1)  # [B, W]
        zc = jnp.take_along_axis(z[:b], pos[..., None], axis=1).reshape(b * width, -1)  # [B W, Dd]
        zu = None
        scale = jnp.float32(1.0)
        if opts.uses_cfg:
            zu = jnp.take_along_axis(z[b:], pos[..., None], axis=1).reshape(b * width, -1)  # [B W, Dd]
            if opts.cfg_schedule == "linear":
                scale = 1.0 + (opts.cfg_scale - 1.0) * (length - guide[t]).astype(jnp.float32) / length
            else:
                scale = jnp.float32(opts.cfg_scale)
            frac = t.astype(jnp.float32) / steps
            on = (frac >= opts.cfg_interval[0]) & (frac < opts.cfg_interval[1])
            scale = jnp.where(on, scale, 1.0)
        x = dl.p_sample_loop(model.head, params["diffloss"], zc, jax.random.fold_in(loop_key, t),
                             num_steps=opts.diffusion_steps, temperature=opts.temperature, cfg_scale=scale,
                             noise_schedule=model.noise_schedule,
                             z_uncond=zu).reshape(b, width, d)  # [B, W, D]
        write = jnp.where(valid[None], pos, length)  # [B, W]; index L is out of range: dropped
        tokens = st.tokens.at[rows, write].set(x, mode="drop")
        step_of = st.step_of.at[rows, write].set(t, mode="drop")
        return _IterState(tokens=tokens, step_of=step_of)

    init = _IterState(tokens=jnp.zeros((b, length, d), jnp.float32), step_of=jnp.full((b, length), -1, jnp.int32))
    final = jax.lax.fori_loop(0, steps, body, init)
    return (final.tokens, final.step_of) if return_steps else final.tokens


def _sample_latents(model, params, labels, rng, opts, return_steps=False, orders=None):
    out = sample_tokens(model, params, labels, rng, opts, return_steps, orders)
    tokens = out[0] if return_steps else out
    latents = unpatchify(tokens, tuple(model.grid), model.patch_size)  # [B, H, W, C]
    return (latents, out[1]) if return_steps else latents


_sample_jit = jax.jit(_sample_latents, static_argnames=("model", "opts", "return_steps"))


def sample(model: MAR, params: Any, labels: Any, rng: jax.Array, opts: SamplerOptions = SamplerOptions(), *,
           return_steps: bool = False, orders: Any = None):
    """Samples latent maps ``float32 [B, H, W, C]`` (``model.latent_shape``; the tokenizer's scaled
    latents, the generator protocol's layout) for class ids ``labels [B]`` (``num_classes``:
    unconditional); :func:`sample_tokens` is the same sampler over ``[B, L, D]`` tokens.

    One jitted ``lax.fori_loop`` over MAR's iterations with the diffusion sampler's loop inside,
    ``model`` and ``opts`` static: one compile per model, options and batch size. ``orders``
    (``[B, L]`` permutations of the positions, e.g. raster order) replaces the random generation
    orders. Raises ``ValueError`` for class ids out of range, ``num_iter`` outside ``[1, L]`` and
    orders that are not ``[B, L]``.
    """
    _check_sample_args(model, labels, opts)
    if orders is not None:
        orders = jnp.asarray(orders, jnp.int32)
        want = (np.shape(labels)[0], model.seq_len)
        if orders.shape != want:
            raise ValueError(f"orders of shape {tuple(orders.shape)} must be [B, L] = {want}; pass one permutation "
                             "of the positions per sample.")
    return _sample_jit(model, params, jnp.asarray(labels, jnp.int32), rng, opts, return_steps, orders)


# ------------------------------------------------------------------ family adapter (trainers)

_BUILD_KEYS = {f.name for f in dataclasses.fields(MAR)} - {"num_classes", "grid", "token_dim", "parent", "name"}


def build(cfg: dict, *, num_classes: int, grid: tuple[int, ...], latent_dim: int, **_: Any) -> MAR:
    """A :class:`MAR` from a config section (``config.generator`` as a dict; ``arch`` ignored)
    over the tokenizer's latent ``grid = (H, W)`` of ``latent_dim`` channels.

    ``variant`` (``'B'``, ``'L'``, ``'H'``) gives MAR's sizes, other keys override them;
    ``patch_size`` (default 1) groups latents into tokens of ``latent_dim * patch_size²``
    channels over a ``(H / p, W / p)`` grid. Unknown keys are a ``ValueError``.
    """
    kw = {k: v for k, v in dict(cfg).items() if k != "arch"}
    variant = kw.pop("variant", None)
    unknown = sorted(set(kw) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown MAR config keys {unknown}; valid keys are {sorted(_BUILD_KEYS | {'variant'})}.")
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"generator.variant={variant!r} is unknown; choose one of {sorted(VARIANTS)}.")
        kw = {**VARIANTS[variant], **kw}
    for key in ("dtype", "param_dtype"):
        if isinstance(kw.get(key), str):
            if kw[key] not in DTYPES:
                raise ValueError(f"generator.{key}={kw[key]!r} is unknown; use one of {sorted(DTYPES)}.")
            kw[key] = DTYPES[kw[key]]
    p = int(kw.pop("patch_size", 1))
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or p < 1 or grid[0] % p or grid[1] % p:
        raise ValueError(f"patch_size={p} does not divide the tokenizer's latent grid {grid}; use a patch size "
                         "dividing both sides (MAR uses 1).")
    model = MAR(num_classes=int(num_classes), grid=(grid[0] // p, grid[1] // p), token_dim=int(latent_dim) * p * p,
                patch_size=p, **kw)
    check_model(model)
    return model
