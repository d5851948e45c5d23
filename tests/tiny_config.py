"""A tiny run config for tests: the quickstart structure with toy widths and few steps.

Usable as ``--config=tests/tiny_config.py[:gpt|:maskgit|:var|:lfq|:ibq|:titok|:mar]`` or ``tiny_config.get_config()``;
``:titok_proxy`` (TiTok's two-stage decoder head), ``:vit_vqgan`` and ``:fractal`` are tiny versions of
the paper configs' structure for the ahead-of-time compile tests.
"""
import ml_collections

from vqgen import config_lib


def get_config(arg=None):
    if arg == "fractal":
        return _tiny_fractal()
    if arg in ("vit_vqgan", "titok_proxy"):
        return _tiny_vit(arg)
    c = config_lib.load_config("quickstart", arg)
    c.unlock()
    if arg == "mar":
        return _tiny_mar(c)
    t = c.tokenizer
    if arg == "titok":  # 16 latent tokens, one transformer block of width 16 on each side
        t.enc_width, t.enc_depth, t.enc_heads, t.enc_mlp_dim = 16, 1, 2, 32
        t.dec_width, t.dec_depth, t.dec_heads, t.dec_mlp_dim = 16, 1, 2, 32
        t.num_latent_tokens, t.token_size = 16, 4
    else:
        t.ch, t.ch_mult, t.num_res_blocks, t.z_channels, t.embed_dim, t.norm_groups = 8, (1, 2), 1, 8, 4, 4
    if arg == "lfq":
        t.quantizer.dim = t.embed_dim
    else:
        t.quantizer.codebook_size = 32
    if arg == "var":  # an 8x8 grid under the scales 1, 2, 4, 8 (85 tokens)
        t.ch_mult, t.quantizer.scales = (1, 2, 2), (1, 2, 4, 8)
    tt = c.tokenizer_train
    tt.num_steps, tt.batch_size, tt.save_every, tt.log_every, tt.image_every = 4, 8, 2, 1, 0
    tt.warmup_steps = 1
    tt.eval_batch_size = 64  # encodes the 4,500 training digits in 71 calls, not 563
    tt.disc.ch, tt.disc.n_layers, tt.disc.start_step = 8, 1, 1
    c.data.eval_examples = 16
    g = c.generator
    g.width, g.depth, g.num_heads = 32, 1, 2
    if "num_kv_heads" in g:
        g.num_kv_heads = 2
    if "mlp_dim" in g:
        g.mlp_dim = 64
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 4, 8, 2, 1, 1
    c.sample.per_class, c.sample.batch_size = 2, 20
    c.lock()
    return c


def _tiny_mar(c):
    """quickstart:mar with a KL-VAE of width 8 (8x8 latents of 4 channels) and a one-block MAR."""
    t = c.tokenizer
    t.ch, t.ch_mult, t.num_res_blocks, t.embed_dim, t.norm_groups = 8, (1, 2, 2), 1, 4, 4
    tt = c.tokenizer_train
    tt.num_steps, tt.batch_size, tt.save_every, tt.log_every, tt.image_every = 4, 8, 2, 1, 0
    tt.warmup_steps = 1
    tt.eval_batch_size = 64  # encodes the 4,500 training digits in 71 calls, not 563
    tt.disc.ch, tt.disc.n_layers, tt.disc.start_step = 8, 1, 1
    c.data.eval_examples = 16
    g = c.generator
    g.encoder_width = g.decoder_width = g.diffloss_width = 32
    g.encoder_depth = g.decoder_depth = g.diffloss_depth = 1
    g.encoder_heads = g.decoder_heads = 2
    g.buffer_size = 2
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 4, 8, 2, 1, 1
    c.sample.per_class, c.sample.batch_size = 2, 20
    c.sample.num_iter, c.sample.diffusion_steps = 4, 5
    c.lock()
    return c


def _tiny_vit(arg):
    """A ViT-VQGAN (``configs/tokenizers/vit_vqgan.py``: an 8x8-patch grid, factorised l2 lookup)
    or a two-stage TiTok (``configs/tokenizers/titok.py:L-32``: proxy-code head through the MaskGIT
    pixel decoder, the released token layout) with transformers of width 16 on the digits, under the tiny GPT
    (``titok_proxy``: the tiny MaskGIT)."""
    c = get_config("titok" if arg == "titok_proxy" else None)
    c.unlock()
    q = dict(type="vq", codebook_size=32, l2_normalize=True, beta=0.25, entropy_loss_weight=0.0)
    if arg == "vit_vqgan":
        c.tokenizer = ml_collections.ConfigDict(dict(
            arch="vit_vqgan", image_size=32, patch_size=8, enc_width=16, enc_depth=1, enc_heads=2, enc_mlp_dim=32,
            dec_width=16, dec_depth=1, dec_heads=2, dec_mlp_dim=32, dtype="float32",
            quantizer=ml_collections.ConfigDict(dict(q, code_dim=4))))
    else:
        t = c.tokenizer
        t.decoder_head, t.legacy_token_layout = "proxy_codes", True
        t.quantizer = ml_collections.ConfigDict(q)
        t.proxy_codebook_size, t.proxy_code_dim = 16, 4
        # the pixel decoder's GroupNorm has 32 groups: width 32 is its smallest
        t.pixel_decoder_ch, t.pixel_decoder_ch_mult, t.pixel_decoder_num_res_blocks = 32, (1, 1, 1, 1), 1
    c.lock()
    return c


def _tiny_fractal():
    """quickstart:fractal with one block of width 16 per level (levels 32 -> 4 -> 1)."""
    c = config_lib.load_config("quickstart", "fractal")
    c.unlock()
    g = c.generator
    g.embed_dim_list, g.num_blocks_list, g.num_heads_list = (16, 16, 8), (1, 1, 1), (2, 2, 2)
    c.data.eval_examples = 16
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 4, 8, 2, 1, 1
    c.sample.per_class, c.sample.batch_size = 2, 20
    c.sample.num_iter_list = (2, 2)
    c.lock()
    return c
