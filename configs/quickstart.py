"""The quickstart: a VQGAN and a class-conditional generator on the embedded MNIST digits.

    python -m vqgen.main --config=configs/quickstart.py --workdir=runs/quickstart

``configs/quickstart.py:gpt`` (the default) uses the LlamaGen-style GPT as the generator,
``configs/quickstart.py:maskgit`` uses MaskGIT, sampled in 16 steps with choice temperature 16 and
CFG 1.5 (a measured sweep: as varied as the GPT's samples at 97% judge accuracy). 32x32 digits
become 8x8 tokens of a 256-code, 8-dimensional, l2-normalised codebook.

``configs/quickstart.py:var`` is VAR: the same VQGAN with VAR's multi-scale residual quantizer
(scales 1, 2, 3, 4, 6, 8: a pyramid of 130 tokens per digit, Φ convolutions shared four ways)
and the next-scale transformer over it, sampled in six steps.

The tokenizer zoo on the same digits: ``configs/quickstart.py:lfq`` swaps the VQ for MAGVIT-v2's
lookup-free quantizer (10 bits: 1,024 implicit codes, Open-MAGVIT2's bit order and entropy
smoothing) under the GPT; ``:ibq`` for IBQ (256 codes of IBQ's width 256, every code trained through the softmax)
under the GPT; ``:titok`` is TiTok's 1D tokenizer (``configs/tokenizers/titok.py:quickstart``,
32 latent tokens) under MaskGIT.

``configs/quickstart.py:mar`` is MAR over continuous latents: a KL-VAE (the quickstart shape of
``configs/tokenizers/kl16.py``: 32x32 digits -> 8x8 latents of 4 channels, L1 + PatchGAN) and a
small MAR (encoder and decoder of 2 blocks of width 128, 8 buffer tokens, a diffusion head of 2
blocks of width 128) over 2x2 patches of its latents (16 tokens of 16 channels: MAR's
``patch_size=2``, which keeps a CPU step cheap), 3,000 steps of batch 64 with each token's
diffusion loss drawn at 2 timesteps (MAR: 4) under DDPM's linear noise schedule (MAR: cosine,
whose first sampling step needs a head trained far longer; see ``vqgen/generators/mar.py``),
sampled in 8 iterations of 50 diffusion steps (MAR: 100) with MAR's linear CFG ramp to 3.

``configs/quickstart.py:fractal`` is FractalMAR straight on the pixels (no tokenizer): levels 32 ->
4 -> 1 (a MAR level of 3 blocks of width 128 over the 8x8 patches of 4x4 pixels, a MAR level of 2
blocks of width 64 over each patch's 16 pixels, a pixel head of width 32 over the 256 intensities),
sampled in 16 iterations at level 0 and 4 at level 1 with the linear CFG ramp to 4 and the pixel
logits multiplied by 1.25 (FractalMAR's temperature; the official 1.02 and 1.1 sharpen too). The
temperature is from a sweep of the trained quickstart (``--mode=sweep_sampling``, 1,000 samples
each, judge accuracy): 1.0 84.8%, 1.25 90.3%, 1.5 88.0% (speckled strokes at 1.0, broken ones at 1.5).
"""
import ml_collections

from vqgen import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "gpt"
    if variant == "mar":
        return _mar_config()
    if variant == "fractal":
        return _fractal_config()
    if variant not in ("gpt", "maskgit", "var", "lfq", "ibq", "titok", "mar"):
        raise ValueError(f"unknown quickstart variant {variant!r}; use 'gpt', 'maskgit', 'var', 'lfq', 'ibq' or 'titok'.")
    generator = {"lfq": "gpt", "ibq": "gpt", "titok": "maskgit"}.get(variant, variant)
    c = config_lib.base_config()
    c.mode = "all"
    c.tokenizer = ml_collections.ConfigDict(dict(
        arch="vqgan", ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        resolution=32, z_channels=32, embed_dim=8, dropout=0.0, norm_groups=8, dtype="float32",
        quantizer=ml_collections.ConfigDict(dict(
            type="vq", codebook_size=256, l2_normalize=True, beta=0.25)),
    ))
    c.tokenizer_train = config_lib.tokenizer_train_config(
        num_steps=800, batch_size=32, lr=1e-3, warmup_steps=50, b1=0.9, b2=0.99, ema_decay=0.99,
        log_every=50, save_every=200, image_every=400,
        disc=config_lib.disc_config(type="patchgan", ch=16, n_layers=2, weight=0.1, start_step=500,
                                    lr=2e-4))
    if generator == "var":
        c.tokenizer.quantizer = ml_collections.ConfigDict(dict(
            type="msrq", codebook_size=256, scales=(1, 2, 3, 4, 6, 8), beta=0.25, phi_share=4, phi_ratio=0.5,
            l2_normalize=False))
    if variant == "lfq":
        c.tokenizer.embed_dim = 10
        c.tokenizer.quantizer = ml_collections.ConfigDict(dict(
            type="lfq", dim=10, entropy_loss_weight=0.1, commitment_weight=0.25, codebook_entropy_weight=1.0,
            entropy_temperature=0.01, num_groups=1, bit_order="lsb", entropy_eps=1e-5))
    elif variant == "ibq":
        # IBQ's own code width (256, as every official IBQ config): at the VQ quickstart's 8
        # dimensions the inner-product lookup collapses within 50 steps (17 of 256 codes, 11.8 dB
        # held-out PSNR); at 256 every code stays in use (18.1 dB after the same 800 steps).
        c.tokenizer.embed_dim = 256
        c.tokenizer.quantizer = ml_collections.ConfigDict(dict(
            type="ibq", codebook_size=256, beta=0.25, entropy_loss_weight=0.05, entropy_temperature=0.01,
            codebook_entropy_weight=1.0, entropy_eps=1e-5))
    elif variant == "titok":
        titok = config_lib.load_config_module("tokenizers/titok")
        c.tokenizer = titok.tokenizer_section("quickstart")
        c.tokenizer_train = titok.tokenizer_train_section("quickstart")
    c.generator = config_lib.generator_config(generator)
    c.generator_train = config_lib.generator_train_config(generator)
    c.sample = config_lib.sample_config(generator)
    if variant == "maskgit":
        # Chosen from a measured sweep of the trained quickstart (1,000 samples each): MaskGIT's
        # ImageNet setting (8 steps, choice temperature 4.5, CFG 2) draws 99.7% recognisable digits
        # with a recall of only 0.31, nearly one style per class; more Gumbel noise on the
        # confidences (a more random order of revealing tokens), 16 steps and CFG 1.5 keep 97% and
        # reach a recall of 0.63 (real digits: 0.91).
        c.sample.update(dict(num_steps=16, choice_temperature=16.0, cfg_scale=1.5))
    c.evaluate = config_lib.evaluate_config()
    c.lock()
    return c


