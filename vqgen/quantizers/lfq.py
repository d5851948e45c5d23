"""Lookup-free quantization (MAGVIT-v2, Yu et al. 2023) with its entropy loss.

Each of the ``D`` channels of ``z`` is quantized to its sign, so the codebook is the implicit set
of the ``2**D`` corners of the hypercube ``{-s, +s}^D`` (``s = codebook_scale``, 1 by default).
The bit order of the code id is a field: with ``bit_order='msb'`` (the default) channel ``i``
carries bit weight ``2**(D-1-i)`` (channel 0 is the most significant bit); with
``bit_order='lsb'`` channel ``i`` carries ``2**i``, as in Open-MAGVIT2 (TencentARC/SEED-Voken),
so its code ids can be used unchanged. ``indices`` and ``decode_indices`` follow it; the entropy
terms do not depend on how codes are numbered.

Entropy terms. With ``p(c|z) = softmax_c(-||z - c||^2 / tau)`` over the ``2**D`` codes:

* ``per_sample_entropy = mean_tokens H(p(.|z))``. Because ``||z - c||^2`` is a sum over
  channels, ``p(c|z)`` is a product of per-channel two-way softmaxes with logit
  ``a_i = 4 s z_i / tau`` for the ``+s`` side, and ``H(p(.|z))`` is the sum of the channels'
  binary entropies. This term is **exact for every D** and costs ``O(tokens * D)``.
* ``codebook_entropy = H(mean_tokens p(.|z))``. The token average of a product distribution
  does not factorise, so with ``num_groups=1`` it is computed **exactly** over all ``2**D``
  codes, scanning over chunks of tokens so that at most ``codebook_entropy_chunk``
  ``[token, code]`` probabilities exist at once (D=18 and 2,048 tokens: 16 tokens x 262,144
  codes per chunk instead of 2 GiB); no ``[tokens, 2**D]`` array exists in the forward or the
  backward pass. Above ``D = 18`` channels per group the exact term is refused (set
  ``num_groups``). With ``num_groups=G`` the channels are split into ``G``
  contiguous groups of ``D/G`` channels; each group's marginal over its ``2**(D/G)`` codes is
  computed exactly and averaged over tokens, and the term is **the sum of the G groups'
  entropies** (the channel-group factorisation of MAGVIT-v2 / Open-MAGVIT2). That sum is an upper
  bound of the exact joint entropy and equals it when the groups are independent under the
  token average.

Factorised ids (Open-MAGVIT2's ``token_factorization``, ``factorized_bits=[9, 9]`` for its
factorised AR head): :func:`split_factorized_ids` cuts a code id into the ids of contiguous
channel blocks (channels 0-8 and 9-17 for ``(9, 9)``), each block numbered in the same
``bit_order`` as the whole id; :func:`join_factorized_ids` is its inverse. With ``'lsb'`` the
parts are Open-MAGVIT2's ``(indices_pre, indices_post)`` (``id = pre + 2**9 * post``); with
``'msb'`` the first block is the high bits (``id = first * 2**9 + second``).

With ``entropy_eps > 0`` every codebook entropy above becomes the smoothed
``-sum_c pbar(c) log(pbar(c) + entropy_eps)``, the official Open-MAGVIT2 / IBQ form (``eps = 1e-5``
there; with ``num_groups > 1`` it is applied to each group's entropy). The per-sample term stays
exact: the official code adds ``eps`` to the logits before ``log_softmax``, a constant shift that
changes nothing. ``entropy_eps = 0`` (the default) is the exact entropy.

``entropy_loss = per_sample_entropy - codebook_entropy_weight * codebook_entropy`` and
``loss = entropy_loss_weight * entropy_loss + commitment_weight * mean((z - sg(q))^2)``.
All entropy and loss arithmetic is float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.quantizers.base import QuantizerOutput, entropy, straight_through, usage_metrics

# Above this many codes the usage histogram is replaced by the sort-based count (same numbers).
_MAX_HISTOGRAM_CODES = 1 << 20
# The codebook entropy is exact over each channel group's 2**(dim/num_groups) codes; above 2**18
# codes per group (Open-MAGVIT2's whole codebook) that is refused and a larger num_groups named.
MAX_GROUP_BITS = 18
_MAX_INDEX_BITS = 31  # indices are int32
BIT_ORDERS = ("msb", "lsb")


def bit_shifts(num_bits: int, bit_order: str = "msb") -> jax.Array:
    """``[num_bits]`` int32 bit position of each channel in a code id.

    ``'msb'``: channel ``i`` is bit ``num_bits-1-i`` (channel 0 most significant);
    ``'lsb'``: channel ``i`` is bit ``i`` (channel 0 least significant, as in Open-MAGVIT2).
    """
    if bit_order == "msb":
        return jnp.arange(num_bits - 1, -1, -1, dtype=jnp.int32)  # [num_bits]
    if bit_order == "lsb":
        return jnp.arange(num_bits, dtype=jnp.int32)  # [num_bits]
    raise ValueError(f"bit_order is {bit_order!r}; use one of {BIT_ORDERS}.")


def bit_weights(num_bits: int, bit_order: str = "msb") -> jax.Array:
    """``[num_bits]`` int32 weight ``2**bit_shifts(...)`` of each channel in a code id."""
    return jnp.left_shift(1, bit_shifts(num_bits, bit_order))  # [num_bits]


def code_bits(num_bits: int, bit_order: str = "msb") -> jax.Array:
    """``[2**num_bits, num_bits]`` float32 0/1 bits of every code id, channel by channel."""
    ids = jnp.arange(2**num_bits, dtype=jnp.int32)  # [n]
    return ((ids[:, None] >> bit_shifts(num_bits, bit_order)[None, :]) & 1).astype(jnp.float32)  # [n, k]


def _factor_offsets(num_bits: int, factorized_bits: tuple[int, ...], bit_order: str) -> list[tuple[int, int]]:
    """``(shift, bits)`` of each channel block of a ``num_bits``-bit code id (``split_factorized_ids``)."""
    factorized_bits = tuple(int(b) for b in factorized_bits)
    if not factorized_bits or min(factorized_bits) < 1 or sum(factorized_bits) != num_bits:
        raise ValueError(
            f"factorized_bits={factorized_bits} must be positive block sizes that add up to the {num_bits} bits of "
            f"the code (e.g. {(num_bits // 2, num_bits - num_bits // 2)})."
        )
    if bit_order not in BIT_ORDERS:
        raise ValueError(f"bit_order is {bit_order!r}; use one of {BIT_ORDERS}.")
    out, start = [], 0
    for bits in factorized_bits:  # channels [start, start + bits)
        shift = start if bit_order == "lsb" else num_bits - start - bits
        out.append((shift, bits))
        start += bits
    return out


def split_factorized_ids(
    indices: jax.Array, num_bits: int, factorized_bits: tuple[int, ...] = (9, 9), bit_order: str = "msb"
) -> tuple[jax.Array, ...]:
    """Code ids ``[...]`` of ``num_bits`` channels -> one id ``[...]`` per contiguous channel block.

    Block ``j`` covers the next ``factorized_bits[j]`` channels (in channel order) and is numbered
    in ``bit_order`` within the block, so ``split_factorized_ids(ids, 18, (9, 9), 'lsb')`` gives
    Open-MAGVIT2's ``(indices_pre, indices_post)`` and decoding each block's bits gives the same
    channels as decoding the whole id.
    """
    ids = indices.astype(jnp.int32)
    return tuple((ids >> shift) & ((1 << bits) - 1) for shift, bits in _factor_offsets(num_bits, factorized_bits, bit_order))


def join_factorized_ids(
    parts: tuple[jax.Array, ...], num_bits: int, factorized_bits: tuple[int, ...] = (9, 9), bit_order: str = "msb"
) -> jax.Array:
    """Inverse of :func:`split_factorized_ids`: the blocks' ids ``[...]`` -> whole code ids ``[...]``."""
    offsets = _factor_offsets(num_bits, factorized_bits, bit_order)
    if len(parts) != len(offsets):
        raise ValueError(f"got {len(parts)} id blocks for factorized_bits={tuple(factorized_bits)}; pass one per block.")
    out = jnp.zeros(jnp.shape(parts[0]), jnp.int32)
    for part, (shift, bits) in zip(parts, offsets):
        out = out | ((part.astype(jnp.int32) & ((1 << bits) - 1)) << shift)
    return out


