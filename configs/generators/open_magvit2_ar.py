"""Open-MAGVIT2's class-conditional AR generators (B/L/XL) on ImageNet 256x256 over its 2^18-code LFQ
tokenizer, with the factorised two-head output (``vqgen/generators/gpt_factorized.py``).

    python -m vqgen.main --config=configs/generators/open_magvit2_ar.py:B --workdir=gs://.../om2_ar_B \\
        --config.data.data_dir=gs://.../tensorflow_datasets --mode=train_generator

Mirrors TencentARC/SEED-Voken ``configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_{B,L,XL}.yaml``:
the tokenizer section is ``configs/tokenizers/open_magvit2.py`` (18-bit LFQ, 16x16 tokens at
256 px) with its ids in Open-MAGVIT2's own bit order (``bit_order='lsb'``: channel ``i`` is bit
``i``), and the generator is the official ``GPT`` with ``token_factorization=True`` and
``factorized_bits=[6, 12]`` (a 64-way head, then a 4096-way head conditioned on the first sub-id;
``--config.generator.factorized_bits=(9,9)`` gives the symmetric cut). Token dropout 0.1, residual
and FFN dropout 0.1, class dropout 0.1 (the CFG null class), no attention dropout.

Variants (``:arg``; spatial depth x width, heads, factorised blocks; the official parameter
counts, which ``--mode=summary`` reproduces exactly):

- ``B``  24 x 1024, 16 heads, 2 factorised blocks:   343,570,432 (README: 343M)
- ``L``  36 x 1280, 20 heads, 3 factorised blocks:   804,362,240 (804M)
- ``XL`` 48 x 1536, 24 heads, 4 factorised blocks: 1,486,679,040 (1.5B; sharded with FSDP)

Training recipe (``Net2NetTransformer``): AdamW betas (0.9, 0.95), weight decay 0.05, gradient
clipping 1.0, 16-bit mixed precision; B: lr 3e-4, global batch 768 (24 x 32 GPUs), 300 epochs, 6
warm-up epochs; L: lr 3e-4, batch 1536, 300 epochs, 6 warm-up epochs; XL: lr 2.4e-4, batch 768,
350 epochs, 7 warm-up epochs. Sampling: the official evaluation commands
(``scripts/evaluation/sample_gpu.sh``): top-k and top-p off, temperatures B (1.0, 1.0), L and XL
(1.1, 1.0), CFG scales B (1.9, 2.0), L (1.9, 1.9), XL (1.75, 1.85) for the two sub-ids, 50 images
per class.

Deviations from the official recipe:
- Learning rate: the official warm-up starts at 0.005 x lr and, after 5% of the remaining steps
  at the peak, decays linearly to 0.1 x lr; vqgen warms up from 0 and decays with a cosine to
  ``min_lr_ratio=0.1``.
- The official AR model keeps no EMA of its weights and samples with the raw ones; vqgen's trainer
  keeps an EMA (decay 0.9999) and ``sample.use_ema=False`` samples the raw weights, as the
  official code does.
"""
import ml_collections

from vqgen import config_lib
from vqgen.generators import gpt_factorized

VARIANTS = ("B", "L", "XL")
_IMAGENET = 1_281_167
# (global batch, peak lr, epochs, warm-up epochs) of the official configs.
_RECIPE = {"B": (768, 3e-4, 300, 6), "L": (1536, 3e-4, 300, 6), "XL": (768, 2.4e-4, 350, 7)}
# (temperature, post_temperature, cfg_scale, post_cfg_scale) of scripts/evaluation/sample_gpu.sh.
_SAMPLE = {"B": (1.0, 1.0, 1.9, 2.0), "L": (1.1, 1.0, 1.9, 1.9), "XL": (1.1, 1.0, 1.75, 1.85)}
_MESH = {"B": (-1, 1, 1), "L": (-1, 1, 1), "XL": (1, -1, 1)}


def generator_section(variant: str, *, dtype: str = "bfloat16", **kw) -> ml_collections.ConfigDict:
    """The ``config.generator`` of Open-MAGVIT2 AR-``variant``."""
    arch = gpt_factorized.VARIANTS[variant]
    d = dict(arch="gpt_factorized", width=arch["width"], depth=arch["depth"], num_heads=arch["num_heads"],
             num_kv_heads=arch["num_heads"], factorized_depth=arch["factorized_depth"], factorized_bits=(6, 12),
             bit_order="lsb", class_dropout_prob=0.1, token_dropout_prob=0.1, resid_dropout_prob=0.1,
             ffn_dropout_prob=0.1, attn_dropout_prob=0.0, dtype=dtype)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "B"
    if variant not in VARIANTS:
        raise ValueError(f"unknown Open-MAGVIT2 AR variant {variant!r}; use one of {VARIANTS}, e.g. "
                         "open_magvit2_ar.py:B.")
    tok = config_lib.load_config("tokenizers/open_magvit2")
    with tok.tokenizer.quantizer.unlocked():
        tok.tokenizer.quantizer.bit_order = "lsb"  # Open-MAGVIT2's own ids, which the released AR models read
    batch, lr, epochs, warmup = _RECIPE[variant]
    steps_per_epoch = _IMAGENET // batch
    temperature, post_temperature, cfg, post_cfg = _SAMPLE[variant]
    c = config_lib.base_config()
    c.mode = "all"
    c.mesh_shape = _MESH[variant]
    c.data = tok.data
    c.tokenizer = tok.tokenizer
    c.tokenizer_train = tok.tokenizer_train
    c.generator = generator_section(variant)
    c.generator_train = config_lib.generator_train_config(
        num_steps=epochs * steps_per_epoch, batch_size=batch, lr=lr, warmup_steps=warmup * steps_per_epoch,
        schedule="cosine", min_lr_ratio=0.1, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0, ema_decay=0.9999,
        flip_augment=False, log_every=100, save_every=5000, keep=3, image_every=5000)
    c.sample = config_lib.sample_config(
        "gpt_factorized", per_class=50, batch_size=250, temperature=temperature, top_k=0, top_p=1.0, cfg_scale=cfg,
        cfg_schedule="constant", cfg_interval=(0.0, 1.0), post_temperature=post_temperature, post_top_k=0,
        post_top_p=1.0, post_cfg_scale=post_cfg, use_ema=False)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=256)
    c.lock()
    return c
