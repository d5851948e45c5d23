"""Index Backpropagation Quantization (IBQ, Shi et al. 2024).

IBQ makes every code receive a gradient at every step: the hard one-hot choice is
straight-through from the softmax over the logits ``z · Cᵀ``, so the gradient of
``quantized`` reaches every code through the logits (and the selected code directly as well).
This is what lets IBQ train codebooks of 2^18 codes without collapse.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.quantizers.base import QuantizerOutput, entropy, usage_metrics
from vqgen.quantizers.lfq import entropy_with_eps
from vqgen.quantizers.vq import Initializer, default_codebook_init


class IndexBackpropQuantizer(nn.Module):
    """IBQ: softmax over ``z · Cᵀ`` with a straight-through hard one-hot.

    With ``logits = z · Cᵀ`` ``[N, K]``, ``soft = softmax(logits)``, ``hard = one_hot(argmax)``,
    the official IBQ code (TencentARC/SEED-Voken ``IndexPropagationQuantize``) computes
    ``quantized = (hard - sg(soft) + soft) @ C``. Its forward value is ``C[index]``. With
    ``g = dL/dquantized`` its gradients are: the codebook gets ``hardᵀ · g`` (only the selected
    codes, from the matmul, whose coefficient has the value of ``hard``) plus the softmax path
    ``dlogitsᵀ · z`` (every code), and ``z`` gets only the softmax path ``dlogits · C``, where
    ``dlogits`` is the softmax backward of ``g · Cᵀ``.

    We compute the same expression split as ``hard @ C + (soft - sg(soft)) @ C``:
    ``quantized = C[index] + (soft - sg(soft)) @ sg(C)``. The gather gives ``hardᵀ · g`` without
    an ``[N, K]`` one-hot; the second matmul is exactly zero in the forward pass and carries the
    softmax path; its own codebook gradient ``(soft - sg(soft))ᵀ · g`` is zero in the official
    formula too, so ``sg(C)`` only skips computing it. Forward value and both gradients equal the
    official ones (tests/test_quantizers_ibq.py checks them against a float64 reference). Note
    that ``C[index] + soft @ C - sg(soft @ C)`` is *not* equivalent: it adds ``softᵀ · g`` to the
    codebook gradient.

    Loss, as in the official code:
    ``double_quant_loss = mean((quantized - z)²)`` (gradient to z and, through the straight-through
    above, to the codebook), ``commitment_loss = mean((z - sg(C[index]))²)``,
    ``codebook_loss = mean((sg(z) - C[index])²)``,
    ``loss = double_quant_loss + commitment_loss + beta * codebook_loss``. Note that the official
    code puts ``beta`` on the codebook term, not on the commitment term as plain VQ does; we follow
    it. When ``entropy_loss_weight > 0``, with ``p = softmax(logits / entropy_temperature)``,
    ``per_sample_entropy = mean_n H(p_n)`` (exact; the official code's ``+ eps`` on the logits
    before ``log_softmax`` is a constant shift and changes nothing),
    ``codebook_entropy = -Σ_k p̄_k log(p̄_k + entropy_eps)`` with ``p̄ = mean_n p_n``, and
    ``loss += entropy_loss_weight * (per_sample_entropy - codebook_entropy_weight * codebook_entropy)``.

    Attributes:
      codebook_size: number of codes K.
      beta: weight of the codebook term (see above).
      entropy_loss_weight: weight of the entropy penalty; 0 = off (and not computed).
      entropy_temperature: tau of the entropy softmax (0.01 in the official configs).
      codebook_entropy_weight: gamma, weight of the codebook entropy inside the penalty.
      entropy_eps: smoothing inside the log of the codebook entropy; 0.0 (default) is the exact
        entropy, 1e-5 is the official IBQ value.
      dtype: output dtype of ``decode_indices``.
      param_dtype: storage dtype of the codebook.
      codebook_init: initializer of the ``[K, D]`` codebook.
    """

    codebook_size: int
    beta: float = 0.25
    entropy_loss_weight: float = 0.0
    entropy_temperature: float = 0.01
    codebook_entropy_weight: float = 1.0
    entropy_eps: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    codebook_init: Initializer = default_codebook_init

    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantizes ``z`` ``[..., D]``; ``train`` is accepted for the common interface."""
        del train
        return self._run(z=z)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Code vectors ``C[indices]`` ``[..., D]`` in ``dtype``."""
        return self._run(indices=indices)

    @nn.compact
    def _run(self, z=None, indices=None):
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 1.")
        if self.entropy_eps < 0:
            raise ValueError(f"entropy_eps={self.entropy_eps} must be >= 0 (0 = exact entropy, 1e-5 = official IBQ).")
        stored = None
        if "codebook" in self.variables.get("params", {}):
            stored = nn.meta.unbox(self.variables["params"]["codebook"]).shape[-1]
        if z is None:
            if stored is None:
                raise ValueError("decode_indices needs initialised variables; call init on a z first.")
            dim = stored
        else:
            dim = z.shape[-1]
            if stored is not None and stored != dim:
                raise ValueError(
                    f"z has last dimension {dim} but this IndexBackpropQuantizer was initialised "
                    f"for D={stored}; pass z of shape [..., {stored}] or re-initialise it."
                )
        K = self.codebook_size
        codebook = self.param(
            "codebook", nn.with_logical_partitioning(self.codebook_init, ("codebook", "embed")),
            (K, dim), self.param_dtype,
        ).astype(jnp.float32)  # [K, D]
        if z is None:
            return jnp.take(codebook, indices.astype(jnp.int32), axis=0).astype(self.dtype)

        flat = z.astype(jnp.float32).reshape(-1, dim)  # [N, D]
        logits = jnp.einsum("nd,kd->nk", flat, codebook, precision=jax.lax.Precision.HIGHEST)  # [N, K]
        soft = jax.nn.softmax(logits, axis=-1)  # [N, K]
        idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [N]
        hard_codes = jnp.take(codebook, idx, axis=0)  # [N, D], hard @ C with gradient hardᵀ·g
        soft_delta = soft - jax.lax.stop_gradient(soft)  # [N, K], exactly zero in value
        soft_path = jnp.einsum(
            "nk,kd->nd", soft_delta, jax.lax.stop_gradient(codebook), precision=jax.lax.Precision.HIGHEST
        )  # [N, D], zero in value; gradient g·Cᵀ to soft
        q = hard_codes + soft_path  # [N, D], value C[idx]

        double_quant_loss = jnp.mean(jnp.square(q - flat))
        commitment_loss = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(hard_codes)))
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - hard_codes))
        loss = double_quant_loss + commitment_loss + self.beta * codebook_loss
        metrics = {
            "double_quant_loss": double_quant_loss,
            "commitment_loss": commitment_loss,
            "codebook_loss": codebook_loss,
        }
        if self.entropy_loss_weight > 0:
            probs = jax.nn.softmax(logits / self.entropy_temperature, axis=-1)  # [N, K]
            per_sample = jnp.mean(entropy(probs, axis=-1))
            cb_entropy = entropy_with_eps(jnp.mean(probs, axis=0), self.entropy_eps)
            entropy_loss = per_sample - self.codebook_entropy_weight * cb_entropy
            loss = loss + self.entropy_loss_weight * entropy_loss
            metrics.update(per_sample_entropy=per_sample, codebook_entropy=cb_entropy, entropy_loss=entropy_loss)
        metrics.update(usage_metrics(idx, K))
        return QuantizerOutput(
            quantized=q.reshape(z.shape).astype(z.dtype),
            indices=idx.reshape(z.shape[:-1]),
            loss=loss.astype(jnp.float32),
            metrics={k: v.astype(jnp.float32) for k, v in metrics.items()},
        )
