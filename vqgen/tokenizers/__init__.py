"""Tokenizers: images (or video) <-> discrete token maps, with the contract of DESIGN.md §3."""
from vqgen.tokenizers.vqgan import (
    LAST_LAYER,
    QUANTIZERS,
    VARIANTS,
    VQGAN,
    Decoder,
    Encoder,
    build,
    count_params,
    last_layer_kernel,
)
