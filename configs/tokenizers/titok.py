"""TiTok on ImageNet 256x256: an image as a 1D sequence of 32, 64 or 128 tokens.

Mirrors bytedance/1d-tokenizer (``modeling/titok.py``, ``modeling/modules/blocks.py``) as its
configs build it; the model is ``TiTok`` of ``vqgen/tokenizers/vit.py`` (see its docstring for
the structure). Variants:

``L-32`` (the default), ``B-64``, ``S-128``
  The released two-stage models (``configs/training/TiTok/stage2/titok_{l32,b64,s128}.yaml``):
  large / base / small ViT encoder and decoder (widths 1024 / 768 / 512, depths 24 / 12 / 8),
  16x16 patches, 32 / 64 / 128 latent tokens of a 4096 x 12 l2-normalised codebook, the
  proxy-code decoder head through MaskGIT's VQGAN decoder, and the released encoder-output
  layout (``legacy_token_layout``). 641,054,735 / 204,814,095 / 83,674,639 parameters, equal
  to the official modules. The training section is the official stage 2: L2 1.0, perceptual
  0.1, GAN weight 0.01 from step 20,000 (fixed, not adaptive), LeCam 0.001; AdamW (0.9, 0.999),
  weight decay 1e-4, learning rate 1e-4 after 5,000 warm-up steps with cosine decay to 1e-5,
  gradient clipping 1.0, 500,000 steps, EMA weights; 32 images per GPU in the official config
  (global batch 256 on 8 GPUs). Stage 2 fine-tunes the decoder of a stage-1 model: set
  ``--config.tokenizer.freeze_encoder=True`` on a workdir holding converted stage-1 (or
  released) weights. Without it, this section trains everything end to end through the
  proxy-code head; stage 1 itself (cross-entropy against MaskGIT VQGAN codes) is not a loss of
  vqgen's tokenizer trainer.
``BL-64-VQ``
  The single-stage recipe (``configs/infer/TiTok/titok_bl64_vq8k.yaml``, ``is_legacy: False``):
  base encoder, large decoder, 64 tokens of an 8192 x 64 codebook without l2 normalisation,
  the decoder predicting pixels. 390,016,148 parameters. Training follows the official
  single-stage loss as ``configs/training/TA-TiTok/tatitok_bl64_vq.yaml`` configures it (L2 1.0,
  perceptual 1.1, GAN 0.1 from step 200,000, LeCam 0.001, 10,000 warm-up steps, 650,000 steps),
  on ImageNet instead of DataComp.
``quickstart``
  A CPU-sized single-stage TiTok for the embedded 32x32 MNIST digits: 8x8 patches (a 4x4
  grid), 32 latent tokens of a 256 x 8 l2-normalised codebook with dead-code restarts, width
  128, 4 blocks in each of encoder and decoder (1,625,042 parameters), L2 loss at learning rate
  2e-3. Measured on this project's 2-core CPU: 600 steps (12 minutes) reach a held-out PSNR of
  only 13.0 dB with 79% of the codes in use. That is the PSNR of the training set's mean image
  on the held-out digits (13.05 dB, L2 0.204): the decoder has learnt the mean digit and the
  tokens carry almost nothing of the image. At initialisation the encoder's latents vary across
  images by 0.3% of their size (the learned latent tokens and their positions dominate; the
  image reaches them only through near-uniform attention of 0.02-initialised projections), so
  256 held-out digits use 31 distinct codes in all over the 32 positions. Measured after 200
  steps (held-out PSNR of the raw weights; the mean image is 13.05): as configured 12.7; without
  the quantizer 12.8;
  commitment weight 0 12.9; learning rate 5e-4 12.9; 4x4 patches 13.1; the decoder's 3x3
  ``conv_out`` 10x larger 13.0; query/key kernels 5x larger 13.0; every kernel 4x larger 13.3;
  every kernel at 1/sqrt(fan-in) 13.2 (after 600 steps 14.1 dB with 98% of the codes in use,
  against 13.0). None of these single changes escapes the mean image within a CPU budget, so
  this variant is a smoke run, not yet a quickstart of digit quality.

Deviations: the official perceptual loss adds a ConvNeXt-S term to LPIPS (stage 2 uses
ConvNeXt-S alone); vqgen's perceptual loss is LPIPS, so its weight stands for both. The official
discriminator is MaskBit's blurred N-layer one; here the GroupNorm PatchGAN. The official
single-stage quantizer re-seeds unused codes ("clustering VQ"); here
``quantizer.dead_code_threshold`` can do that job, off by default.
"""
import ml_collections

