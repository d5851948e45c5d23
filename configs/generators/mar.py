"""MAR class-conditional masked autoregressive generator with a diffusion loss, on ImageNet 256x256
over MAR's KL-16 VAE.

    python -m vqgen.main --config=configs/generators/mar.py:B --workdir=gs://.../mar_b \\
        --config.data.data_dir=gs://.../tensorflow_datasets --mode=train_generator

Mirrors LTH14/mar: the tokenizer section is ``configs/tokenizers/kl16.py`` (16x16 latents of 16
channels, scale 0.2325, patch size 1: 256 continuous tokens) and the generator is
``models/mar.py`` (``vqgen/generators/mar.py``) with the README's heads (MAR-B: 6 blocks of width
1024; MAR-L: 8 of 1280; MAR-H: 12 of 1536; 208M / 479M / 943M parameters) and the recipe of
``main_mar.py``: AdamW betas (0.9, 0.95), weight decay 0.02, lr ``1e-4 * batch / 256`` at a
global batch of 2048, 100 warmup epochs then constant, 400 epochs, gradient clipping 3.0, EMA
0.9999, label dropout 0.1, mask ratio min 0.7, 64 buffer tokens, attention/projection dropout
0.1, ``diffusion_batch_mul`` 4, horizontally flipped latents cached beside the originals.
Sampling uses the README's FID settings: 256 iterations, 100 diffusion steps, temperature 1.0,
linear CFG 2.9 / 3.0 / 3.2.

Variants (``:arg``): ``B``, ``L``, ``H``.

Deviations: MAR's warmup is per epoch (here per step, the same length); MAR's cache holds the
posterior moments of each image and its flip and samples them per step, as the latent cache does
here.
"""
import ml_collections

from vqgen import config_lib

VARIANTS = ("B", "L", "H")
_CFG = {"B": 2.9, "L": 3.0, "H": 3.2}
# FSDP for every size: at MAR's batch of 2048 on a v5p-64 (64 images a chip) the data-parallel mesh
# needs 192 GiB (MAR-B) and 321 GiB (MAR-L) a chip; the FSDP mesh fits (launch/README.md).
_MESH = {"B": (1, -1, 1), "L": (1, -1, 1), "H": (1, -1, 1)}
_BATCH, _EPOCHS, _WARMUP_EPOCHS = 2048, 400, 100
_IMAGENET = 1_281_167


def generator_section(variant: str, *, dtype: str = "bfloat16", **kw) -> ml_collections.ConfigDict:
    """The ``config.generator`` of MAR-``variant`` (sizes from ``vqgen.generators.mar.VARIANTS``)."""
    d = dict(arch="mar", variant=variant, patch_size=1, buffer_size=64, mask_ratio_min=0.7, label_drop_prob=0.1,
             attn_dropout=0.1, proj_dropout=0.1, diffusion_batch_mul=4, dtype=dtype)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "B"
    if variant not in VARIANTS:
        raise ValueError(f"unknown MAR variant {variant!r}; use one of {VARIANTS}, e.g. mar.py:B.")
    kl16 = config_lib.load_config_module("tokenizers/kl16")
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    steps_per_epoch = _IMAGENET // _BATCH
    c = config_lib.base_config()
    c.mode = "all"
    c.mesh_shape = _MESH[variant]
    c.data = vq16.imagenet_data(256)
    c.tokenizer = kl16.tokenizer_section()
    c.tokenizer_train = kl16.tokenizer_train_section()
    c.generator = generator_section(variant)
    c.generator_train = config_lib.generator_train_config(
        num_steps=_EPOCHS * steps_per_epoch, batch_size=_BATCH, lr=1e-4 * _BATCH / 256,
        warmup_steps=_WARMUP_EPOCHS * steps_per_epoch, schedule="constant", min_lr_ratio=0.0, weight_decay=0.02,
        b1=0.9, b2=0.95, grad_clip=3.0, ema_decay=0.9999, flip_augment=True, log_every=100, save_every=5000, keep=3,
        image_every=5000)
    c.sample = config_lib.sample_config(
        "mar", per_class=50, batch_size=256, num_iter=256, diffusion_steps=100, temperature=1.0,
        cfg_scale=_CFG[variant], cfg_schedule="linear", use_ema=True)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=256)
    c.lock()
    return c
