"""Open-MAGVIT2 LFQ tokenizer on ImageNet 256x256: an implicit 2^18 codebook, 16x16 tokens.

Mirrors TencentARC/Open-MAGVIT2 ``configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml`` with
``src/Open_MAGVIT2/models/lfqgan.py`` and ``modules/losses/vqperceptual.py``: the
``improved_model`` encoder/decoder (filters 128, multipliers (1, 1, 2, 2, 4), 4 res blocks, no
attention, adaptive GroupNorm in the decoder, z_channels = embed_dim = 18) and lookup-free
quantisation of 18 bits (entropy loss 0.1 = ``codebook_weight`` with sample/batch weights 1.0,
commitment 0.25, temperature 0.01). Training: Adam betas (0.5, 0.9), lr 1e-4, global batch
256 (8 x 32 GPUs), 270 epochs, 16-bit mixed precision, EMA of the weights; L1 reconstruction
1.0, LPIPS 1.0; PatchGAN (64 filters, 3 layers) from step 0 with a fixed generator weight 0.1
(``gen_loss_weight``, so no adaptive weight) and LeCam regularisation 0.05 (decay 0.999). The
model is ``VARIANTS['open_magvit2']`` of ``vqgen/tokenizers/vqgan.py`` (115.13M parameters).

Deviations from the official recipe (each a config override away where the code allows it):
- Codebook entropy: ``num_groups=2`` (the entropy of two 9-bit halves, DESIGN.md §3) keeps the
  term cheap; the official code computes the exact 2^18-way entropy, which
  ``--config.tokenizer.quantizer.num_groups=1`` reproduces (chunked, exact, slower).
- The official generator GAN loss is non-saturating and the discriminator loss hinge; vqgen
  has one ``disc.loss`` for both, set to ``hinge``.
- The official lr drops x0.1 at epochs 200 and 250; vqgen's schedules are constant or cosine,
  so this config keeps the lr constant.
- PatchGAN with GroupNorm instead of BatchNorm; no gradient clipping (Lightning's default).

On a Cloud TPU pod (ImageNet as ArrayRecord in a GCS TFDS data dir; see launch/README.md)::

    bash launch/tpu_vm.sh --tpu=my-v5p-64 --zone=us-east5-a -- \\
        --config=configs/tokenizers/open_magvit2.py --workdir=gs://my-bucket/runs/open_magvit2 \\
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets \\
        --config.tokenizer_train.lpips_path=gs://my-bucket/lpips_vgg.npz --mode=train_tokenizer
"""
import ml_collections

from vqgen import config_lib

_STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/tokenizers/open_magvit2.py has no variants, got {arg!r}; drop the ':{arg}'.")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = ml_collections.ConfigDict(dict(
        source="tfds:imagenet2012", image_size=256, channels=3, data_dir="", random_crop=True,
        random_flip=True, eval_examples=50_000, num_classes=1000))
    c.tokenizer = ml_collections.ConfigDict(dict(
        arch="vqgan", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, attn_resolutions=(),
        resolution=256, z_channels=18, embed_dim=18, dropout=0.0, style="magvit2", use_quant_conv=False,
        norm_groups=32, dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="lfq", dim=18, entropy_loss_weight=0.1, commitment_weight=0.25, codebook_entropy_weight=1.0,
            entropy_temperature=0.01, num_groups=2)),
    ))
    c.tokenizer_train = config_lib.tokenizer_train_config(
        num_steps=270 * _STEPS_PER_EPOCH, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant",
        weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=0.0, ema_decay=0.999, l1_weight=1.0, l2_weight=0.0,
        perceptual_weight=1.0, log_every=100, save_every=5000, keep=3, image_every=5000,
        disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, norm="group", weight=0.1, start_step=0,
                                    loss="hinge", adaptive_weight=False, lecam_weight=0.05, lecam_decay=0.999,
                                    lr=1e-4))
    c.lock()
    return c
