"""MAGVIT (Yu et al. 2023): a 3D-VQ video tokenizer and a multi-task masked video transformer.

    python -m vqgen.main --config=configs/generators/magvit.py --workdir=runs/magvit_mnist
    python -m vqgen.main --config=configs/generators/magvit.py:B --workdir=gs://.../magvit_b \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Variants (``:arg``):

- ``moving_mnist`` (default): trains on a 2-core CPU in about 12 minutes. 16 frames of 32x32
  moving digits -> the tokenizer ``VARIANTS['moving_mnist']`` of ``vqgen/tokenizers/magvit.py``,
  causal in time (so the tokens of the first 4 frames depend on those frames only) -> 4x8x8
  tokens of an FSQ (8, 5, 5, 5) quantizer (1000 codes), trained with an L2 loss; a 3-layer,
  128-wide MAGVIT transformer trained on frame prediction from the first 4 frames (add
  ``"class"`` to ``generator.tasks`` for class-conditional generation). No GAN loss (discriminator weight 0: the tokenizer trainer's
  discriminators are 2D).
- ``B`` / ``L``: the paper's sizes on UCF-101 at 128x128, 16 frames (``tfds:ucf101``; prepare
  it with ``tfds build ucf101 --file_format=array_record``). Tokenizer
  ``VARIANTS['B'|'L']`` (64 / 128 filters, 1024 codes, 16x128x128 -> 4x16x16 tokens; GAN
  training of the official 3D-VQ is not reproduced: no 3D discriminator here). Transformer as
  google-research/magvit ``configs/maskgvt_ucf101_config.py``: B = 12 layers, width 768, 12
  heads, MLP 3072; L = 24 layers, 1024, 16 heads, MLP 4096; dropout 0.1, label smoothing 1e-4,
  cosine schedule; Adam lr 1e-4, b1 0.9, b2 0.96, weight decay 0.045, 5000 warmup steps, grad
  clip 1, batch 256; 12 decoding steps with choice temperature 4.5. The official UCF-101 model
  is class-conditional only; ``tasks`` here also lists the multi-task set of its BAIR config.

Keys of the ``generator`` section read by ``vqgen.generators.magvit.build``: the MaskGIT
transformer's (``width, depth, num_heads, mlp_dim, dropout, class_dropout_prob,
label_smoothing, mask_schedule, dtype``) plus ``tasks`` (training task mix, names of
``vqgen.generators.magvit_tasks.TASKS``), ``num_frames`` (clip length, to place the condition on
the token grid) and ``cond_frames`` (given frames of the frame prediction/interpolation tasks
during training). ``sample.task`` / ``sample.cond_frames`` pick the task at sampling time
(``--config.sample.task=frame_prediction``).
"""
import ml_collections

from vqgen import config_lib

VARIANTS = ("moving_mnist", "B", "L")

# MAGVIT transformer sizes (maskgvt_ucf101_config.py): (depth, width, mlp_dim, heads).
TRANSFORMER = {"B": (12, 768, 3072, 12), "L": (24, 1024, 4096, 16)}
# The 3D-VQ sizes of vqgen/tokenizers/magvit.py VARIANTS.
TOKENIZER_FILTERS = {"B": 64, "L": 128}


