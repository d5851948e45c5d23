"""The MaskGIT VQGAN on ImageNet 256x256: 1024 codes x 256 dims, 16x16 tokens (tokenizer only).

Mirrors google-research/maskgit: the model of ``nets/vqgan_tokenizer.py`` with
``configs/vqgan_config.py`` (filters 128, channel multipliers (1, 1, 2, 2, 4), 2 res blocks,
no attention, average-pool downsampling, GroupNorm + swish, 1024 x 256 codebook), so MaskGIT's
released tokenizer checkpoint maps onto it one to one (``VARIANTS['maskgit']`` of
``vqgen/tokenizers/vqgan.py``: 54.52M parameters). MaskGIT released no tokenizer trainer; the
training section takes every value ``vqgan_config.py`` states (Adam b1 0 / b2 0.99, lr 1e-4,
batch 256, 1M steps, perceptual weight 0.1, GAN weight 0.1 with the non-saturating loss,
R1 penalty 10, codebook entropy loss 0.1, commitment 0.25) and the rest from MAGVIT's trainer by
the same group (L2 reconstruction, StyleGAN discriminator with widths 128 x (2, 4, 4, 4, 4), no
adaptive GAN weight). It is the tokenizer section of ``configs/generators/maskgit.py``.

On a Cloud TPU pod (ImageNet prepared as ArrayRecord in a GCS TFDS data dir; see launch/README.md)::

    bash launch/tpu_vm.sh --tpu=my-v5p-64 --zone=us-east5-a -- \\
        --config=configs/tokenizers/maskgit_vqgan.py --workdir=gs://my-bucket/runs/maskgit_vqgan \\
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --mode=train_tokenizer

The perceptual term needs ``--config.tokenizer_train.lpips_path=...`` (a file made by
``python -m vqgen.convert.lpips``); without it the term is off and the log says so.
"""
import ml_collections

from vqgen import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/tokenizers/maskgit_vqgan.py has no variants, got {arg!r}; drop the ':{arg}'.")
    c = config_lib.base_config()
    c.seed = 42
    c.mode = "train_tokenizer"
    c.data = ml_collections.ConfigDict(dict(
        source="tfds:imagenet2012", image_size=256, channels=3, data_dir="", random_crop=True,
        random_flip=True, eval_examples=50_000, num_classes=1000))
    c.tokenizer = ml_collections.ConfigDict(dict(
        arch="vqgan", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
        resolution=256, z_channels=256, embed_dim=256, dropout=0.0, style="maskgit",
        use_quant_conv=False, pixel_range="unit", norm_groups=32, dtype="float32",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=1024, beta=0.25, entropy_loss_weight=0.1, entropy_temperature=0.01)),
    ))
    c.tokenizer_train = config_lib.tokenizer_train_config(
        num_steps=1_000_000, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant", b1=0.0, b2=0.99,
        weight_decay=0.0, grad_clip=0.0, ema_decay=0.999, l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.1,
        log_every=100, save_every=10_000, keep=3, image_every=10_000,
        disc=config_lib.disc_config(type="stylegan", ch=128, ch_mult=(2, 4, 4, 4, 4), weight=0.1, start_step=0,
                                    loss="non_saturating", adaptive_weight=False, r1_weight=10.0, lr=1e-4))
    c.lock()
    return c
