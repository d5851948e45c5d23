"""Quantizers: every one returns :class:`QuantizerOutput` and has ``decode_indices``.

=============================  ================================================================
``VectorQuantizer``            VQ-VAE/VQGAN lookup, straight-through; factorised and l2 (ViT-VQGAN),
                               EMA codebooks, dead-code restart, optional entropy loss
``LookupFreeQuantizer``        MAGVIT-v2 LFQ with its entropy loss (exact or channel-grouped)
``FiniteScalarQuantizer``      FSQ: bounded per-channel rounding to ``levels``
``IndexBackpropQuantizer``     IBQ: straight-through from the soft to the hard one-hot over codes
``ResidualQuantizer``          RQ-VAE: VQs on successive residuals
``MultiScaleResidualQuantizer`` VAR: residual VQ over a schedule of resolutions with Φ convs
=============================  ================================================================
"""
from vqgen.quantizers.base import QuantizerOutput, entropy, straight_through, usage_metrics
from vqgen.quantizers.fsq import FiniteScalarQuantizer
from vqgen.quantizers.ibq import IndexBackpropQuantizer
from vqgen.quantizers.lfq import LookupFreeQuantizer
from vqgen.quantizers.multiscale import MultiScaleResidualQuantizer
from vqgen.quantizers.residual import ResidualQuantizer
from vqgen.quantizers.vq import VectorQuantizer

__all__ = [
    "QuantizerOutput", "VectorQuantizer", "LookupFreeQuantizer", "FiniteScalarQuantizer",
    "IndexBackpropQuantizer", "ResidualQuantizer", "MultiScaleResidualQuantizer",
    "entropy", "straight_through", "usage_metrics",
]
