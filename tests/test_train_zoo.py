"""The tokenizer zoo through the one trainer: ``quickstart:lfq``, ``:ibq`` and ``:titok`` at toy size
(tokenizer, generator, samples), read back through the public API; and LFQ at 2^18 codes with
the exact codebook entropy compiled into the tokenizer's train step without any
``[tokens, 2^18]`` array, then trained one step."""
import json
import math
import re

import jax
import numpy as np
import pytest

import tiny_config
import vqgen
from vqgen import parallel
from vqgen.train import builders, common
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib


# The default suite runs TiTok (1-D tokens under MaskGIT); the LFQ and IBQ runs (a conv VQGAN under
# the GPT, ~1 min of CPU each) are behind `pytest -m slow` to keep the suite's time budget.
@pytest.mark.parametrize("variant,vocab,token_shape", [
    pytest.param("lfq", 16, (16, 16), marks=pytest.mark.slow), pytest.param("ibq", 32, (16, 16), marks=pytest.mark.slow),
    ("titok", 32, (16,))])
def test_zoo_quickstart_end_to_end(variant, vocab, token_shape, tmp_path):
    config = tiny_config.get_config(variant)
    spec = builders.token_spec(config)
    assert (spec.vocab_size, spec.token_shape) == (vocab, token_shape)
    for mode in ("train_tokenizer", "train_generator", "sample"):
        assert run_lib.run(config, str(tmp_path), mode) == 0
    tok = vqgen.load_tokenizer(str(tmp_path))
    images = tokenizer_lib.eval_images(config, "test", 4)["image"]
    tokens = tok.encode(images)
    assert tokens.shape == (4,) + token_shape and tokens.min() >= 0 and tokens.max() < vocab
    assert tok.decode(tokens).shape == (4, 32, 32, 1)
    report = json.load(open(tmp_path / "report.json"))["tokenizer"]
    assert math.isfinite(report["psnr"]) and 0 < report["codebook_usage"] <= 1
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["images"].shape == (20, 32, 32, 1) and f["images"].dtype == np.uint8
        assert sorted(set(f["labels"].tolist())) == list(range(10))


def _array_shapes(hlo_text):
    return [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\b[a-z]+[0-9]*\[([0-9]+(?:,[0-9]+)*)\]", hlo_text)]


@pytest.mark.slow  # the default suite checks the quantizer's own compiled pass (test_quantizers_lfq_fsq.py)
def test_lfq_2_18_tokenizer_step_has_no_tokens_by_codes_array():
    """A VQGAN with 18-bit LFQ (exact codebook entropy, num_groups=1) over 8 x 16 x 16 = 2,048
    tokens: the compiled train step holds no array with both 2,048 and 2^18 in its shape, nothing
    larger than the entropy's chunk of token-code probabilities, and one step trains."""
    config = tiny_config.get_config("lfq")
    config.unlock()
    config.tokenizer.embed_dim = config.tokenizer.quantizer.dim = 18
    config.tokenizer.quantizer.num_groups = 1
    config.tokenizer_train.disc.weight = 0.0
    config.lock()
    phase = tokenizer_lib.build(config)
    mesh = parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1])
    rules = parallel.rules_from_config(config.logical_rules)
    abstract, shardings = common.abstract_state(phase, mesh, rules)
    step = common.compile_phase(phase, mesh, shardings, max_traces=1)
    with parallel.mesh_context(mesh, rules):
        compiled = step.lower(*common.step_args(phase, mesh, abstract)).compile()
    tokens, codes = 8 * 16 * 16, 2**18
    shapes = _array_shapes(compiled.as_text())
    assert shapes and not [s for s in shapes if tokens in s and codes in s]
    chunk = builders.build_tokenizer(config.tokenizer, 1).quantizer.codebook_entropy_chunk
    # the largest: the entropy's chunk of token-code probabilities or the constant [2^18, 18] code bits
    assert max(math.prod(s) for s in shapes) <= max(chunk, 18 * codes) < tokens * codes
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    assert temp_mib < 512, temp_mib  # a dense [2048, 2^18] float32 table alone is 2,048 MiB

    state, shardings = common.create_state(phase, mesh, rules)
    _, it = tokenizer_lib.make_data(config, "train", train=True)
    with parallel.mesh_context(mesh, rules):
        state, metrics = compiled(state, common.put_batch(next(it), mesh, phase.batch), jax.random.key(0), None)
    metrics = jax.device_get(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0 < metrics["q/codebook_entropy"] <= 18 * np.log(2) + 1e-3