from vqgen import config_lib
from vqgen.tokenizers.vit import TITOK_SIZES

VARIANTS = ("L-32", "B-64", "S-128", "BL-64-VQ", "quickstart")

# variant -> (encoder size, decoder size, latent tokens, token_size, codebook size, l2, two-stage)
_PAPER = {
    "L-32": ("large", "large", 32, 12, 4096, True, True),
    "B-64": ("base", "base", 64, 12, 4096, True, True),
    "S-128": ("small", "small", 128, 12, 4096, True, True),
    "BL-64-VQ": ("base", "large", 64, 64, 8192, False, False),
}


def _stack(prefix: str, size: dict) -> dict:
    return {f"{prefix}_width": size["width"], f"{prefix}_depth": size["depth"], f"{prefix}_heads": size["heads"],
            f"{prefix}_mlp_dim": size["mlp_dim"]}


def tokenizer_section(variant: str = "L-32") -> ml_collections.ConfigDict:
    """The ``config.tokenizer`` of TiTok-``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown TiTok variant {variant!r}; use one of {VARIANTS}, e.g. titok.py:L-32.")
    if variant == "quickstart":
        small = dict(width=128, depth=4, heads=4, mlp_dim=512)
        return ml_collections.ConfigDict(dict(
            arch="titok", image_size=32, patch_size=8, num_latent_tokens=32, token_size=8,
            **_stack("enc", small), **_stack("dec", small), decoder_head="pixels", legacy_token_layout=False,
            freeze_encoder=False, dtype="float32",
            quantizer=ml_collections.ConfigDict(dict(
                type="vq", codebook_size=256, l2_normalize=True, beta=0.25, entropy_loss_weight=0.0,
                dead_code_threshold=0.5)),
        ))
    enc, dec, tokens, token_size, codes, l2, two_stage = _PAPER[variant]
    return ml_collections.ConfigDict(dict(
        arch="titok", image_size=256, patch_size=16, num_latent_tokens=tokens, token_size=token_size,
        **_stack("enc", TITOK_SIZES[enc]), **_stack("dec", TITOK_SIZES[dec]),
        decoder_head="proxy_codes" if two_stage else "pixels", legacy_token_layout=two_stage, freeze_encoder=False,
        dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=codes, l2_normalize=l2, beta=0.25, entropy_loss_weight=0.0)),
    ))


def tokenizer_train_section(variant: str = "L-32") -> ml_collections.ConfigDict:
    """The ``config.tokenizer_train`` of the official recipe of ``variant`` (see the module docstring)."""
    if variant == "quickstart":
        return config_lib.tokenizer_train_config(
            num_steps=600, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=1e-4, b1=0.9, b2=0.99,
            ema_decay=0.99, l1_weight=0.0, l2_weight=1.0, log_every=50, save_every=200, image_every=300,
            disc=config_lib.disc_config(type="none"))
    common = dict(batch_size=256, lr=1e-4, schedule="cosine", weight_decay=1e-4, b1=0.9, b2=0.999, grad_clip=1.0,
                  ema_decay=0.9999, l1_weight=0.0, l2_weight=1.0, log_every=100, save_every=5000, keep=3,
                  image_every=5000)
    if _PAPER[variant][-1]:  # two-stage models: the official stage 2
        return config_lib.tokenizer_train_config(
            num_steps=500_000, warmup_steps=5_000, perceptual_weight=0.1, **common,
            disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, weight=0.01, start_step=20_000,
                                        loss="hinge", adaptive_weight=False, lecam_weight=0.001, lr=1e-4))
    return config_lib.tokenizer_train_config(
        num_steps=650_000, warmup_steps=10_000, perceptual_weight=1.1, **common,
        disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, weight=0.1, start_step=200_000,
                                    loss="hinge", adaptive_weight=False, lecam_weight=0.001, lr=1e-4))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "L-32"
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.tokenizer = tokenizer_section(variant)
    c.tokenizer_train = tokenizer_train_section(variant)
    if variant != "quickstart":
        c.data = config_lib.load_config_module("tokenizers/llamagen_vq16").imagenet_data(256)
    c.lock()
    return c
