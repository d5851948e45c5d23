"""IBQ tokenizers on ImageNet 256x256: 16x16 tokens of 16,384 or 262,144 codes of dim 256.

Mirrors TencentARC/SEED-Voken ``configs/IBQ/gpu/imagenet_ibqgan_{16384,262144}.yaml`` with
``src/IBQ/models/ibqgan.py``, ``modules/diffusionmodules/model.py`` and
``modules/losses/vqperceptual.py``: the taming VQGAN encoder/decoder (filters 128, multipliers
(1, 1, 2, 2, 4), 4 res blocks, attention at 16x16 and in the mid stage, z_channels 256, 1x1
quant convs) and index backpropagation quantization (``IndexBackpropQuantizer``: embed_dim 256,
no l2 normalisation, beta 0.25 on the codebook term, entropy loss 0.05 at temperature 0.01 with
sample/batch weights 1.0 and the official ``log(p + 1e-5)`` smoothing). Training: Adam betas
(0.5, 0.9), lr 1e-4, global batch 256 (4 per GPU x 64 GPUs), 330 epochs, EMA of the weights
(0.999); L1 reconstruction 1.0, LPIPS 1.0; PatchGAN (64 filters, 3 layers) from step 0 with the
fixed generator weight 0.1 (``gen_loss_weight``, so no adaptive weight) and LeCam 0.05.
Variants: ``16384`` (the default) and ``262144``; they differ only in the codebook size.
Parameters (``--mode=summary``): 110,982,019 and 173,896,579, equal to the official modules'
counts (encoder 46,752,256, decoder 59,903,875, the two 1x1 quant convs and the K x 256
codebook, counted on torch's meta device).

Deviations (as for ``open_magvit2.py``): one ``disc.loss`` (hinge) where the official generator
loss is non-saturating; the official lr drops x0.1 at epochs 250 and 300, here it stays constant;
PatchGAN with GroupNorm instead of BatchNorm. The ``[tokens, K]`` logits of the quantizer are
materialised as in the official code (262,144 codes: 1 GiB of float32 per 1,024 tokens), so the
262144 variant wants a small per-chip batch or FSDP.
"""
import ml_collections

from vqgen import config_lib

VARIANTS = ("16384", "262144")
_STEPS_PER_EPOCH = 1_281_167 // 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "16384"
    if variant not in VARIANTS:
        raise ValueError(f"unknown IBQ variant {variant!r}; use one of {VARIANTS}, e.g. ibq.py:16384.")
    c = config_lib.base_config()
    c.mode = "train_tokenizer"
    c.data = config_lib.load_config_module("tokenizers/llamagen_vq16").imagenet_data(256)
    c.tokenizer = ml_collections.ConfigDict(dict(
        arch="vqgan", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, attn_resolutions=(16,),
        resolution=256, z_channels=256, embed_dim=256, dropout=0.0, style="taming", use_quant_conv=True,
        norm_groups=32, dtype="bfloat16",
        quantizer=ml_collections.ConfigDict(dict(
            type="ibq", codebook_size=int(variant), beta=0.25, entropy_loss_weight=0.05, entropy_temperature=0.01,
            codebook_entropy_weight=1.0, entropy_eps=1e-5)),
    ))
    c.tokenizer_train = config_lib.tokenizer_train_config(
        num_steps=330 * _STEPS_PER_EPOCH, batch_size=256, lr=1e-4, warmup_steps=0, schedule="constant",
        weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=0.0, ema_decay=0.999, l1_weight=1.0, l2_weight=0.0,
        perceptual_weight=1.0, log_every=100, save_every=5000, keep=3, image_every=5000,
        disc=config_lib.disc_config(type="patchgan", ch=64, n_layers=3, norm="group", weight=0.1, start_step=0,
                                    loss="hinge", adaptive_weight=False, lecam_weight=0.05, lecam_decay=0.999,
                                    lr=1e-4))
    c.lock()
    return c
