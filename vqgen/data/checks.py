"""The training data against the config, checked before a model is built or compiled.

A mismatch that would otherwise surface as a non-finite loss (labels beyond the class embedding),
a shape error after minutes of compiling (RGB images under a 1-channel tokenizer) or silently
wrong training ends here in one sentence naming the config key and the fix.
"""
from __future__ import annotations

import numpy as np


def check_source(source, *, source_name: str, num_classes: int, channels: int, image_size: int,
                 num_frames: int | None = None, first: int = 8) -> None:
    """Raises ``ValueError`` (one sentence) when ``source`` does not give what the config describes.

    Checks the source's class count (when it knows one) against ``num_classes``, then its first
    ``first`` records: labels in ``[0, num_classes)``, images ``[image_size, image_size, channels]``
    (video: ``[num_frames, image_size, image_size, channels]``).
    """
    name = f"data.source={source_name!r}"
    known = getattr(source, "num_classes", None)
    if known is not None and int(known) > int(num_classes):
        raise ValueError(f"{name} has {known} classes but data.num_classes={num_classes}; pass "
                         f"--config.data.num_classes={known}.")
    n = min(int(first), len(source))
    if n < 1:
        raise ValueError(f"{name} has no examples; check the data source.")
    for i in range(n):
        record = source[i]
        label = int(np.asarray(record["label"]))
        if not 0 <= label < int(num_classes):
            raise ValueError(f"{name} gives label {label} (example {i}) but data.num_classes={num_classes} allows "
                             f"0..{int(num_classes) - 1}; pass --config.data.num_classes={max(label + 1, 1)} or "
                             "relabel the data.")
        image = np.asarray(record["image"])
        video = num_frames is not None
        if image.ndim != (4 if video else 3):
            kind = "video clips [T, H, W, C]" if video else "images [H, W, C]"
            raise ValueError(f"{name} gives arrays of shape {image.shape} where the config expects {kind}; pick a "
                             f"{'video' if video else 'image'} source or a {'video' if not video else 'image'} config.")
        if image.shape[-1] != int(channels):
            raise ValueError(f"{name} gives {image.shape[-1]}-channel images but data.channels={channels}; pass "
                             f"--config.data.channels={image.shape[-1]} (or data with {channels}-channel images).")
        h, w = image.shape[-3:-1]
        if (h, w) != (int(image_size), int(image_size)):
            raise ValueError(f"{name} gives {h}x{w} images but data.image_size={image_size}; pass "
                             f"--config.data.image_size={h} or resize the data.")
        if video and image.shape[0] != int(num_frames):
            raise ValueError(f"{name} gives clips of {image.shape[0]} frames but the tokenizer takes {num_frames}; "
                             "match the config's frame count to the data.")