def _mar_config() -> ml_collections.ConfigDict:
    """``quickstart:mar``: the digit KL-VAE and a small MAR over its latents."""
    kl16 = config_lib.load_config_module("tokenizers/kl16")
    c = config_lib.base_config()
    c.mode = "all"
    c.tokenizer = kl16.tokenizer_section("quickstart")
    c.tokenizer.scale_factor = 0.683  # 1 / the std (1.464) of the trained VAE's held-out latent means
    c.tokenizer_train = config_lib.tokenizer_train_config(
        num_steps=800, batch_size=32, lr=1e-3, warmup_steps=50, b1=0.9, b2=0.99, ema_decay=0.99,
        log_every=50, save_every=200, image_every=400,
        disc=config_lib.disc_config(type="patchgan", ch=16, n_layers=2, weight=0.1, start_step=500, lr=2e-4))
    c.generator = ml_collections.ConfigDict(dict(
        arch="mar", encoder_width=128, encoder_depth=2, encoder_heads=4, decoder_width=128, decoder_depth=2,
        decoder_heads=4, buffer_size=8, patch_size=2, mask_ratio_min=0.7, label_drop_prob=0.1, attn_dropout=0.0,
        proj_dropout=0.0, diffloss_depth=2, diffloss_width=128, diffusion_batch_mul=2, dtype="float32",
        # DDPM's linear noise schedule, not MAR's cosine one: a head trained for minutes cannot
        # predict the noise at the cosine schedule's last step as exactly as its sampler needs
        # (see vqgen/generators/mar.py); measured: cosine 34% judge accuracy after 3,000 steps.
        noise_schedule="linear"))
    c.generator_train = config_lib.generator_train_config(
        "mar", num_steps=3000, batch_size=64, lr=1e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.02, b1=0.9, b2=0.95, grad_clip=3.0, ema_decay=0.999, log_every=100, save_every=500)
    c.sample = config_lib.sample_config("mar", num_iter=8, diffusion_steps=50, temperature=1.0, cfg_scale=3.0,
                                        cfg_schedule="linear")
    c.evaluate = config_lib.evaluate_config()
    c.lock()
    return c


def _fractal_config() -> ml_collections.ConfigDict:
    """``quickstart:fractal``: a small FractalMAR on the digits' pixels (no tokenizer phase)."""
    c = config_lib.base_config()
    c.mode = "all"
    c.generator = ml_collections.ConfigDict(dict(
        arch="fractal", img_size_list=(32, 4, 1), embed_dim_list=(128, 64, 32), num_blocks_list=(3, 2, 1),
        num_heads_list=(4, 4, 2), generator_type_list=("mar", "mar", "ar"), num_conds=5, guiding_pixel=False,
        label_drop_prob=0.1, attn_dropout=0.0, proj_dropout=0.0, r_weight=5.0, dtype="float32"))
    c.generator_train = config_lib.generator_train_config(
        "fractal", num_steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1,
        weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=3.0, ema_decay=0.995, log_every=50, save_every=250)
    c.sample = config_lib.sample_config("fractal", num_iter_list=(16, 4), temperature=1.25, cfg_scale=4.0,
                                        cfg_schedule="linear")
    c.evaluate = config_lib.evaluate_config()
    c.lock()
    return c
