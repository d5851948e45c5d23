"""Config sections that every run config in configs/ shares (mesh, data, training loops)."""
from __future__ import annotations

import ml_collections

from vqgen import parallel


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh_shape = (-1, 1, 1)                      # ('data', 'fsdp', 'tensor'); -1 auto-fills
    c.logical_rules = tuple(parallel.DEFAULT_RULES)
    c.distributed = False                          # call jax.distributed.initialize() (pods)
    c.data = ml_collections.ConfigDict(dict(
        source="mnist", image_size=32, channels=1, data_dir="", random_crop=False,
        random_flip=False, eval_examples=500, num_classes=10))
    return c


def disc_config(**kw) -> ml_collections.ConfigDict:
    d = dict(type="patchgan", ch=64, n_layers=3, norm="group", ch_mult=(1, 2, 4, 4), weight=0.0,
             start_step=0, loss="hinge", adaptive_weight=True, lecam_weight=0.0, lecam_decay=0.999,
             r1_weight=0.0, lr=1e-4, dtype="float32")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def tokenizer_train_config(**kw) -> ml_collections.ConfigDict:
    d = dict(num_steps=1000, batch_size=64, lr=1e-4, warmup_steps=0, schedule="cosine",
             weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=1.0, ema_decay=0.999,
             l1_weight=1.0, l2_weight=0.0, perceptual_weight=0.0, lpips_path="",
             log_every=50, save_every=500, keep=2, image_every=0, disc=disc_config())
    disc = kw.pop("disc", None)
    d.update(kw)
    c = ml_collections.ConfigDict(d)
    if disc is not None:
        c.disc = disc
    return c


def generator_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    """Generator architecture fields for the quickstart-sized models (override per config)."""
    if arch == "gpt":
        d = dict(arch="gpt", width=192, depth=4, num_heads=4, num_kv_heads=4,
                 class_dropout_prob=0.1, token_dropout_prob=0.0, resid_dropout_prob=0.0,
                 ffn_dropout_prob=0.0, attn_dropout_prob=0.0, qk_norm=False, dtype="float32")
    elif arch == "maskgit":
        d = dict(arch="maskgit", width=192, depth=4, num_heads=4, mlp_dim=768, dropout=0.0,
                 class_dropout_prob=0.1, label_smoothing=0.1, mask_schedule="cosine", dtype="float32")
    else:
        raise ValueError(f"unknown generator arch {arch!r}; use 'gpt' or 'maskgit'.")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def generator_train_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    d = dict(num_steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, schedule="cosine",
             weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0, ema_decay=0.999, flip_augment=False,
             log_every=50, save_every=500, keep=2, image_every=0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def sample_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    d = dict(per_class=100, batch_size=100, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=2.0,
             cfg_schedule="constant", cfg_interval=(0.0, 1.0), num_steps=8, choice_temperature=4.5,
             use_ema=True, task="class", cond_frames=4)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def evaluate_config(**kw) -> ml_collections.ConfigDict:
    d = dict(judge=True, inception_path="", reference_stats="", batch_size=100)
    d.update(kw)
    return ml_collections.ConfigDict(d)