def entropy_with_eps(probs: jax.Array, eps: float, axis: int = -1) -> jax.Array:
    """``-sum p log(p + eps)`` in nats, float32; ``eps = 0`` is the exact ``entropy`` (``0 log 0 = 0``).

    The smoothed form is the codebook entropy of the official Open-MAGVIT2 and IBQ code
    (``eps = 1e-5`` there).
    """
    if eps < 0:
        raise ValueError(f"entropy eps is {eps}; it must be >= 0 (0 = exact entropy).")
    if eps == 0:
        return entropy(probs, axis=axis)
    probs = probs.astype(jnp.float32)
    return -jnp.sum(probs * jnp.log(probs + jnp.float32(eps)), axis=axis)


def binary_entropy_from_logits(a: jax.Array) -> jax.Array:
    """Entropy (nats) of a Bernoulli with logit ``a``, stable for large ``|a|``."""
    p = jax.nn.sigmoid(a)
    return p * jax.nn.softplus(-a) + (1.0 - p) * jax.nn.softplus(a)


def mean_group_code_probs(
    logits: jax.Array, num_groups: int, chunk_elements: int, bit_order: str = "msb"
) -> jax.Array:
    """Token average of each channel group's exact marginal over its codes.

    Args:
      logits: ``[T, D]`` float32 per-channel logits ``a`` with ``p(bit=1) = sigmoid(a)``.
      num_groups: ``G``; ``D % G == 0``.
      chunk_elements: at most this many ``[token, group, code]`` probabilities per scan step
        (at least one token per step).
      bit_order: how a group's channels number its codes (``bit_shifts``); entropies of the
        result do not depend on it.

    Returns:
      ``[G, 2**(D/G)]`` float32: ``mean_t p_g(c | z_t)``, code ids in ``bit_order`` within the group.
    """
    num_tokens, dim = logits.shape
    k = dim // num_groups
    n = 2**k
    bits = code_bits(k, bit_order)  # [n, k]
    chunk = int(max(1, min(num_tokens, chunk_elements // (num_groups * n))))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    a = jnp.pad(logits, ((0, pad), (0, 0))).reshape(num_chunks, chunk, num_groups, k)  # [S, C, G, k]
    weights = jnp.pad(jnp.ones((num_tokens,), jnp.float32), (0, pad)).reshape(num_chunks, chunk)  # [S, C]

    # log p_g(c|z) = sum_j log sigmoid(-a_j) + sum_j bit_j(c) a_j, since log s(a) - log s(-a) = a.
    @jax.checkpoint  # the backward pass recomputes each chunk instead of storing [T, G, n]
    def body(acc, xs):
        a_c, w_c = xs  # [C, G, k], [C]
        base = jnp.sum(jax.nn.log_sigmoid(-a_c), axis=-1, keepdims=True)  # [C, G, 1]
        logp = base + jnp.einsum("cgk,nk->cgn", a_c, bits, precision=jax.lax.Precision.HIGHEST)  # [C, G, n]
        acc = acc + jnp.einsum("c,cgn->gn", w_c, jnp.exp(logp), precision=jax.lax.Precision.HIGHEST)  # [G, n]
        return acc, None

    acc, _ = jax.lax.scan(body, jnp.zeros((num_groups, n), jnp.float32), (a, weights))
    return acc / num_tokens  # [G, n]


def sorted_usage_metrics(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """``usage`` and ``perplexity`` like ``usage_metrics``, from a sort instead of a histogram.

    Memory is ``O(tokens)`` whatever ``codebook_size`` is, for implicit codebooks too large to
    histogram (e.g. ``2**30`` codes).
    """
    flat = jnp.sort(indices.reshape(-1).astype(jnp.int32))  # [T]
    num_tokens = flat.shape[0]
    is_start = jnp.concatenate([jnp.ones((1,), bool), flat[1:] != flat[:-1]])  # [T]
    run_id = jnp.cumsum(is_start.astype(jnp.int32)) - 1  # [T]
    counts = jax.ops.segment_sum(jnp.ones((num_tokens,), jnp.float32), run_id, num_segments=num_tokens)  # [T]
    probs = counts / num_tokens
    return {
        "usage": jnp.sum(is_start.astype(jnp.float32)) / float(codebook_size),
        "perplexity": jnp.exp(entropy(probs)),
    }


class LookupFreeQuantizer(nn.Module):
    """MAGVIT-v2 lookup-free quantizer: ``sign(z)`` per channel, implicit ``2**dim`` codebook.

    ``quantized = where(z > 0, s, -s)`` with a straight-through gradient (``s = codebook_scale``,
    1.0 by default, i.e. exactly ``+-1``). ``indices`` sum the channel weights over the channels
    ``i`` with ``z_i > 0``: ``2**(dim-1-i)`` with ``bit_order='msb'``, ``2**i`` with ``'lsb'``;
    ``decode_indices`` inverts the same order. See the module docstring for the entropy terms:
    ``per_sample_entropy`` is exact for any ``dim``; ``codebook_entropy`` is exact with
    ``num_groups=1`` and is the sum of the groups' marginal entropies with ``num_groups > 1``
    (smoothed with ``entropy_eps`` when it is > 0).

    Attributes:
      dim: channels of ``z`` (= bits per code); ``codebook_size = 2**dim``.
      entropy_loss_weight: weight of ``per_sample_entropy - gamma * codebook_entropy`` in ``loss``.
      commitment_weight: weight of ``mean((z - sg(quantized))^2)`` in ``loss``.
      codebook_entropy_weight: ``gamma``.
      entropy_temperature: ``tau`` of ``p(c|z) = softmax(-||z - c||^2 / tau)``.
      num_groups: channel groups for the codebook entropy; must divide ``dim`` and leave at most
        18 channels per group (``dim > 18`` with ``num_groups=1``, the exact entropy over more than
        2**18 codes, is refused with the smallest ``num_groups`` that works named).
      codebook_scale: ``s``, the magnitude of the code values.
      bit_order: ``'msb'`` (default): channel ``i`` has weight ``2**(dim-1-i)`` in the code id;
        ``'lsb'``: channel ``i`` has weight ``2**i``, the order of Open-MAGVIT2's code ids.
      entropy_eps: smoothing of the codebook entropy, ``-sum pbar log(pbar + eps)``; 0.0 (default)
        is the exact entropy, 1e-5 is the official Open-MAGVIT2 / IBQ value. The per-sample
        entropy is exact either way (as in the official code).
      codebook_entropy_chunk: at most this many token-code probabilities exist at once while the
        codebook entropy is computed (a few times ``4 * chunk`` bytes in all: 52 MiB of XLA
        temporaries for the forward and backward pass at the default, D=18, 2,048 tokens).
      dtype: dtype of ``quantized`` (``None``: the dtype of ``z``; ``decode_indices``: float32).
      param_dtype: accepted for a uniform quantizer interface; this module has no parameters.
    """

    dim: int
    entropy_loss_weight: float = 0.1
    commitment_weight: float = 0.25
    codebook_entropy_weight: float = 1.0
    entropy_temperature: float = 0.01
    num_groups: int = 1
    codebook_scale: float = 1.0
    bit_order: str = "msb"
    entropy_eps: float = 0.0
    codebook_entropy_chunk: int = 1 << 22
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def _check_config(self) -> None:
        if self.dim < 1:
            raise ValueError(f"LookupFreeQuantizer.dim is {self.dim}; set it to the number of channels of z (>= 1).")
        if self.dim > _MAX_INDEX_BITS:
            raise ValueError(
                f"LookupFreeQuantizer.dim is {self.dim} but indices are int32; use dim <= {_MAX_INDEX_BITS}."
            )
        if self.num_groups < 1 or self.dim % self.num_groups:
            raise ValueError(
                f"LookupFreeQuantizer.num_groups={self.num_groups} does not divide dim={self.dim}; "
                "choose num_groups among the divisors of dim."
            )
        if self.dim // self.num_groups > MAX_GROUP_BITS:
            fix = min(g for g in range(1, self.dim + 1) if self.dim % g == 0 and self.dim // g <= MAX_GROUP_BITS)
            raise ValueError(
                f"LookupFreeQuantizer(dim={self.dim}, num_groups={self.num_groups}) would compute the exact "
                f"codebook entropy over 2**{self.dim // self.num_groups} codes per group, more than the "
                f"2**{MAX_GROUP_BITS} it allows; set num_groups={fix} (the entropy of {fix} groups of "
                f"{self.dim // fix} channels)."
            )
        if self.bit_order not in BIT_ORDERS:
            raise ValueError(
                f"LookupFreeQuantizer.bit_order is {self.bit_order!r}; use 'msb' (channel 0 is the most "
                "significant bit) or 'lsb' (channel 0 is the least significant bit, as in Open-MAGVIT2)."
            )
        if self.entropy_eps < 0:
            raise ValueError(
                f"LookupFreeQuantizer.entropy_eps is {self.entropy_eps}; it must be >= 0 (0 = exact entropy)."
            )
        if self.entropy_temperature <= 0:
            raise ValueError(
                f"LookupFreeQuantizer.entropy_temperature is {self.entropy_temperature}; it must be > 0."
            )

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantizes ``z`` of shape ``[..., dim]``; ``train`` is accepted for a uniform interface."""
        del train
        self._check_config()
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"LookupFreeQuantizer got z with last dimension {z.shape[-1]}, expected dim={self.dim}; "
                "project z to dim channels or set dim to match."
            )
        out_dtype = z.dtype if self.dtype is None else self.dtype
        zf = z.astype(jnp.float32)  # [..., D]
        scale = jnp.float32(self.codebook_scale)
        hard = jnp.where(zf > 0, scale, -scale)  # [..., D]
        quantized = straight_through(zf, hard).astype(out_dtype)  # [..., D]
        weights = bit_weights(self.dim, self.bit_order)  # [D]
        indices = jnp.sum(jnp.where(zf > 0, weights, 0), axis=-1).astype(jnp.int32)  # [...]

        flat = zf.reshape(-1, self.dim)  # [T, D]
        logits = 4.0 * scale * flat / jnp.float32(self.entropy_temperature)  # [T, D]
        per_sample_entropy = jnp.mean(jnp.sum(binary_entropy_from_logits(logits), axis=-1))
        group_probs = mean_group_code_probs(
            logits, self.num_groups, self.codebook_entropy_chunk, self.bit_order
        )  # [G, n]
        codebook_entropy = jnp.sum(entropy_with_eps(group_probs, self.entropy_eps, axis=-1))
        entropy_loss = per_sample_entropy - self.codebook_entropy_weight * codebook_entropy
        commitment_loss = jnp.mean(jnp.square(zf - jax.lax.stop_gradient(hard)))
        loss = self.entropy_loss_weight * entropy_loss + self.commitment_weight * commitment_loss

        if self.codebook_size <= _MAX_HISTOGRAM_CODES:
            usage = usage_metrics(indices, self.codebook_size)
        else:
            usage = sorted_usage_metrics(indices, self.codebook_size)
        metrics = {
            "per_sample_entropy": per_sample_entropy,
            "codebook_entropy": codebook_entropy,
            "entropy_loss": entropy_loss,
            "commitment_loss": commitment_loss,
            **usage,
        }
        metrics = jax.tree.map(lambda x: x.astype(jnp.float32), metrics)
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss.astype(jnp.float32), metrics=metrics)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """``[...]`` int code ids -> ``[..., dim]`` code vectors ``+-codebook_scale`` (in ``bit_order``)."""
        self._check_config()
        bits = (indices.astype(jnp.int32)[..., None] >> bit_shifts(self.dim, self.bit_order)) & 1  # [..., D]
        scale = jnp.float32(self.codebook_scale)
        return jnp.where(bits > 0, scale, -scale).astype(jnp.float32 if self.dtype is None else self.dtype)  # [..., D]
