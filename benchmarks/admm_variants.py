"""Short ADMM / STE retraining probes on the PTB LSTM (how the ADMM numbers in RESULTS.md were found).

    MPNAS_DATA=../shared/data/ptb OMP_NUM_THREADS=1 .venv/bin/python benchmarks/admm_variants.py \\
        VARIANT BITS STEPS ['{"lr": 0.1, "rho": 0.002, "rho_growth": 1.15, "project_every": 50}']

VARIANT is one of:
- ``ste``: straight-through retraining (nas/admm.py ``SteHooks``);
- ``admm``: ADMM as ``mpnas retrain`` runs it (``AdmmHooks``);
- ``admm_ws``: ADMM started from the projected FP weights (W = G at step 0);
- ``hybrid``: ADMM whose theta step takes the loss gradient at Q(W) (straight-through) and
  adds the ADMM pull ``rho (W - G + U)`` after clipping.

The JSON overrides keys of ``ptb_lstm.yaml``'s ``retrain`` section. It retrains
``benchmarks/checkpoints/lstm/best.pt`` for STEPS steps into ``/tmp/admm_variants/`` and
prints one JSON line: valid and test perplexity of the hard-projected model and the last ADMM
residuals. Exploration only: the benchmark table is ``uniform_quant.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from typing import Any

import torch
from torch import nn

from nas.admm import AdmmHooks, SteHooks, _QuantizedClusters
from nas.config import load_config
from nas.data import load_corpus, resolve_data_dir
from nas.retrain import load_fp_checkpoint
from nas.train import TrainingHooks, train
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap

RETRAIN_KEYS = ("lr", "rho", "rho_growth", "rho_max", "project_every", "clip")


class HybridHooks(AdmmHooks):
    """ADMM with a straight-through theta step: forward on Q(W) (STE's weight swap), pull added after clipping."""

    def __init__(self, model: nn.Module, precision: PrecisionMap, **kwargs: Any) -> None:
        super().__init__(model, precision, **kwargs)
        self.ste = SteHooks(model, precision, rescale_every=self.project_every)

    def before_forward(self, model: nn.Module) -> None:
        self.ste.before_forward(model)

    def before_step(self, model: nn.Module) -> None:
        self.ste.before_step(model)

    def after_step(self, model: nn.Module, global_step: int) -> None:
        self.ste.after_step(model, global_step)
        super().after_step(model, global_step)


def main() -> None:
    torch.set_num_threads(1)
    variant, bits, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    exp = load_config("ptb_lstm")
    cfg = dataclasses.replace(exp.retrain, epochs=1, max_steps_per_epoch=steps,
                              **{k: v for k, v in overrides.items() if k in RETRAIN_KEYS})
    corpus = load_corpus(resolve_data_dir(None))
    ckpt = load_fp_checkpoint("benchmarks/checkpoints/lstm/best.pt", corpus)
    exp = dataclasses.replace(exp, model=dict(ckpt["config"]))
    config = {k: v for k, v in ckpt["config"].items() if k != "type"}
    precision = PrecisionMap.uniform(build_model(ckpt["config"]["type"], **config), bits)
    admm = {"rho": cfg.rho, "rho_growth": cfg.rho_growth, "rho_max": cfg.rho_max, "project_every": cfg.project_every}
    initial = ckpt["model"]
    make: Any
    if variant == "ste":
        def make(m: nn.Module) -> TrainingHooks:
            return SteHooks(m, precision, rescale_every=cfg.project_every)
    elif variant in ("admm", "admm_ws"):
        if variant == "admm_ws":
            start = build_model(ckpt["config"]["type"], **config)
            start.load_state_dict(initial)
            _QuantizedClusters(start, precision).hard_project_(start)
            initial = start.state_dict()

        def make(m: nn.Module) -> TrainingHooks:
            return AdmmHooks(m, precision, **admm)
    elif variant == "hybrid":
        def make(m: nn.Module) -> TrainingHooks:
            return HybridHooks(m, precision, **admm)
    else:
        raise SystemExit(f"unknown variant {variant!r}; expected ste, admm, admm_ws or hybrid")
    out = f"/tmp/admm_variants/{variant}_{bits}_{steps}"
    shutil.rmtree(out, ignore_errors=True)
    start_time = time.time()
    metrics = train(exp, corpus, out, progress=False, train_cfg=cfg, initial_state=initial, make_hooks=make)
    residuals = metrics.get("admm_residuals", [])
    print(json.dumps({"variant": variant, "bits": bits, "steps": steps, "overrides": overrides,
                      "valid": round(metrics["valid_ppl"], 2), "test": round(metrics["test_ppl"], 2),
                      "seconds": round(time.time() - start_time),
                      "last_residuals": residuals[-1] if residuals else None}))


if __name__ == "__main__":
    main()
