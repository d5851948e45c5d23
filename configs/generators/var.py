"""VAR class-conditional next-scale generator on ImageNet 256x256 over VAR's multi-scale VQ-VAE.

    python -m vqgen.main --config=configs/generators/var.py:d16 --workdir=gs://.../var_d16 \\
        --config.data.data_dir=gs://.../tensorflow_datasets --mode=train_generator

Mirrors FoundationVision/VAR: the tokenizer section is ``configs/tokenizers/var_vqvae.py``
(4096 codes of dim 32 over the scales 1,2,3,4,5,6,8,10,13,16: 680 tokens per image) and the
generator is ``models/var.py`` (``vqgen/generators/var.py``: width 64·depth, depth heads, drop
path 0.1·depth/24, AdaLN per block, l2-normalised attention) with the recipe of VAR's training
commands (README, ``utils/arg_util.py``): AdamW, betas (0.9, 0.95), weight decay 0.05, gradient
clipping 2.0, learning rate ``tblr * batch / 256``, linear warmup over ``epochs / 50`` epochs,
then VAR's ``lin0`` decay to ``wpe`` of the peak; class dropout 0.1, no label smoothing.

Variants (``:arg``; VAR's model zoo sizes and training commands):

- ``d16``: 310M, batch 768, 200 epochs, tblr 1e-4, ``alng`` 1e-3
- ``d20``: 600M, batch 768, 250 epochs, tblr 1e-4, ``alng`` 1e-3
- ``d24``: 1.0B, batch 768, 350 epochs, tblr 8e-5, ``alng`` 1e-4 (FSDP)
- ``d30``: 2.0B, batch 1024, 350 epochs, tblr 8e-5, ``alng`` 1e-5 (FSDP)

Deviations: the schedule is a warmup then cosine decay to ``wpe`` of the peak (vqgen's
schedules) instead of VAR's linear ``lin0``; VAR's final weight decay ramp (``twde``, d30) is
not applied. Sampling uses VAR's FID settings (its ``cfg=1.5`` is ``cfg_scale=2.5`` here: see
``vqgen/generators/var.py``), top-k 900, top-p 0.96.
"""
import ml_collections

from vqgen import config_lib

VARIANTS = ("d16", "d20", "d24", "d30")
# VAR's README training commands: (global batch, epochs, base lr, alng, wpe).
_RECIPE = {
    "d16": (768, 200, 1e-4, 1e-3, 0.1),
    "d20": (768, 250, 1e-4, 1e-3, 0.1),
    "d24": (768, 350, 8e-5, 1e-4, 0.01),
    "d30": (1024, 350, 8e-5, 1e-5, 0.01),
}
_MESH = {"d16": (-1, 1, 1), "d20": (-1, 1, 1), "d24": (1, -1, 1), "d30": (1, -1, 1)}
_IMAGENET = 1_281_167


def generator_section(depth: int, *, alng: float = 1e-3, dtype: str = "bfloat16", **kw) -> ml_collections.ConfigDict:
    """The ``config.generator`` of VAR-d``depth`` (sizes follow ``depth``; the scales follow the tokenizer)."""
    d = dict(arch="var", depth=depth, cond_drop_rate=0.1, shared_aln=False, attn_l2_norm=True,
             init_adaln_gamma=alng, dtype=dtype)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "d16"
    if variant not in VARIANTS:
        raise ValueError(f"unknown VAR variant {variant!r}; use one of {VARIANTS}, e.g. var.py:d16.")
    vae = config_lib.load_config_module("tokenizers/var_vqvae")
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    batch, epochs, tblr, alng, wpe = _RECIPE[variant]
    steps = epochs * (_IMAGENET // batch)
    c = config_lib.base_config()
    c.mode = "all"
    c.mesh_shape = _MESH[variant]
    c.data = vq16.imagenet_data(256)
    c.tokenizer = vae.tokenizer_section()
    c.tokenizer_train = vq16.tokenizer_train_section()
    c.generator = generator_section(int(variant[1:]), alng=alng)
    c.generator_train = config_lib.generator_train_config(
        num_steps=steps, batch_size=batch, lr=tblr * batch / 256, warmup_steps=steps // 50, schedule="cosine",
        min_lr_ratio=wpe, weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=2.0, ema_decay=0.9999, flip_augment=False,
        log_every=100, save_every=5000, keep=3, image_every=5000)
    c.sample = config_lib.sample_config(
        "var", per_class=50, batch_size=256, temperature=1.0, top_k=900, top_p=0.96, cfg_scale=2.5, use_ema=True)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=256)
    c.lock()
    return c
