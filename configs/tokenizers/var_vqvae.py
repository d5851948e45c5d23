"""VAR's multi-scale VQ-VAE on ImageNet 256x256: 4096 codes of dim 32 over ten scales, 1 to 16.

Mirrors FoundationVision/VAR ``models/vqvae.py`` and ``models/basic_vae.py`` as ``build_vae_var``
builds it (``vae_ch160v4096z32.pth``): the taming encoder/decoder with filters 160,
multipliers (1, 1, 2, 2, 4), 2 res blocks, attention in the mid stage and at the lowest level
(16x16 for 256 px), ``z_channels`` 32, 3x3 ``quant_conv``/``post_quant_conv``, and the
multi-scale residual quantizer (``vqgen/quantizers/multiscale.py``) with scales
1,2,3,4,5,6,8,10,13,16, the unnormalised lookup, ``beta`` 0.25 and four partially shared Φ
convolutions with ``quant_resi`` 0.5. The model is ``VQGAN(style='taming', quant_conv_kernel=3)``
of ``vqgen/tokenizers/vqgan.py``: 108,948,355 parameters with the quantizer (VAR's model zoo:
108.9M), structurally identical so that ``vae_ch160v4096z32.pth`` converts one to one
(``python -m vqgen.convert.var``).

VAR releases no tokenizer trainer. The training section is the VQGAN recipe the VAR paper
names (reconstruction, perceptual and GAN losses; the LlamaGen VQ-16 trainer's settings,
``configs/tokenizers/llamagen_vq16.py``). The token map of an image is the pyramid of the ten
scales, 680 tokens, flattened scale by scale (``vqgen.generators.var.join_scales``); the VAR
generator (``configs/generators/var.py``) is trained on it.
"""
import ml_collections

from vqgen import config_lib

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def tokenizer_section(scales=VAR_SCALES) -> ml_collections.ConfigDict:
    """The ``config.tokenizer`` of VAR's VQ-VAE (shared with ``configs/generators/var.py``)."""
    return ml_collections.ConfigDict(dict(
        arch="vqgan", ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        resolution=256, z_channels=32, embed_dim=32, dropout=0.0, style="taming", use_quant_conv=True,
        quant_conv_kernel=3, norm_groups=32, dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="msrq", codebook_size=4096, scales=tuple(scales), beta=0.25, phi_share=4, phi_ratio=0.5,
            l2_normalize=False)),
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/tokenizers/var_vqvae.py has no variants, got {arg!r}; drop the ':{arg}'.")
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = vq16.imagenet_data(256)
    c.tokenizer = tokenizer_section()
    c.tokenizer_train = vq16.tokenizer_train_section()
    c.lock()
    return c