def _tokenizer(variant: str) -> ml_collections.ConfigDict:
    if variant == "moving_mnist":
        # FSQ rather than a learned codebook: on mostly-black moving digits a 256 x 8 l2-normalised
        # VQ collapsed to ~4% of its codes (perplexity ~3) in a few hundred CPU steps, FSQ (8,5,5,5)
        # used ~10% of 1000 codes (perplexity ~14) at the same or better PSNR.
        return ml_collections.ConfigDict(dict(
            arch="magvit", ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, True),
            causal=True, z_channels=32, embed_dim=4, use_quant_conv=True, num_frames=16, resolution=32,
            norm_groups=8, dtype="float32",
            quantizer=ml_collections.ConfigDict(dict(type="fsq", levels=(8, 5, 5, 5))),
        ))
    return ml_collections.ConfigDict(dict(
        arch="magvit", ch=TOKENIZER_FILTERS[variant], ch_mult=(1, 2, 2, 4), num_res_blocks=2,
        temporal_downsample=(True, True, False), causal=False, z_channels=256, embed_dim=256, use_quant_conv=False,
        num_frames=16, resolution=128, norm_groups=32, dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=1024, beta=0.25, entropy_loss_weight=0.1, entropy_temperature=0.01)),
    ))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "moving_mnist"
    if variant not in VARIANTS:
        raise ValueError(f"unknown MAGVIT variant {variant!r}; use one of {VARIANTS}.")
    c = config_lib.base_config()
    c.mode = "all"
    c.tokenizer = _tokenizer(variant)
    if variant == "moving_mnist":
        c.data = ml_collections.ConfigDict(dict(
            source="moving_mnist", image_size=32, channels=1, data_dir="", random_crop=False,
            random_flip=False, eval_examples=32, num_classes=10))
        # L2 rather than L1 reconstruction: L1's optimum on frames that are ~80% black is a black
        # frame, where the L1 run stalled (PSNR ~15 dB, the all-black score).
        c.tokenizer_train = config_lib.tokenizer_train_config(
            num_steps=260, batch_size=8, lr=2e-3, warmup_steps=30, b1=0.9, b2=0.99, ema_decay=0.99,
            grad_clip=1.0, l1_weight=0.0, l2_weight=1.0, log_every=50, save_every=130, image_every=0,
            disc=config_lib.disc_config(type="none", weight=0.0))
        c.generator = ml_collections.ConfigDict(dict(
            arch="magvit", width=128, depth=3, num_heads=4, mlp_dim=512, dropout=0.0, class_dropout_prob=0.1,
            label_smoothing=0.1, mask_schedule="cosine", dtype="float32",
            # Frame prediction only: the CPU budget (~700 steps) is too small to learn motion when
            # half of the batches train class-conditional generation instead (300 mixed steps
            # decoded black frames after the first predicted one).
            tasks=("frame_prediction",), num_frames=16, cond_frames=4))
        c.generator_train = config_lib.generator_train_config(
            num_steps=700, batch_size=16, lr=2e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01,
            b1=0.9, b2=0.99, grad_clip=1.0, ema_decay=0.99, flip_augment=False, log_every=100,
            save_every=350, keep=2, image_every=0)
        c.sample = config_lib.sample_config(
            "magvit", per_class=2, batch_size=20, temperature=1.0, cfg_scale=1.0, num_steps=8,
            choice_temperature=4.5, task="frame_prediction", cond_frames=4)
        c.video = ml_collections.ConfigDict(dict(eval_clips=32, eval_batch_size=16, cache_clips=1500))
    else:
        depth, width, mlp, heads = TRANSFORMER[variant]
        c.seed = 42
        c.data = ml_collections.ConfigDict(dict(
            source="tfds:ucf101", image_size=128, channels=3, data_dir="", random_crop=False,
            random_flip=True, eval_examples=3783, num_classes=101))
        c.tokenizer_train = config_lib.tokenizer_train_config(
            num_steps=500_000, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant", b1=0.0, b2=0.99,
            grad_clip=0.0, ema_decay=0.999, l1_weight=0.0, l2_weight=5.0, log_every=100, save_every=10_000,
            keep=3, image_every=10_000, disc=config_lib.disc_config(type="none", weight=0.0))
        c.generator = ml_collections.ConfigDict(dict(
            arch="magvit", width=width, depth=depth, num_heads=heads, mlp_dim=mlp, dropout=0.1,
            class_dropout_prob=0.0, label_smoothing=1e-4, mask_schedule="cosine", dtype="bfloat16",
            tasks=("class", "frame_prediction", "frame_interpolation", "central_inpainting",
                   "central_outpainting", "horizontal_outpainting", "vertical_outpainting"),
            num_frames=16, cond_frames=1))
        c.generator_train = config_lib.generator_train_config(
            num_steps=74_000, batch_size=256, lr=1e-4, warmup_steps=5000, schedule="cosine",
            weight_decay=0.045, b1=0.9, b2=0.96, grad_clip=1.0, ema_decay=0.999, flip_augment=False,
            log_every=500, save_every=1000, keep=5, image_every=0)
        c.sample = config_lib.sample_config(
            "magvit", per_class=10, batch_size=64, temperature=1.0, cfg_scale=1.0, num_steps=12,
            choice_temperature=4.5, task="class", cond_frames=1)
        c.video = ml_collections.ConfigDict(dict(eval_clips=256, eval_batch_size=16, cache_clips=0))
    c.evaluate = config_lib.evaluate_config(judge=False)
    c.lock()
    return c
