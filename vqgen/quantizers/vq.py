"""Nearest-neighbour vector quantisation (VQ-VAE, VQGAN, ViT-VQGAN).

:class:`VectorQuantizer` looks each vector of ``z`` up in a learned codebook and passes the
gradient straight through. Options cover the variants in use:

* ``code_dim < D``: ViT-VQGAN's factorised codes. ``z`` is projected down to ``code_dim`` by a
  Dense layer, looked up there, and the chosen code is projected back to width ``D``.
* ``l2_normalize``: cosine lookup; both the (projected) ``z`` and the codes are unit vectors and
  the losses are measured between unit vectors.
* ``use_ema``: the codebook is an exponential moving average of the vectors assigned to each
  code (VQ-VAE appendix / Sonnet ``VectorQuantizerEMA``) instead of a trained parameter.
* ``dead_code_threshold > 0``: codes whose moving-average usage count falls below the threshold
  are re-initialised from random vectors of the current batch.
* ``entropy_loss_weight > 0``: the MAGVIT-style entropy penalty over ``softmax(-dist / tau)``.

The helpers :func:`squared_distances` and :func:`nearest_code` are shared with the other
codebook quantizers. :func:`nearest_code_index` is the lookup of the common path: the same
nearest code, found block by block without forming the ``[N, K]`` distance matrix.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.quantizers.base import QuantizerOutput, entropy, usage_metrics

Initializer = Callable[..., jax.Array]
STATE = "quantizer_state"  # linen collection holding EMA codebooks and usage counts
CODEBOOK_RNG = "codebook"  # optional rng stream used for dead-code restarts

default_codebook_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit vectors along the last axis (float32); zero vectors stay zero."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def squared_distances(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """``||x_n - c_k||²`` in float32 for ``x`` ``[N, d]`` and ``codebook`` ``[K, d]`` -> ``[N, K]``."""
    x = x.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    cross = jnp.einsum("nd,kd->nk", x, codebook, precision=jax.lax.Precision.HIGHEST)  # [N, K]
    dist = jnp.sum(x * x, -1, keepdims=True) - 2.0 * cross + jnp.sum(codebook * codebook, -1)[None]
    return jnp.maximum(dist, 0.0)  # [N, K]


def nearest_code(x: jax.Array, codebook: jax.Array, cosine: bool = False) -> tuple[jax.Array, jax.Array]:
    """Index of the nearest code for each row of ``x`` ``[N, d]`` and the distances ``[N, K]``.

    With ``cosine`` both sides are l2-normalised first, so the argmin is the cosine argmax.
    """
    if cosine:
        x, codebook = l2_normalize(x), l2_normalize(codebook)
    dist = squared_distances(x, codebook)  # [N, K]
    return jnp.argmin(dist, axis=-1).astype(jnp.int32), dist


LOOKUP_BLOCK = 512  # codes per block of nearest_code_index's search
_AUGMENT_MAX_WIDTH = 64  # below this width the score's code term rides in the product (see _score_operands)
_SAFE_BOUND = 2.0**125  # a bound on |partial sums| below which no score can overflow


def _score_operands(x: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Operands of ``x_n·c_k - ||c_k||²/2`` as ``rows @ codes.T (+ bias)``, all float32.

    For narrow codes the bias is an extra column (a 1 in ``rows``, ``-||c||²/2`` in ``codes``),
    which costs nothing beside the product; for wide codes it is added after the product, since a
    width one past a round number slows the product down. Returns ``(rows, codes, bias or None)``.
    """
    x = x.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    bias = -0.5 * jnp.sum(codebook * codebook, axis=-1)  # [K]
    if codebook.shape[-1] < _AUGMENT_MAX_WIDTH:
        rows = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), jnp.float32)], axis=-1)  # [N, d+1]
        return rows, jnp.concatenate([codebook, bias[:, None]], axis=-1), None  # [K, d+1]
    return x, codebook, bias


