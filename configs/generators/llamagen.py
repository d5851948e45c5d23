"""LlamaGen class-conditional GPT (c2i) on ImageNet 256x256 over the LlamaGen VQ-16 tokenizer.

    python -m vqgen.main --config=configs/generators/llamagen.py:B --workdir=gs://.../llamagen_B \\
        --config.data.data_dir=gs://.../tensorflow_datasets --mode=train_generator

Mirrors FoundationVision/LlamaGen: the tokenizer section is ``configs/tokenizers/llamagen_vq16.py``
(16384 codes of dim 8, 16x16 tokens at 256 px) and the generator section is the GPT of
``autoregressive/models/gpt.py`` (``vqgen/generators/gpt.py``) with ``train_c2i.py``'s recipe:
AdamW lr 1e-4 constant, betas (0.9, 0.95), weight decay 0.05, gradient clipping 1.0, global batch
256, 300 epochs, bf16; class dropout 0.1 (the CFG null class), token dropout 0.1, residual and
FFN dropout 0.1, no attention dropout; tokens of the images and their mirrors (LlamaGen also
adds ten crops; vqgen caches the centre crop and its flip).

Variants (``:arg``; depth x width, heads; LlamaGen's parameter counts):

- ``B``   12 x  768, 12 heads: 111M
- ``L``   24 x 1024, 16 heads: 343M
- ``XL``  36 x 1280, 20 heads: 775M
- ``XXL`` 48 x 1536, 24 heads: 1.4B (sharded with FSDP, as LlamaGen trains it)
- ``3B``  24 x 3200, 32 heads: 3.1B (FSDP)

``--mode=summary`` prints both models' parameter counts (``jax.eval_shape``; nothing is
allocated). The SwiGLU width is LlamaGen's ``find_multiple(int(2 * 4 * width / 3), 256)``
(the GPT module's default). Sampling uses the guidance scales of LlamaGen's evaluation commands
(2.0 for B and L, 1.75 for XL and XXL, 1.65 for 3B), top-k off, temperature 1. LlamaGen
released B and L at 256 px and XL, XXL and 3B at 384 px (24x24 tokens); for the latter add
``--config.data.image_size=384`` (the tokenizer is convolutional; only the token grid grows).

On a Cloud TPU pod (see launch/README.md)::

    bash launch/tpu_vm.sh --tpu=my-v5p-128 --zone=us-east5-a -- \\
        --config=configs/generators/llamagen.py:XL --workdir=gs://my-bucket/runs/llamagen_XL \\
        --config.data.data_dir=gs://my-bucket/tensorflow_datasets --mode=all

``--mode=all`` trains the tokenizer, then the GPT, then samples and evaluates; with a
tokenizer checkpoint already in ``<workdir>/checkpoints/tokenizer`` it resumes from there.
"""
import ml_collections

from vqgen import config_lib
from vqgen.generators import gpt

VARIANTS = ("B", "L", "XL", "XXL", "3B")
# LlamaGen's sample_c2i commands (GETTING_STARTED.md).
_CFG_SCALE = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}
# LlamaGen trains XXL and 3B with FSDP (train_c2i_fsdp.py); the others data-parallel.
_MESH = {"B": (-1, 1, 1), "L": (-1, 1, 1), "XL": (-1, 1, 1), "XXL": (1, -1, 1), "3B": (1, -1, 1)}
# ImageNet-1k train images / the global batch of 256, times 300 epochs.
_STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "B"
    if variant not in VARIANTS:
        raise ValueError(f"unknown LlamaGen variant {variant!r}; use one of {VARIANTS}, e.g. llamagen.py:B.")
    vq16 = config_lib.load_config_module("tokenizers/llamagen_vq16")
    arch = gpt.VARIANTS[variant]
    c = config_lib.base_config()
    c.mode = "all"
    c.mesh_shape = _MESH[variant]
    c.data = vq16.imagenet_data(256)
    c.tokenizer = vq16.tokenizer_section()
    c.tokenizer_train = vq16.tokenizer_train_section()
    c.generator = config_lib.generator_config(
        "gpt", width=arch["width"], depth=arch["depth"], num_heads=arch["num_heads"], num_kv_heads=arch["num_heads"],
        class_dropout_prob=0.1, token_dropout_prob=0.1, resid_dropout_prob=0.1, ffn_dropout_prob=0.1,
        attn_dropout_prob=0.0, qk_norm=False, dtype="bfloat16")
    c.generator_train = config_lib.generator_train_config(
        "gpt", num_steps=300 * _STEPS_PER_EPOCH, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant",
        weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0, ema_decay=0.9999, flip_augment=True,
        log_every=100, save_every=5000, keep=3, image_every=5000)
    c.sample = config_lib.sample_config(
        "gpt", per_class=50, batch_size=256, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=_CFG_SCALE[variant],
        cfg_schedule="constant", cfg_interval=(0.0, 1.0), use_ema=True)
    c.evaluate = config_lib.evaluate_config(judge=False, batch_size=256)
    c.lock()
    return c
