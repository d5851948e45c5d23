"""A small real demo of the quantizers: ``python benchmarks/quantizer_demo.py``.

Each quantizer sits in the bottleneck of a tiny patch autoencoder (16 pixels -> MLP -> D
channels -> quantizer -> MLP -> 16 pixels) that is trained with Adam for a few hundred steps on
the 4x4 patches of the embedded MNIST digits (train split; patches that are all background are
dropped). It prints, on the test split's patches, the reconstruction MSE (pixels in [-1, 1]),
codebook usage and perplexity of each quantizer, next to the MSE of always predicting the mean
patch. It runs in well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqgen.data.embedded import load_mnist
from vqgen.quantizers.fsq import FiniteScalarQuantizer
from vqgen.quantizers.lfq import LookupFreeQuantizer
from vqgen.quantizers.vq import VectorQuantizer

PATCH = 4


def mnist_patches(split: str) -> np.ndarray:
    """``[N, 16]`` float32 4x4 patches in [-1, 1] of the embedded MNIST digits, with some ink."""
    images, _ = load_mnist(split)  # [B, 32, 32, 1] uint8
    b, h, w, _ = images.shape
    x = images[..., 0].reshape(b, h // PATCH, PATCH, w // PATCH, PATCH).transpose(0, 1, 3, 2, 4)
    x = x.reshape(-1, PATCH * PATCH).astype(np.float32) / 127.5 - 1.0  # [B*64, 16]
    return x[np.max(x, axis=1) > -1.0]


class PatchAutoencoder(nn.Module):
    """MLP encoder -> ``quantizer`` -> MLP decoder on flat patches ``[N, P]``."""

    quantizer: nn.Module
    code_dim: int
    width: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        h = nn.gelu(nn.Dense(self.width)(x))  # [N, W]
        z = nn.Dense(self.code_dim)(h)  # [N, D]
        q = self.quantizer(z, train=train)
        h = nn.gelu(nn.Dense(self.width)(q.quantized))  # [N, W]
        return nn.Dense(x.shape[-1])(h), q  # [N, P]


def quantizers() -> dict[str, tuple[Callable[[], nn.Module], int]]:
    """Name -> (constructor, channels D of z); all with 256 or 240 codes (about 8 bits)."""
    return {
        "VQ K=256": (lambda: VectorQuantizer(codebook_size=256), 8),
        "VQ K=256 l2 d=8": (lambda: VectorQuantizer(codebook_size=256, l2_normalize=True), 8),
        "LFQ D=8": (lambda: LookupFreeQuantizer(dim=8, entropy_loss_weight=0.1), 8),
        "LFQ D=8 G=2": (lambda: LookupFreeQuantizer(dim=8, num_groups=2, entropy_loss_weight=0.1), 8),
        "FSQ (8,6,5)": (lambda: FiniteScalarQuantizer(levels=(8, 6, 5)), 3),
    }


def fit(name: str, make: Callable[[], nn.Module], code_dim: int, train_x: np.ndarray, test_x: np.ndarray,
        steps: int, batch_size: int, seed: int) -> dict[str, float]:
    """Trains one patch autoencoder and returns its test metrics."""
    model = PatchAutoencoder(quantizer=make(), code_dim=code_dim)
    key = jax.random.key(seed)
    params = model.init(key, jnp.asarray(train_x[:batch_size]))["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, x):
        x_rec, q = model.apply({"params": params}, x, train=True)
        mse = jnp.mean(jnp.square(x_rec - x))
        return mse + q.loss, mse

    @jax.jit
    def step(params, opt_state, x):
        (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, mse

    @jax.jit
    def evaluate(params, x):
        x_rec, q = model.apply({"params": params}, x, train=False)
        return jnp.mean(jnp.square(x_rec - x)), q.metrics

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = train_x[rng.integers(0, len(train_x), batch_size)]
        params, opt_state, _ = step(params, opt_state, jnp.asarray(batch))
    mse, metrics = evaluate(params, jnp.asarray(test_x))
    return {"mse": float(mse), "usage": float(metrics["usage"]), "perplexity": float(metrics["perplexity"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_x, test_x = mnist_patches("train"), mnist_patches("test")
    print(f"MNIST 4x4 patches with ink: {len(train_x)} train, {len(test_x)} test; "
          f"{args.steps} Adam steps of batch {args.batch_size} per quantizer")
    baseline = float(np.mean(np.square(test_x - train_x.mean(axis=0))))
    print(f"{'quantizer':<18} {'codes':>6} {'test MSE':>9} {'usage':>6} {'perplexity':>10} {'time':>6}")
    print(f"{'mean patch':<18} {1:>6} {baseline:>9.4f} {'':>6} {'':>10} {'':>6}")
    for name, (make, code_dim) in quantizers().items():
        start = time.time()
        res = fit(name, make, code_dim, train_x, test_x, args.steps, args.batch_size, args.seed)
        print(f"{name:<18} {make().codebook_size:>6} {res['mse']:>9.4f} {res['usage']:>6.3f} {res['perplexity']:>10.1f} "
              f"{time.time() - start:>5.1f}s")


if __name__ == "__main__":
    main()
