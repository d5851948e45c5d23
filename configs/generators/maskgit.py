"""ImageNet 256x256 MaskGIT (Chang et al. 2022): the MaskGIT VQGAN and its 24-layer transformer.

    python -m vqgen.main --config=configs/generators/maskgit.py --workdir=gs://.../maskgit \\
        --config.data.data_dir=/path/to/tensorflow_datasets

Variants (``:arg``):

- ``paper`` (default): the released model. Transformer 24 layers, width 768, 16 heads, MLP 3072,
  dropout 0.1, label smoothing 0.1, cosine mask schedule, vocabulary 1024 codes + 1000 classes +
  mask token (2025 rows), no class dropout and no guidance; 8 decoding steps with choice
  temperature 4.5. Structurally identical to google-research/maskgit, so its checkpoint maps
  onto it one to one.
- ``cfg``: the same with class dropout 0.1 (one extra null-class row, 2026) for classifier-free
  guidance at sampling (a vqgen extension; see ``vqgen/generators/maskgit.py``).

Parameter split (``jax.eval_shape``, checked in ``tests/test_maskgit.py``): transformer
172.46M, tokenizer 54.52M (encoder 23.78M, decoder 30.48M, 1024x256 codebook 0.26M), together
226.97M -- the paper's 227M counts both. The ``cfg`` variant adds 769 parameters.

Tokenizer (``VARIANTS['maskgit']`` of ``vqgen/tokenizers/vqgan.py``): filters 128, multipliers
(1, 1, 2, 2, 4), 2 res blocks, no attention, 256-dim codes, 1024 codes: 256 px -> 16x16 tokens.
Its training section follows MaskGIT's ``vqgan_config.py`` where that file states a value (Adam
b1 0 / b2 0.99, lr 1e-4, batch 256, 1M steps, perceptual weight 0.1, non-saturating GAN loss
with weight 0.1, R1 penalty 10, entropy loss 0.1, commitment 0.25); MaskGIT released no
tokenizer trainer, so the rest (L2 reconstruction, the StyleGAN discriminator's widths, no
adaptive weight) follows MAGVIT's trainer from the same group. The perceptual term needs
``--config.tokenizer_train.lpips_path`` (LPIPS weights from ``python -m vqgen.convert.lpips``;
without it the term is off, with a warning). The generator's optimiser is
``maskgit_class_cond_config.py``'s: lr 1e-4, b1 0.9, b2 0.96, weight decay 0.045, 5000 warmup
steps, batch 256, 2M steps.
"""
import ml_collections

from vqgen import config_lib

VARIANTS = ("paper", "cfg")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"unknown MaskGIT variant {variant!r}; use one of {VARIANTS}.")
    use_cfg = variant == "cfg"
    # seed, mesh, data, tokenizer and its training: one source of truth, so a tokenizer trained
    # by configs/tokenizers/maskgit_vqgan.py is accepted here.
    c = config_lib.load_config("tokenizers/maskgit_vqgan")
    c.unlock()
    c.mode = "all"
    c.generator = config_lib.generator_config(
        "maskgit", width=768, depth=24, num_heads=16, mlp_dim=3072, dropout=0.1,
        class_dropout_prob=0.1 if use_cfg else 0.0, label_smoothing=0.1, mask_schedule="cosine",
        dtype="bfloat16")
    c.generator_train = config_lib.generator_train_config(
        "maskgit", num_steps=2_000_000, batch_size=256, lr=1e-4, warmup_steps=5000, schedule="constant",
        weight_decay=0.045, b1=0.9, b2=0.96, grad_clip=0.0, ema_decay=0.999, flip_augment=False,
        log_every=100, save_every=10_000, keep=3, image_every=10_000)
    c.sample = config_lib.sample_config(
        "maskgit", per_class=50, batch_size=250, temperature=1.0, top_k=0, top_p=1.0,
        cfg_scale=2.0 if use_cfg else 1.0, cfg_schedule="linear" if use_cfg else "constant",
        num_steps=8, choice_temperature=4.5, use_ema=True)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=250)
    c.lock()
    return c
