"""ViT-VQGAN on ImageNet 256x256: 8x8 patches -> 32x32 = 1024 tokens of an 8192-entry,
32-dim, l2-normalised factorised codebook.

``configs/tokenizers/vit_vqgan.py:SS`` (the default), ``:BB`` and ``:SL`` name the encoder and
decoder sizes as the paper (Yu et al. 2022, "Vector-quantized Image Modeling with Improved
VQGAN") does: Small is 8 blocks, 8 heads, width 512, MLP 2048; Base 12, 12, 768, 3072; Large 32,
16, 1280, 5120 (its Table 1). The model is ``ViTVQGAN`` of ``vqgen/tokenizers/vit.py``, whose
docstring lists what comes from the paper and what is our choice (no code was released); its
quantizer is ``VectorQuantizer(codebook_size=8192, code_dim=32, l2_normalize=True)``, the
factorised low-dimensional l2 lookup. Parameter counts with the quantizer: SS 55.69M, BB 180.41M,
SL 667.43M.

Training section, from the paper's description: L2 reconstruction weight 1.0 (its
logit-Laplace weight is 0), perceptual weight 0.1, adversarial weight 0.1 with a StyleGAN
discriminator, commitment 0.25; Adam with betas (0.9, 0.99), peak learning rate 1e-4 after 5,000
linear warm-up steps, cosine decay, global batch 256, 500,000 steps. Our choices: the
discriminator is the StyleGAN one vqgen builds for MaskGIT's VQGAN (128 filters, multipliers
(2, 4, 4, 4, 4)) and starts at step 0 with a fixed (not adaptive) weight; LPIPS as the perceptual
network (point ``tokenizer_train.lpips_path`` at the VGG weights); EMA weights (decay 0.9999) are
tracked as for every vqgen tokenizer; bfloat16 compute.

On a Cloud TPU pod, as for LlamaGen's VQ-16 (``configs/tokenizers/llamagen_vq16.py``)::

    bash launch/tpu_vm.sh --tpu=my-v5e-32 --zone=us-west4-a -- \\
        --config=configs/tokenizers/vit_vqgan.py:SL --workdir=gs://my-bucket/runs/vit_vqgan_sl \\
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets \\
        --config.tokenizer_train.lpips_path=gs://my-bucket/lpips_vgg.npz --mode=train_tokenizer
"""
import ml_collections

from vqgen import config_lib
from vqgen.tokenizers.vit import VITVQGAN_SIZES

VARIANTS = ("SS", "BB", "SL")


def tokenizer_section(variant: str = "SS") -> ml_collections.ConfigDict:
    """The ``config.tokenizer`` of ViT-VQGAN-``variant`` (encoder size, decoder size)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT-VQGAN variant {variant!r}; use one of {VARIANTS}, e.g. vit_vqgan.py:SL.")
    enc, dec = VITVQGAN_SIZES[variant[0]], VITVQGAN_SIZES[variant[1]]
    return ml_collections.ConfigDict(dict(
        arch="vit_vqgan", image_size=256, patch_size=8,
        enc_width=enc["width"], enc_depth=enc["depth"], enc_heads=enc["heads"], enc_mlp_dim=enc["mlp_dim"],
        dec_width=dec["width"], dec_depth=dec["depth"], dec_heads=dec["heads"], dec_mlp_dim=dec["mlp_dim"],
        dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=8192, code_dim=32, l2_normalize=True, beta=0.25, entropy_loss_weight=0.0)),
    ))


def tokenizer_train_section() -> ml_collections.ConfigDict:
    """The ``config.tokenizer_train`` of the paper's ViT-VQGAN training."""
    return config_lib.tokenizer_train_config(
        num_steps=500_000, batch_size=256, lr=1e-4, warmup_steps=5_000, schedule="cosine", weight_decay=0.0,
        b1=0.9, b2=0.99, grad_clip=1.0, ema_decay=0.9999, l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.1,
        log_every=100, save_every=5000, keep=3, image_every=5000,
        disc=config_lib.disc_config(type="stylegan", ch=128, ch_mult=(2, 4, 4, 4, 4), weight=0.1, start_step=0,
                                    loss="hinge", adaptive_weight=False, lr=1e-4))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "SS"
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = vq16.imagenet_data(256)
    c.tokenizer = tokenizer_section(variant)
    c.tokenizer_train = tokenizer_train_section()
    c.lock()
    return c
