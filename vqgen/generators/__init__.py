"""vqgen.generators: the generator families and the protocol through which they plug in.

A family is one module (``gpt.py``, ``gpt_factorized.py``, ``maskgit.py``, ``magvit.py``, ``var.py``,
``mar.py``) listed in :data:`FAMILIES`
under the name that ``config.generator.arch`` uses. Training, sampling, ahead-of-time compilation
and the Python API reach a family only through these module-level names:

``build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...]) -> nn.Module``
    The model from the ``generator`` config section (a plain dict; ``arch`` is ignored, an unknown
    key is a ``ValueError``) over a token grid: ``(h, w)`` for images, ``(t, h, w)`` for video.
``init_params(model, rng) -> params``
    Initialised parameters (``nn.Partitioned``-boxed, so the trainer can shard them).
``loss_fn(model, params, batch, rng) -> (loss, metrics)``
    The training loss of ``batch = {'tokens': int32 [B, L], 'label': int32 [B]}``: a float32
    scalar and a dict of float32 scalars; pure and jittable.
``SamplerOptions``
    A frozen, hashable dataclass of the family's sampling options, a subclass of
    :class:`vqgen.generators.sampling.SamplingOptions` (temperature, top-k, top-p, CFG scale,
    schedule and interval) with the family's own fields added. Its fields are exactly the keys
    of the family's ``sample`` config section (besides :data:`~vqgen.generators.sampling.RUN_KEYS`).
``sampler_options(cfg: dict, **overrides) -> SamplerOptions``
    Options from a ``sample`` section; a key the family does not read is a ``ValueError``
    naming the family.
``sample(model, params, labels, rng, opts) -> int32 [B, L]``
    Class-conditional token ids, jitted end to end.
``VIDEO: bool``
    Whether the family models video token grids ``(t, h, w)``.
optional ``TASKS`` and ``sample_task(model, params, labels, rng, opts, condition_tokens, known_mask)``
    Conditional tasks (MAGVIT: frame prediction, interpolation, in/outpainting): token ids that
    keep ``condition_tokens`` where ``known_mask`` and generate the rest; ``opts.task`` names the
    task. A family without them samples class-conditionally only.

optional ``TOKEN_PYRAMID = True``
    The family models the multi-scale token pyramid of a tokenizer whose spec has ``scales``
    (VAR): ``batch['tokens']`` is ``[B, L]`` with ``L = sum(s*s)``, the maps flattened and joined
    from the smallest scale, and ``build`` also receives ``scales=`` and ``code_dim=`` (the
    quantizer's code dimension). Other families refuse such a tokenizer and vice versa.
optional ``USES_QUANTIZER = True`` with ``quantizer_codec(quantizer) -> codec``
    The family reads the frozen tokenizer's quantizer besides the token ids (VAR builds each
    scale's input from the codebook and Φ): ``loss_fn(model, params, batch, rng, vq_params, *,
    codec)`` and ``sample(model, params, labels, rng, opts, *, vq_params, codec)``, where
    ``vq_params`` is the tokenizer's ``params['quantizer']`` (a frozen input of the generator
    phase, never trained) and ``codec`` the static value ``quantizer_codec`` makes of the
    tokenizer's quantizer module.

optional ``INPUT_KIND``: what the family models, one of :data:`INPUT_KINDS` (read it with
:func:`input_kind`):

``"tokens"`` (the default when absent)
    Discrete code ids of a tokenizer with a codebook, as described above (GPT, MaskGIT, MAGVIT,
    VAR). A continuous (KL) tokenizer under such a family is refused.
``"latents"``
    The continuous latents of a KL tokenizer (``tokenizer.arch='kl'``; MAR).
    ``build(cfg, *, num_classes, grid=(h, w), latent_dim=C)`` over the tokenizer's latent map;
    ``batch = {'latents': float32 [B, h, w, C], 'label': int32 [B]}``: the latent map, channels
    last as the tokenizer's ``encode`` lays it out, drawn from the tokenizer's posterior afresh
    for every batch (MAR's recipe; the latent cache keeps the posterior's mean and log-variance)
    and multiplied by the tokenizer's ``scale_factor`` (0.2325 for MAR's KL-16), so the family
    sees values of roughly unit variance. ``sample(...) -> float32 [B, h, w, C]``: latents in the
    same scaled layout; the trainer divides them by ``scale_factor`` and decodes them with the
    tokenizer. A discrete tokenizer under such a family is refused, and so is a KL tokenizer of
    another latent width than a converted generator was built for.
``"pixels"``
    The images themselves, with no tokenizer (FractalMAR). ``build(cfg, *, num_classes,
    image_size=(H, W), channels=C)`` from ``config.data``; ``batch = {'images': float32 [B, H, W, C] in
    [-1, 1], 'label': int32 [B]}`` straight from the data pipeline of ``config.data`` (its
    random crop and flip), ``generator_train.batch_size`` examples per step;
    ``sample(...) -> float32 [B, H, W, C]``: images in [-1, 1], used as they are (no decode).
    The config needs no ``tokenizer``/``tokenizer_train`` sections (present ones are not used):
    ``--mode=all`` runs the generator phase, sampling and evaluation, and
    ``--mode=train_tokenizer`` is refused with a sentence.

The spec of what the generator phase reads (grid, vocabulary or latent width and scale, image
or video, scales, kind) is :func:`vqgen.train.builders.input_spec`; for the tokenizer-backed kinds
it is :func:`vqgen.train.builders.token_spec` of the tokenizer config.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# config.generator.arch -> the module of the family.
FAMILIES = {
    "gpt": "vqgen.generators.gpt",
    "gpt_factorized": "vqgen.generators.gpt_factorized",
    "maskgit": "vqgen.generators.maskgit",
    "magvit": "vqgen.generators.magvit",
    "var": "vqgen.generators.var",
    "mar": "vqgen.generators.mar",
    "fractal": "vqgen.generators.fractal",
}

# The values of a family's optional INPUT_KIND (see the module docstring); absent means "tokens".
INPUT_KINDS = ("tokens", "latents", "pixels")


def family(arch: str) -> ModuleType:
    """The module of generator family ``arch`` (imported on first use)."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown generator arch {arch!r}; set generator.arch to one of {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[arch])


def token_pyramid(module: ModuleType) -> bool:
    """Whether a family models a multi-scale token pyramid (``TOKEN_PYRAMID``)."""
    return bool(getattr(module, "TOKEN_PYRAMID", False))


def uses_quantizer(module: ModuleType) -> bool:
    """Whether a family reads the tokenizer's quantizer parameters (``USES_QUANTIZER``)."""
    return bool(getattr(module, "USES_QUANTIZER", False))


def input_kind(module: ModuleType) -> str:
    """What a family models (``INPUT_KIND``): ``'tokens'`` (the default), ``'latents'`` or ``'pixels'``."""
    kind = getattr(module, "INPUT_KIND", "tokens")
    if kind not in INPUT_KINDS:
        raise ValueError(f"{module.__name__}.INPUT_KIND={kind!r} is unknown; set it to one of {INPUT_KINDS}.")
    return kind


def has_tasks(module: ModuleType) -> bool:
    """Whether a family samples conditional tasks (``sample_task``) besides class-conditional ones."""
    return hasattr(module, "sample_task")