def _scores(rows: jax.Array, codes: jax.Array, bias: jax.Array | None) -> jax.Array:
    s = jnp.dot(rows, codes.T, precision=jax.lax.Precision.HIGHEST)  # [n, k]
    return s if bias is None else s + bias[None]


def code_scores(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """``x_n·c_k - ||c_k||²/2`` in float32 for ``x`` ``[N, d]``, ``codebook`` ``[K, d]`` -> ``[N, K]``.

    ``||x_n - c_k||² = ||x_n||² - 2 * score``, so the nearest code is the score's argmax.
    """
    return _scores(*_score_operands(x, codebook))


def _first_argmax(s: jax.Array) -> jax.Array:
    """Row-wise first index of the maximum of a finite ``s`` ``[n, k]`` (two plain reductions)."""
    k = s.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
    return jnp.min(jnp.where(s == jnp.max(s, axis=-1, keepdims=True), iota, k), axis=-1)


def nearest_code_index(x: jax.Array, codebook: jax.Array, block_size: int = LOOKUP_BLOCK) -> jax.Array:
    """``argmax_k code_scores(x, codebook)`` (first index on ties) without forming ``[N, K]``.

    The nearest code of each row of ``x`` ``[N, d]`` among ``codebook`` ``[K, d]``, as ``int32``
    ``[N]``; equal to ``jnp.argmax(code_scores(x, codebook), -1)``, NaN handling included.
    Not differentiable (its inputs are wrapped in ``stop_gradient``).

    Two passes, each cheap where a full ``[N, K]`` matrix is not:

    1. A scan over blocks of ``block_size`` codes keeps each row's running maximum score and the
       first block that reaches it. Each block's product feeds one max-reduction, which XLA's CPU
       backend fuses with the product, so the block's scores are never written out.
    2. Rows sorted by their winning block are taken in chunks of rows that share a block; each
       chunk recomputes that one block's scores and takes its first argmax. At most
       ``(blocks + N / chunk)`` small products, about ``N * block_size`` scores in all.

    Both passes compute a score with the same sequence of multiply-adds as the full product
    does on XLA's CPU backend, so the result is the full search's, ties included (tested). On a
    backend whose products round differently with their shape, a result can differ from the
    full search only between codes whose scores are equal to within rounding; pass 2 returns the
    argmax of its own scores, so every result is a nearest code. The codebook is padded to
    whole blocks with copies of its last code, which tie with it and lose. Non-finite inputs, or inputs so large that a score could overflow, go to a slower
    scan that takes each block's ``jnp.argmax`` instead, so NaNs are handled as ``jnp.argmax``
    does (the first NaN wins).
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be a positive number of codes; {LOOKUP_BLOCK} is the default.")
    x = jax.lax.stop_gradient(x)
    codebook = jax.lax.stop_gradient(codebook)
    n, K = x.shape[0], codebook.shape[0]
    rows, codes, bias = _score_operands(x, codebook)
    kb = min(block_size, K)
    nb = -(-K // kb)
    if nb * kb != K:  # whole blocks: copies of the last code
        codes = jnp.concatenate([codes, jnp.broadcast_to(codes[-1:], (nb * kb - K, codes.shape[-1]))])
        if bias is not None:
            bias = jnp.concatenate([bias, jnp.broadcast_to(bias[-1:], (nb * kb - K,))])
    code_blocks = codes.reshape(nb, kb, codes.shape[-1])  # [nb, kb, w]
    bias_blocks = None if bias is None else bias.reshape(nb, kb)
    block_ids = jnp.arange(nb, dtype=jnp.int32)

    def scan_blocks(block_fn):
        def body(carry, blk):
            cblk, b = blk[0], blk[-1]
            s = _scores(rows, cblk, None if bias is None else blk[1])  # [n, kb]
            return block_fn(carry, s, b), None

        init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
        xs = (code_blocks, block_ids) if bias is None else (code_blocks, bias_blocks, block_ids)
        return jax.lax.scan(body, init, xs)[0]

    def two_pass():
        def best_block(carry, s, b):
            best, which = carry
            m = jnp.max(s, axis=-1)  # [n]
            take = m > best  # strict: the first block reaching the maximum keeps it
            return jnp.where(take, m, best), jnp.where(take, b, which)

        _, which = scan_blocks(best_block)  # [n]
        chunk = min(512, max(64, _next_pow2(-(-n // 32))))  # rows per product of pass 2
        order = jnp.argsort(which, stable=True)  # rows grouped by winning block
        which_s = jnp.concatenate([which[order], jnp.full((chunk,), -1, jnp.int32)])  # [n + chunk]
        rows_s = jnp.concatenate([rows[order], jnp.zeros((chunk, rows.shape[-1]), jnp.float32)])

        def step(state):
            pos, out = state
            b = which_s[pos]
            part = jax.lax.dynamic_slice_in_dim(rows_s, pos, chunk)  # [chunk, w]
            s = _scores(part, code_blocks[b], None if bias is None else bias_blocks[b])  # [chunk, kb]
            found = _first_argmax(s) + b * kb
            valid = jax.lax.dynamic_slice_in_dim(which_s, pos, chunk) == b  # a prefix of the chunk
            old = jax.lax.dynamic_slice_in_dim(out, pos, chunk)
            out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid, found, old), pos, 0)
            return pos + jnp.sum(valid.astype(jnp.int32)), out

        init = (jnp.zeros((), jnp.int32), jnp.zeros((n + chunk,), jnp.int32))
        _, out = jax.lax.while_loop(lambda st: st[0] < n, step, init)
        return jnp.zeros((n,), jnp.int32).at[order].set(out[:n])

    def nan_aware():
        def merge(carry, s, b):
            best, idx = carry
            i = jnp.argmax(s, axis=-1).astype(jnp.int32)  # [n]; first NaN, else first maximum
            v = jnp.take_along_axis(s, i[:, None], axis=-1)[:, 0]
            take = (v > best) | (jnp.isnan(v) & ~jnp.isnan(best))
            return jnp.where(take, v, best), jnp.where(take, i + b * kb, idx)

        return scan_blocks(merge)[1]

    idx = jax.lax.cond(_scores_are_safe(rows, codes, bias), two_pass, nan_aware)
    return jnp.minimum(idx, K - 1)  # a padding copy can only stand for the last code


def _scores_are_safe(rows: jax.Array, codes: jax.Array, bias: jax.Array | None) -> jax.Array:
    """True when every score and partial sum is finite: no NaN or inf input, and
    ``sum_j max|rows_j| max|codes_j| (+ max|bias|)``, a bound on them all, far from overflow."""
    finite = jnp.all(jnp.isfinite(rows)) & jnp.all(jnp.isfinite(codes))  # (max-reductions may skip NaN)
    bound = jnp.sum(jnp.max(jnp.abs(rows), axis=0, initial=0.0) * jnp.max(jnp.abs(codes), axis=0))
    if bias is not None:
        finite = finite & jnp.all(jnp.isfinite(bias))
        bound = bound + jnp.max(jnp.abs(bias))
    return finite & (bound < _SAFE_BOUND)


def _next_pow2(v: int) -> int:
    """Smallest power of two >= ``max(v, 1)``."""
    return 1 << (max(1, v) - 1).bit_length()


def entropy_terms(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample entropy (mean over rows) and codebook entropy of ``softmax(logits)`` ``[N, K]``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [N, K]
    per_sample = jnp.mean(entropy(probs, axis=-1))
    codebook = entropy(jnp.mean(probs, axis=0))
    return per_sample, codebook


def _boxed(value_fn: Callable[[], jax.Array], names: tuple) -> Callable[[], Any]:
    return lambda: nn.with_logical_partitioning(value_fn, names)()


class VectorQuantizer(nn.Module):
    """VQ-VAE/VQGAN nearest-neighbour quantizer with a straight-through gradient.

    ``indices = argmin_k ||z - c_k||²`` (cosine after l2-normalisation);
    ``codebook_loss = mean((sg(z) - c)²)``, ``commitment_loss = mean((z - sg(c))²)``,
    ``loss = codebook_loss + beta * commitment_loss`` (+ ``entropy_loss_weight`` times
    ``per_sample_entropy - codebook_entropy_weight * codebook_entropy`` of
    ``softmax(-dist / entropy_temperature)`` when enabled). When ``code_dim`` differs from ``D``
    all of this happens in the projected ``code_dim`` space.

    Variables:
      * ``params/codebook`` ``[K, d]`` (logical axes ``('codebook', 'embed')``) unless
        ``use_ema``; ``params/proj_down``, ``params/proj_up`` when factorised.
      * collection ``'quantizer_state'`` when ``use_ema`` or ``dead_code_threshold > 0``:
        ``ema_count`` ``[K]`` (moving average of per-code assignment counts, starts at 1),
        with ``use_ema`` also ``codebook`` and ``ema_sum`` ``[K, d]`` (the codebook is
        ``ema_sum / ema_count`` with Laplace smoothing); without ``use_ema`` a
        ``codebook_delta`` ``[K, d]`` that dead-code restarts write into (the codebook used is
        ``params/codebook + codebook_delta``, so restarted codes keep training by gradient); and
        a ``step`` counter.

    The lookup is :func:`nearest_code_index`, which never forms the ``[N, K]`` distance matrix;
    only the entropy penalty, which needs every distance, uses :func:`squared_distances`.

    State is updated only when ``train=True`` and ``'quantizer_state'`` is mutable. Lookups use
    the codebook as it was before the update. With ``use_ema`` the codebook gets no gradient, so
    the codebook term is left out of ``loss`` (only ``beta * commitment_loss``); it is still
    reported in ``metrics``. EMA updates change only the codes assigned in the batch.

    Dead-code restart (``dead_code_threshold > 0``): after the count update, every code whose
    ``ema_count`` is below the threshold is replaced by a vector drawn uniformly from the
    current (global) batch, and its count is set to the threshold. The draw uses the
    ``'codebook'`` rng stream when the caller provides one (``rngs={'codebook': key}``),
    otherwise ``fold_in(PRNGKey(0), step)``, so runs are reproducible either way.

    Attributes:
      codebook_size: number of codes K.
      code_dim: lookup width; ``None`` means the width D of ``z``.
      l2_normalize: cosine lookup on unit vectors; codes are returned with unit norm.
      beta: commitment weight.
      use_ema: keep the codebook as an exponential moving average instead of a parameter.
      ema_decay: decay of the moving averages (also of the usage count).
      ema_epsilon: Laplace smoothing of the EMA counts.
      dead_code_threshold: restart codes whose EMA usage count falls below this; 0 = off.
      entropy_loss_weight: weight of the entropy penalty; 0 = off (and not computed).
      entropy_temperature: tau of ``softmax(-dist / tau)`` for the entropy penalty.
      codebook_entropy_weight: gamma, weight of the codebook entropy inside the penalty.
      dtype: compute dtype of the projections and of ``decode_indices``' output.
      param_dtype: storage dtype of parameters.
      codebook_init: initializer of the ``[K, d]`` codebook.
    """

    codebook_size: int
    code_dim: int | None = None
    l2_normalize: bool = False
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 0.0
    entropy_loss_weight: float = 0.0
    entropy_temperature: float = 0.01
    codebook_entropy_weight: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    codebook_init: Initializer = default_codebook_init

    def __call__(self, z: jax.Array, train: bool = False, update_state: bool = True) -> QuantizerOutput:
        """Quantizes ``z`` ``[..., D]``; ``update_state=False`` skips the EMA/restart update."""
        return self._run(z=z, train=train, update_state=update_state)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Code vectors in z-space for int ``indices`` ``[...]`` -> ``[..., D]`` in ``dtype``."""
        return self._run(indices=indices)

    def update_codebook_state(self, z: jax.Array, indices: jax.Array) -> None:
        """Applies the EMA / dead-code update for z-space vectors ``z`` ``[..., D]`` with ``indices``.

        Used by quantizers that call one shared codebook several times per step and want a
        single update from all calls. A no-op when ``'quantizer_state'`` is not mutable.
        """
        self._run(z=z, indices=indices, train=True)

    # ------------------------------------------------------------------------------------------

    @property
    def _has_state(self) -> bool:
        return self.use_ema or self.dead_code_threshold > 0

    def _check_fields(self) -> None:
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 1.")
        if self.code_dim is not None and self.code_dim < 1:
            raise ValueError(f"code_dim={self.code_dim} must be a positive width or None (= D).")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1); 0.99 is the usual value.")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={self.dead_code_threshold} must be >= 0 (0 turns it off).")

    def _stored_input_dim(self) -> int | None:
        """Width D that the existing variables were created for (None before init)."""
        if "proj_down" in self.variables.get("params", {}):
            return nn.meta.unbox(self.variables["params"]["proj_down"]["kernel"]).shape[0]
        for col in ("params", STATE):
            if "codebook" in self.variables.get(col, {}):
                return nn.meta.unbox(self.variables[col]["codebook"]).shape[-1]
        return None

    @nn.compact
    def _run(self, z=None, indices=None, train=False, update_state=True):
        self._check_fields()
        stored = self._stored_input_dim()
        if z is not None:
            in_dim = z.shape[-1]
            if stored is not None and stored != in_dim:
                raise ValueError(
                    f"z has last dimension {in_dim} but this VectorQuantizer was initialised for "
                    f"D={stored}; pass z of shape [..., {stored}] or re-initialise the quantizer."
                )
        elif stored is None:
            raise ValueError("decode_indices needs initialised variables; call init on a z first.")
        else:
            in_dim = stored
        factorised = self.code_dim is not None and self.code_dim != in_dim
        d = self.code_dim if factorised else in_dim
        K = self.codebook_size

        if factorised:
            proj_down = nn.Dense(
                d, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_down",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
            )
            proj_up = nn.Dense(
                in_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj_up",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            )

        if self._has_state and not self.is_initializing() and not self.has_variable(STATE, "ema_count"):
            raise ValueError(
                "this VectorQuantizer keeps state in the 'quantizer_state' collection (use_ema or "
                "dead_code_threshold > 0); pass all variables returned by init, not only 'params'."
            )
        init_codebook = lambda: self.codebook_init(self.make_rng("params"), (K, d), self.param_dtype)
        if self.use_ema:
            codebook_var = self.variable(STATE, "codebook", _boxed(init_codebook, ("codebook", "embed")))
            ema_sum = self.variable(STATE, "ema_sum", _boxed(lambda: codebook_var.value, ("codebook", "embed")))
            base = codebook_var.value  # [K, d]
        else:
            base = self.param(
                "codebook", nn.with_logical_partitioning(self.codebook_init, ("codebook", "embed")),
                (K, d), self.param_dtype,
            )  # [K, d]
        if self._has_state:
            ema_count = self.variable(
                STATE, "ema_count", _boxed(lambda: jnp.ones((K,), jnp.float32), ("codebook",))
            )
            step = self.variable(STATE, "step", lambda: jnp.zeros((), jnp.int32))
        delta = None
        if self.dead_code_threshold > 0 and not self.use_ema:
            delta = self.variable(
                STATE, "codebook_delta", _boxed(lambda: jnp.zeros((K, d), self.param_dtype), ("codebook", "embed"))
            )
        raw = base.astype(jnp.float32)
        if delta is not None:
            raw = raw + jax.lax.stop_gradient(delta.value.astype(jnp.float32))
        codebook = l2_normalize(raw) if self.l2_normalize else raw  # [K, d]

        def to_lookup_space(x):
            x = proj_down(x).astype(jnp.float32) if factorised else x.astype(jnp.float32)  # [..., d]
            return l2_normalize(x) if self.l2_normalize else x

        # ---- decode ---------------------------------------------------------------------
        if z is None:
            codes = jnp.take(codebook, indices.astype(jnp.int32), axis=0)  # [..., d]
            if factorised:
                codes = proj_up(codes.astype(self.dtype))  # [..., D]
            return codes.astype(self.dtype)

        def maybe_update(flat, idx):
            if not (train and self._has_state and self.is_mutable_collection(STATE)) or self.is_initializing():
                return
            flat = jax.lax.stop_gradient(flat).astype(jnp.float32)  # [N, d]
            counts = jax.ops.segment_sum(jnp.ones_like(idx, jnp.float32), idx, num_segments=K)  # [K]
            decay = self.ema_decay
            new_count = decay * ema_count.value + (1.0 - decay) * counts  # [K]
            if self.use_ema:
                sums = jax.ops.segment_sum(flat, idx, num_segments=K)  # [K, d]
                new_sum = decay * ema_sum.value + (1.0 - decay) * sums  # [K, d]
                n = jnp.sum(new_count)
                smoothed = (new_count + self.ema_epsilon) / (n + K * self.ema_epsilon) * n  # [K]
                new_codebook = jnp.where(
                    counts[:, None] > 0, new_sum / smoothed[:, None], codebook_var.value.astype(jnp.float32)
                )  # [K, d]
            if self.dead_code_threshold > 0:
                if self.has_rng(CODEBOOK_RNG):
                    key = self.make_rng(CODEBOOK_RNG)
                else:
                    key = jax.random.fold_in(jax.random.PRNGKey(0), step.value)
                pick = jax.random.randint(key, (K,), 0, flat.shape[0])  # [K]
                fresh = jnp.take(flat, pick, axis=0)  # [K, d]
                dead = new_count < self.dead_code_threshold  # [K]
                new_count = jnp.where(dead, self.dead_code_threshold, new_count)
                if self.use_ema:
                    new_codebook = jnp.where(dead[:, None], fresh, new_codebook)
                    new_sum = jnp.where(dead[:, None], fresh * self.dead_code_threshold, new_sum)
                else:
                    new_delta = fresh - base.astype(jnp.float32)  # [K, d]
                    delta.value = jnp.where(dead[:, None], new_delta, delta.value).astype(delta.value.dtype)
            if self.use_ema:
                codebook_var.value = new_codebook.astype(codebook_var.value.dtype)
                ema_sum.value = new_sum
            ema_count.value = new_count
            step.value = step.value + 1

        # ---- state update only (shared codebooks) -----------------------------------------
        if indices is not None:
            flat = to_lookup_space(z).reshape(-1, d)  # [N, d]
            maybe_update(flat, indices.reshape(-1).astype(jnp.int32))
            return None

        # ---- quantize -------------------------------------------------------------------
        z_low = to_lookup_space(z)  # [..., d] float32
        flat = z_low.reshape(-1, d)  # [N, d]
        if self.entropy_loss_weight > 0:  # the penalty needs every distance
            dist = squared_distances(flat, codebook)  # [N, K]
            idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # [N]
        else:  # blocked search: no [N, K] array
            idx = nearest_code_index(flat, codebook)  # [N]
        codes = jnp.take(codebook, idx, axis=0)  # [N, d]
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - codes))
        commitment_loss = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(codes)))
        loss = self.beta * commitment_loss
        if not self.use_ema:
            loss = loss + codebook_loss
        metrics = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
        if self.entropy_loss_weight > 0:
            per_sample, cb_entropy = entropy_terms(-dist / self.entropy_temperature)
            entropy_loss = per_sample - self.codebook_entropy_weight * cb_entropy
            loss = loss + self.entropy_loss_weight * entropy_loss
            metrics.update(per_sample_entropy=per_sample, codebook_entropy=cb_entropy, entropy_loss=entropy_loss)
        metrics.update(usage_metrics(idx, K))

        q = flat + jax.lax.stop_gradient(codes - flat)  # [N, d] straight-through
        q = q.reshape(z.shape[:-1] + (d,))  # [..., d]
        if factorised:
            q = proj_up(q.astype(self.dtype))  # [..., D]
        if update_state:
            maybe_update(flat, idx)
        return QuantizerOutput(
            quantized=q.astype(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss.astype(jnp.float32),
            metrics={k: v.astype(jnp.float32) for k, v in metrics.items()},
        )
