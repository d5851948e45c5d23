"""GPT-B head to head with LlamaGen's own PyTorch code, in one sitting on this machine.

    python benchmarks/vs_llamagen.py --llamagen-repo /path/to/LlamaGen [--passes 2] [--reps 3]

Both sides are GPT-B (12 layers, width 768, 16384 codes, 1000 classes, 256 tokens), float32,
random weights (the zero-initialised output heads of both made random, so sampling is typical):

- **train step**, batch 8 x 256: LlamaGen's ``train_c2i.py`` loop body (``model(cond_idx, idx,
  targets)``, backward, ``clip_grad_norm_(1.0)``, AdamW step with its two weight-decay groups,
  dropout 0.1 as trained) against vqgen's ``generators/llamagen:B`` generator phase in float32
  (AdamW, clipping, dropout, EMA: one compiled step);
- **sampling**, 256 tokens, top-k 2000 (``sample_c2i.py``'s default): batch 1 without guidance and
  batch 8 with CFG 2.0, LlamaGen's ``generate()`` on the model wrapped by
  ``torch.compile(mode='reduce-overhead', fullgraph=True)`` (``sample_c2i.py --compile``) against
  ``vqgen.generators.gpt.sample``.

Every case runs ``passes`` times, each pass alternating the official code and vqgen, each side
timed ``reps`` times after an untimed first call (compilation; its time is recorded); the
median of each pass is kept, and the ratio is taken within a pass, since the host's speed drifts
between passes. Each side of each case and pass runs in a process of its own (this script with
``--one``), so neither side's thread pool is still spinning or holding memory while the other is
timed. PyTorch runs with as many threads as the machine has CPUs, as XLA does.

Without PyTorch or without a LlamaGen checkout (``--llamagen-repo`` or ``$LLAMAGEN_REPO``) it says
so and measures nothing. Results are printed and written to ``benchmarks/results/vs_llamagen.json``;
nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks import common

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ENV = "LLAMAGEN_REPO"
VOCAB, CLASSES, TOKENS, TOP_K = 16384, 1000, 256, 2000


def _official(repo: str | None):
    """``(torch, GPT_models, generate, checkout path)`` from a LlamaGen checkout, or a sentence saying why not."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed; pip install torch to compare with LlamaGen's code."
    repo = repo or os.environ.get(REPO_ENV)
    if not repo or not (Path(repo) / "autoregressive" / "models" / "gpt.py").is_file():
        return (f"no LlamaGen checkout (got {repo!r}); clone https://github.com/FoundationVision/LlamaGen and pass "
                f"--llamagen-repo or set ${REPO_ENV}.")
    repo = str(Path(repo).resolve())
    sys.path.insert(0, repo)
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models
    return torch, GPT_models, generate, repo


class _Official:
    def __init__(self, torch, GPT_models, generate):
        self.torch, self.generate = torch, generate
        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        self.model = GPT_models["GPT-B"](vocab_size=VOCAB, block_size=TOKENS, num_classes=CLASSES, cls_token_num=1,
                                         model_type="c2i")
        with torch.no_grad():
            self.model.output.weight.normal_(0.0, 0.02)
        self.compiled = None

    def train_fn(self, batch: int):
        torch, model = self.torch, self.model
        model.train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-2}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, VOCAB, (batch, TOKENS), generator=g)
        labels = torch.arange(batch) % CLASSES

        def step():
            _, loss = model(cond_idx=labels, idx=tokens[:, :-1], targets=tokens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        return step

    def sample_fn(self, batch: int, cfg: float):
        torch = self.torch
        self.model.eval()
        if self.compiled is None:
            self.compiled = torch.compile(self.model, mode="reduce-overhead", fullgraph=True)
        labels = torch.arange(batch) % CLASSES

        def sample():
            with torch.no_grad():
                out = self.generate(self.compiled, labels, TOKENS, cfg_scale=cfg, cfg_interval=-1,
                                    temperature=1.0, top_k=TOP_K, top_p=1.0, sample_logits=True)
            assert out.shape == (batch, TOKENS)
            return out
        return sample


class _Vqgen:
    def __init__(self):
        import flax.linen as nn

        from vqgen.generators import gpt
        self.gpt = gpt
        self.model = gpt.gpt_variant("B", vocab_size=VOCAB, num_classes=CLASSES, grid=(16, 16))
        self.params = jax.jit(lambda k: nn.meta.unbox(gpt.init_params(self.model, k)))(jax.random.key(0))
        self.params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(5),
                                                                   self.params["output"]["kernel"].shape)

    def train_fn(self, batch: int):
        from benchmarks import sample_gpt
        return sample_gpt.train_step_fn(batch, self.model)[0]

    def sample_fn(self, batch: int, cfg: float):
        gpt = self.gpt
        config = gpt.SamplerConfig(top_k=TOP_K, cfg_scale=cfg)
        labels = jnp.arange(batch, dtype=jnp.int32) % CLASSES
        keys = iter(range(1, 10_000))

        def sample():
            return gpt.sample(self.model, self.params, labels, jax.random.key(next(keys)), config).block_until_ready()
        return sample


