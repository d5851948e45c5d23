"""A tiny variant of configs/generators/magvit.py for tests: 16x16 clips of 4 frames -> 2x8x8
tokens of a 16-code FSQ, a one-layer transformer, a few steps.

Usable as ``--config=tests/tiny_video_config.py`` or ``tiny_video_config.get_config()``.
"""
from vqgen import config_lib


def get_config(arg=None):
    del arg
    c = config_lib.load_config("generators/magvit", "moving_mnist")
    c.unlock()
    t = c.tokenizer
    t.ch, t.ch_mult, t.temporal_downsample, t.z_channels, t.embed_dim, t.norm_groups = 4, (1, 2), (True,), 8, 2, 2
    t.num_frames, t.quantizer.levels = 4, (4, 4)
    c.data.image_size, c.data.eval_examples = 16, 8
    c.generator.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, num_frames=4, cond_frames=2))
    tt = c.tokenizer_train
    tt.num_steps, tt.batch_size, tt.save_every, tt.log_every, tt.warmup_steps = 1, 8, 1, 1, 0
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 2, 8, 2, 1, 0
    c.sample.num_steps, c.sample.cond_frames, c.sample.batch_size = 2, 2, 8
    c.video.eval_clips, c.video.cache_clips = 3, 8
    c.lock()
    return c
