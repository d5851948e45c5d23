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
codebook quantizers.
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
        dist = squared_distances(flat, codebook)  # [N, K]
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)  # [N]
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