CASES = (("train step, batch 8 x 256", "train", 8, None),
         ("sample 256 tokens, batch 1", "sample", 1, 1.0),
         ("sample 256 tokens, batch 8, CFG 2", "sample", 8, 2.0))


def measure_one(side: str, case_index: int, reps: int, repo: str | None = None) -> dict:
    """Times one side of one case in this process: ``{first_call_s, median_s, tokens_per_s}``."""
    _, kind, batch, cfg = CASES[case_index]
    if side == "official":
        found = _official(repo)
        if isinstance(found, str):
            raise SystemExit(found)
        impl = _Official(*found[:3])
    else:
        impl = _Vqgen()
    fn = impl.train_fn(batch) if kind == "train" else impl.sample_fn(batch, cfg)
    t = common.time_fn(fn, warmup=1, reps=reps)
    return {"first_call_s": t["first_call_s"], "median_s": t["median_s"],
            "tokens_per_s": batch * TOKENS / t["median_s"]}


def _measure_in_subprocess(side: str, case_index: int, reps: int, repo: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", side, str(case_index), "--reps", str(reps),
           "--llamagen-repo", repo]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{side} / {CASES[case_index][0]} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(quick: bool = False, *, repo: str | None = None, passes: int | None = None, reps: int | None = None) -> dict:
    """Measures every case (nothing asserted); a result without rows says why when it cannot run."""
    found = _official(repo)
    if isinstance(found, str):
        print(found, flush=True)
        return {"benchmark": "vs_llamagen", "skipped": found, "table": []}
    repo = found[3]
    passes = passes or (1 if quick else 2)
    reps = reps or (1 if quick else 3)
    results = []
    for i, (case, _, batch, cfg) in enumerate(CASES):
        record = {"case": case, "batch": batch, "cfg_scale": cfg, "passes": []}
        for p in range(passes):
            one = {side: _measure_in_subprocess(side, i, reps, repo) for side in ("official", "vqgen")}
            one["ratio"] = one["vqgen"]["tokens_per_s"] / one["official"]["tokens_per_s"]
            record["passes"].append(one)
            print(json.dumps({"case": case, "pass": p + 1, **one}), flush=True)
        results.append(record)
    table = []
    for r in results:
        for side in ("official", "vqgen"):
            tps = [p[side]["tokens_per_s"] for p in r["passes"]]
            note = ("ratio vqgen / official per pass: " + ", ".join(f"{p['ratio']:.2f}x" for p in r["passes"])
                    if side == "vqgen" else "LlamaGen's own code" + (", torch.compile" if r["cfg_scale"] else ""))
            table.append(common.row("vs_llamagen", f"{side}: {r['case']}", throughput=statistics.median(tps),
                                    unit="tokens/s", step_s=statistics.median(p[side]["median_s"] for p in r["passes"]),
                                    note=note))
    return {"benchmark": "vs_llamagen", "quick": quick, "passes": passes, "reps": reps, "cases": results,
            "table": table, "torch": found[0].__version__, "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen-repo", default=None, help=f"a LlamaGen checkout (default: ${REPO_ENV})")
    parser.add_argument("--passes", type=int, default=None, help="alternating passes (default 2, 1 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per side and pass (default 3)")
    parser.add_argument("--quick", action="store_true", help="one pass of one timed call each")
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "CASE"), default=None,
                        help="time one side (official|vqgen) of case CASE (0-2) in this process, print its JSON")
    args = parser.parse_args()
    if args.one:
        side, case_index = args.one
        if side not in ("official", "vqgen") or case_index not in ("0", "1", "2"):
            raise SystemExit(f"--one {side} {case_index}: give SIDE official or vqgen and CASE 0, 1 or 2.")
        print(json.dumps(measure_one(side, int(case_index), args.reps or 3, args.llamagen_repo)), flush=True)
        return
    result = run(args.quick, repo=args.llamagen_repo, passes=args.passes, reps=args.reps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("vs_llamagen_quick.json" if args.quick else "vs_llamagen.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
