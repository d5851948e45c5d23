"""LlamaGen VQ-16 on ImageNet 256x256: 16384 codes of dim 8, l2-normalised, 16x16 tokens.

Mirrors FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` (``VQ_16``: taming
encoder/decoder with filters 128, multipliers (1, 1, 2, 2, 4), 2 res blocks, attention in the
mid stage and at the 16x16 level, z_channels 256, 1x1 quant convs to the 8-dim codebook) and
its trainer ``vq_train.py`` / ``vq_loss.py`` defaults: Adam (no weight decay) lr 1e-4 constant,
betas (0.9, 0.95), gradient clipping 1.0, global batch 128, 40 epochs (~400k steps), bf16
mixed precision; L2 reconstruction weight 1, LPIPS weight 1, codebook loss 1 + commitment 0.25,
no entropy loss; PatchGAN discriminator (64 filters, 3 layers) with hinge losses, weight 0.5,
no adaptive weight, switched on at step 20000; random-crop + flip augmentation. The model is
``VARIANTS['llamagen_vq16']`` of ``vqgen/tokenizers/vqgan.py`` (71.88M parameters; LlamaGen
reports 72M), structurally identical so that ``vq_ds16_c2i.pt`` converts one to one.

Deviations: the PatchGAN uses GroupNorm instead of BatchNorm (no batch statistics in a pure
jitted step); EMA weights are always tracked (LlamaGen's ``--ema`` flag, decay 0.9999).

On a Cloud TPU pod (ImageNet as ArrayRecord in a GCS TFDS data dir; see launch/README.md)::

    bash launch/tpu_vm.sh --tpu=my-v5e-32 --zone=us-west4-a -- \\
        --config=configs/tokenizers/llamagen_vq16.py --workdir=gs://my-bucket/runs/vq16 \\
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets \\
        --config.tokenizer_train.lpips_path=gs://my-bucket/lpips_vgg.npz --mode=train_tokenizer

``--mode=summary`` prints the parameter counts without allocating anything.
"""
import ml_collections

from vqgen import config_lib

# ImageNet-1k train images / LlamaGen's global batch of 128, times its 40 epochs.
_STEPS_PER_EPOCH = 1_281_167 // 128


def tokenizer_section() -> ml_collections.ConfigDict:
    """The ``config.tokenizer`` of LlamaGen VQ-16 (shared with ``configs/generators/llamagen.py``)."""
    return ml_collections.ConfigDict(dict(
        arch="vqgan", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
        resolution=256, z_channels=256, embed_dim=8, dropout=0.0, style="taming", use_quant_conv=True,
        norm_groups=32, dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=16384, l2_normalize=True, beta=0.25, entropy_loss_weight=0.0)),
    ))


def tokenizer_train_section() -> ml_collections.ConfigDict:
    """The ``config.tokenizer_train`` of LlamaGen's ``vq_train.py`` defaults."""
    return config_lib.tokenizer_train_config(
        num_steps=40 * _STEPS_PER_EPOCH, batch_size=128, lr=1e-4, warmup_steps=0, schedule="constant",
        weight_decay=0.0, b1=0.9, b2=0.95, grad_clip=1.0, ema_decay=0.9999, l1_weight=0.0, l2_weight=1.0,
        perceptual_weight=1.0, log_every=100, save_every=5000, keep=3, image_every=5000,
        disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, norm="group", weight=0.5,
                                    start_step=20_000, loss="hinge", adaptive_weight=False, lr=1e-4))


def imagenet_data(image_size: int = 256) -> ml_collections.ConfigDict:
    """``config.data`` for ImageNet-1k from TFDS with LlamaGen's random crop and flip."""
    return ml_collections.ConfigDict(dict(
        source="tfds:imagenet2012", image_size=image_size, channels=3, data_dir="", random_crop=True,
        random_flip=True, eval_examples=50_000, num_classes=1000))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/tokenizers/llamagen_vq16.py has no variants, got {arg!r}; drop the ':{arg}'.")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = imagenet_data(256)
    c.tokenizer = tokenizer_section()
    c.tokenizer_train = tokenizer_train_section()
    c.lock()
    return c
