"""MAR's KL-16 VAE on ImageNet 256x256: continuous 16x16x16 latents, scale factor 0.2325.

Mirrors LTH14/mar ``models/vae.py`` as ``main_mar.py`` builds it (``AutoencoderKL(embed_dim=16,
ch_mult=(1, 1, 2, 2, 4))``, LDM's KL autoencoder): the taming encoder/decoder with filters 128,
two res blocks per level, attention in the mid stage of both halves and at the 16x16 level of the
encoder only, a diagonal Gaussian posterior of 16 channels, and MAR's latent scale 0.2325
(``vqgen/tokenizers/kl.py``: 66,456,019 parameters, exactly the official module's count on torch's
meta device). ``python -m vqgen.convert.mar --vae kl16.ckpt`` converts
MAR's released ``kl16.ckpt`` into a workdir of this config.

MAR releases no VAE trainer; its KL-16 comes from LDM's recipe (``autoencoder_kl_16x16x16.yaml``):
Adam with base lr 4.5e-6 scaled by the batch, betas (0.5, 0.9), L1 + LPIPS (weight 1), KL weight
1e-6, a PatchGAN (hinge, adaptive weight, factor 0.5) switched on at step 50,001. That is the
training section here (``kl_weight`` is normalised as in ``vqgen/tokenizers/kl.py`` so the ratio
of KL to reconstruction equals LDM's). Deviations: GroupNorm in the PatchGAN (no batch
statistics), EMA weights tracked, LDM's learned output log-variance not modelled.

``configs/generators/mar.py`` trains MAR-B/L/H over this tokenizer; ``tokenizer_section('quickstart')``
is the small VAE of ``configs/quickstart.py:mar``.
"""
import ml_collections

from vqgen import config_lib

_BATCH = 128


def tokenizer_section(variant: str = "kl16") -> ml_collections.ConfigDict:
    """The ``config.tokenizer`` of MAR's KL-16 (``'kl16'``) or of the quickstart's digit VAE
    (``'quickstart'``: 32x32x1 -> 8x8x4 latents)."""
    if variant == "kl16":
        return ml_collections.ConfigDict(dict(
            arch="kl", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, encoder_attn_resolutions=(16,),
            decoder_attn_resolutions=(), resolution=256, embed_dim=16, dropout=0.0, kl_weight=1e-6,
            scale_factor=0.2325, norm_groups=32, dtype="bfloat16"))
    if variant == "quickstart":
        return ml_collections.ConfigDict(dict(
            arch="kl", ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, encoder_attn_resolutions=(),
            decoder_attn_resolutions=(), resolution=32, embed_dim=4, dropout=0.0, kl_weight=1e-3,
            scale_factor=1.0, norm_groups=8, dtype="float32"))
    raise ValueError(f"unknown KL tokenizer variant {variant!r}; use 'kl16' or 'quickstart'.")


def tokenizer_train_section() -> ml_collections.ConfigDict:
    """LDM's KL autoencoder recipe (``autoencoder_kl_16x16x16.yaml``) at a global batch of 128."""
    return config_lib.tokenizer_train_config(
        num_steps=400_000, batch_size=_BATCH, lr=4.5e-6 * _BATCH, warmup_steps=0, schedule="constant",
        weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=0.0, ema_decay=0.9999, l1_weight=1.0, l2_weight=0.0,
        perceptual_weight=1.0, log_every=100, save_every=5000, keep=3, image_every=5000,
        disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, norm="group", weight=0.5,
                                    start_step=50_001, loss="hinge", adaptive_weight=True, lr=4.5e-6 * _BATCH))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/tokenizers/kl16.py has no variants, got {arg!r}; drop the ':{arg}'.")
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = vq16.imagenet_data(256)
    c.tokenizer = tokenizer_section()
    c.tokenizer_train = tokenizer_train_section()
    c.lock()
    return c
