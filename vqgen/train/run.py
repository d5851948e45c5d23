"""What each ``--mode`` of the command line does, as importable functions."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging

from vqgen import parallel
from vqgen.train import common


def update_report(workdir: str, section: str, values: dict[str, Any]) -> dict:
    """Merges ``values`` under ``section`` into ``workdir/report.json`` (process 0 writes)."""
    path = os.path.join(workdir, "report.json")
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report[section] = values
    if parallel.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return report


def write_config(config, workdir: str) -> None:
    if parallel.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_tokenizer(config, workdir: str) -> dict:
    from vqgen.train.tokenizer import TokenizerTrainer

    trainer = TokenizerTrainer(config, workdir)
    state = trainer.train()
    metrics = trainer.evaluate(state)
    metrics["steps"] = int(jax.device_get(state.step))
    update_report(workdir, "tokenizer", metrics)
    logging.info("tokenizer: %s", metrics)
    print(json.dumps({"tokenizer": metrics}), flush=True)
    return metrics


def summary(config) -> dict:
    from vqgen.train.tokenizer import TokenizerTrainer

    counts = {}
    if "tokenizer" in config:
        trainer = TokenizerTrainer(config, workdir="/nonexistent")
        abstract = jax.eval_shape(trainer.init_state, jax.random.key(0))
        counts["tokenizer_params"] = common.count_params(abstract.params)
        print(f"tokenizer ({config.tokenizer.arch}): {counts['tokenizer_params']:,} parameters")
    if "generator" in config:
        from vqgen.train.generator import generator_param_count

        counts["generator_params"] = generator_param_count(config)
        print(f"generator ({config.generator.arch}): {counts['generator_params']:,} parameters")
    print(json.dumps(counts), flush=True)
    return counts


def run(config, workdir: str | None, mode: str) -> int:
    """Runs ``mode``; returns the process exit code (0 also after a SIGTERM checkpoint)."""
    if mode == "summary":
        summary(config)
        return 0
    write_config(config, workdir)
    phases = {
        "all": ("train_tokenizer", "train_generator", "sample", "evaluate"),
    }.get(mode, (mode,))
    try:
        for phase in phases:
            if phase == "train_tokenizer":
                train_tokenizer(config, workdir)
            elif phase == "train_generator":
                from vqgen.train.generator import train_generator
                train_generator(config, workdir)
            elif phase == "sample":
                from vqgen.train.generator import sample_to_workdir
                sample_to_workdir(config, workdir)
            elif phase == "evaluate":
                from vqgen.train.generator import evaluate_workdir
                evaluate_workdir(config, workdir)
            else:
                raise ValueError(f"unknown mode {phase!r}")
    except common.Preempted as e:
        logging.warning("%s", e)
        print(str(e), flush=True)
        return 0
    return 0
