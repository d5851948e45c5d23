"""FractalMAR / FractalAR class-conditional pixel-by-pixel generators on ImageNet 64x64 and 256x256.

    python -m vqgen.main --config=configs/generators/fractal.py:MAR-64 --workdir=gs://.../fractalmar_64 \\
        --config.data.data_dir=gs://.../tensorflow_datasets --mode=train_generator

Mirrors LTH14/fractalgen: the model functions of ``models/fractalgen.py`` (``vqgen/generators/
fractal.py``; no tokenizer, the generator models the pixels) and the recipe of the README's
training commands and ``main_fractalgen.py``: AdamW betas (0.9, 0.95), weight decay 0.05, lr
``5e-5 * batch / 256`` (global batch 2048 at 64px, 1024 at 256px), 40 warmup epochs then cosine
decay over 800 epochs, gradient clipping 3.0, label dropout 0.1, attention and projection dropout
0.1, R-channel loss weight 5, ImageNet's mean and std as the pixel normalisation, center crops
with random horizontal flips. No EMA (the official trains none): ``ema_decay=0`` keeps the EMA
equal to the weights. Sampling uses the README's FID settings.

Variants (``:arg``; sizes and parameter counts as the official modules):

- ``MAR-64``: FractalMAR, levels (64, 4, 1), 432.0M, 5 conditions; iterations (64, 16), linear
  CFG 6.5, temperature 1.02.
- ``AR-64``: FractalAR, the same sizes with AR levels, 442.1M, 1 condition; CFG 11.0,
  temperature 1.03.
- ``MAR-B-256`` / ``MAR-L-256`` / ``MAR-H-256``: levels (256, 16, 4, 1) with the guiding pixel and 5
  conditions, 186.3M / 437.0M / 849.6M; iterations (64, 16, 16), temperature 1.1, linear CFG
  29.0 / 21.0 / 19.0 (the README's best-FID values).

Deviations: the official learning-rate warmup and decay are per epoch fraction; here per step
(the same lengths). Filtering low-probability pixel values under guidance uses the official
threshold 1e-4.
"""
import ml_collections

from vqgen import config_lib
from vqgen.generators import fractal

VARIANTS = tuple(fractal.VARIANTS)
# (global batch, cfg scale, temperature, iterations per level, mesh)
_RECIPE = {
    "MAR-64": (2048, 6.5, 1.02, (64, 16), (-1, 1, 1)),
    "AR-64": (2048, 11.0, 1.03, (64, 16), (-1, 1, 1)),
    "MAR-B-256": (1024, 29.0, 1.1, (64, 16, 16), (-1, 1, 1)),
    "MAR-L-256": (1024, 21.0, 1.1, (64, 16, 16), (-1, 1, 1)),
    "MAR-H-256": (1024, 19.0, 1.1, (64, 16, 16), (1, -1, 1)),
}
_EPOCHS, _WARMUP_EPOCHS, _BLR = 800, 40, 5e-5
_IMAGENET = 1_281_167


def imagenet_data(image_size: int) -> ml_collections.ConfigDict:
    """``config.data``: ImageNet-1k from TFDS, center crops with random flips (the official loader)."""
    return ml_collections.ConfigDict(dict(
        source="tfds:imagenet2012", image_size=image_size, channels=3, data_dir="", random_crop=False,
        random_flip=True, eval_examples=50_000, num_classes=1000, resize="center_crop"))


def generator_section(variant: str, *, dtype: str = "bfloat16", **kw) -> ml_collections.ConfigDict:
    """The ``config.generator`` of ``variant`` (sizes from ``vqgen.generators.fractal.VARIANTS``)."""
    d = dict(arch="fractal", variant=variant, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1, r_weight=5.0,
             pixel_mean=fractal.IMAGENET_MEAN, pixel_std=fractal.IMAGENET_STD, dtype=dtype)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "MAR-64"
    if variant not in VARIANTS:
        raise ValueError(f"unknown FractalMAR variant {variant!r}; use one of {VARIANTS}, e.g. fractal.py:MAR-64.")
    batch, cfg, temperature, iters, mesh = _RECIPE[variant]
    size = int(fractal.VARIANTS[variant]["img_size_list"][0])
    steps_per_epoch = _IMAGENET // batch
    c = config_lib.base_config()
    c.mode = "all"
    c.mesh_shape = mesh
    c.data = imagenet_data(size)
    c.generator = generator_section(variant)
    c.generator_train = config_lib.generator_train_config(
        num_steps=_EPOCHS * steps_per_epoch, batch_size=batch, lr=_BLR * batch / 256,
        warmup_steps=_WARMUP_EPOCHS * steps_per_epoch, schedule="cosine", min_lr_ratio=0.0, weight_decay=0.05,
        b1=0.9, b2=0.95, grad_clip=3.0, ema_decay=0.0, flip_augment=False, log_every=100, save_every=5000, keep=3,
        image_every=0)
    c.sample = config_lib.sample_config("fractal", per_class=50, batch_size=256, use_ema=False, cfg_scale=cfg,
                                        cfg_schedule="linear", temperature=temperature, num_iter_list=iters,
                                        filter_threshold=1e-4)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=256)
    c.lock()
    return c
