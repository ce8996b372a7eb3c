"""``python -m matfactor``: prune one realistic layer with every pruner and report the errors.

Until the model-level job exists this is the main job: a realistic calibration problem (see
:mod:`matfactor.testing`) is pruned at the given density in each sparsity pattern by magnitude,
Wanda, SparseGPT and ADMM, and the relative layer error ``‖XŴ − XW‖² / ‖XW‖²`` and wall time
of each are printed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import admm_prune, layer_error, magnitude_prune, nnz_budget, sparsegpt_prune, wanda_prune
from .testing import realistic_layer

PRUNERS = {"magnitude": magnitude_prune, "wanda": wanda_prune, "sparsegpt": sparsegpt_prune,
           "admm": admm_prune}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m matfactor", description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=768, help="layer inputs (default 768)")
    parser.add_argument("--d-out", type=int, default=3072, help="layer outputs (default 3072)")
    parser.add_argument("--density", type=float, default=0.5, help="kept fraction (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    problem = realistic_layer(args.d_in, args.d_out, seed=args.seed)
    W, H = problem.W.astype(np.float32), problem.H.astype(np.float32)
    print(f"layer {args.d_in} x {args.d_out}, {problem.X.shape[0]} calibration samples, "
          f"{problem.dead.size} dead inputs, float32")
    print(f"{'pattern':<14}{'pruner':<11}{'rel. error':>12}{'nnz':>10}{'time [s]':>10}")
    patterns = [("unstructured", args.density), ("per_output", args.density), ("2:4", None)]
    for pattern, density in patterns:
        budget = nnz_budget(W.shape, density, pattern)
        for name, prune in PRUNERS.items():
            start = time.perf_counter()
            W_sparse = prune(W, H, density=density, pattern=pattern)
            elapsed = time.perf_counter() - start
            error = layer_error(W, W_sparse, H)
            print(f"{pattern:<14}{name:<11}{error:>12.5f}{int(np.count_nonzero(W_sparse)):>10}"
                  f"{elapsed:>10.2f}")
        print(f"{'':<14}{'budget':<11}{'':>12}{budget:>10}")


if __name__ == "__main__":
    main()
