"""Top-r SVD as `lowrank_core.delta` runs it ("gram": Rayleigh–Ritz on the top eigenvectors of the Gram matrix)
vs the full SVD on 4096x4096 matrices.

For each spectrum (two power-law decays, as fine-tuning ΔW spectra typically are, and a flat one: Gaussian
noise) and each rank r: the time of the full SVD (`torch.linalg.svd`, all ranks at once) and of the top-r one
(oversampling 10, best of three), the speed-up, the exact energy ratio Σσ²_r / ‖A‖²_F and the absolute error of
the top-r one. Prints figures, asserts nothing.

    python bench/bench_svd.py [--size 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from lowrank_core.delta import DeltaConfig, top_singular_triplets

RANKS = (8, 16, 32, 64)


def with_spectrum(size: int, sigma: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A float32 [size, size] matrix U diag(sigma) Vᵀ with random orthogonal U, V."""
    U = torch.linalg.qr(torch.randn(size, size, generator=g)).Q
    V = torch.linalg.qr(torch.randn(size, size, generator=g)).Q
    return (U * sigma) @ V.T


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    index = torch.arange(1, args.size + 1, dtype=torch.float32)
    matrices = {
        "decay i^-0.5": with_spectrum(args.size, index ** -0.5, g),
        "decay i^-1": with_spectrum(args.size, index ** -1.0, g),
        "flat (Gaussian)": torch.randn(args.size, args.size, generator=g),
    }
    warm = torch.randn(256, 256, generator=g)  # load the LAPACK kernels before timing
    torch.linalg.svd(warm, full_matrices=False)
    top_singular_triplets(warm, 8, DeltaConfig(full_spectrum_threshold=0))
    rows = []
    for spectrum, A in matrices.items():
        (_, S, _), full_s = timed(lambda: torch.linalg.svd(A, full_matrices=False))
        energy = torch.cumsum(S.double() ** 2, 0) / (S.double() ** 2).sum()
        for rank in RANKS:
            cfg = DeltaConfig(ranks=(rank,), full_spectrum_threshold=0)
            runs = [timed(lambda: top_singular_triplets(A, rank, cfg)) for _ in range(3)]
            (_, S_top, _, _, _), _ = runs[0]
            top_s = min(seconds for _, seconds in runs)
            estimate = float((S_top.double() ** 2).sum() / (S.double() ** 2).sum())
            exact = float(energy[rank - 1])
            rows.append({"spectrum": spectrum, "rank": rank, "full_s": full_s, "top_s": top_s,
                         "speedup": full_s / top_s, "energy": exact, "energy_abs_err": abs(estimate - exact)})
    print(f"{args.size}x{args.size} float32, {args.threads} threads, oversampling {DeltaConfig().oversampling}; "
          "full SVD timed once (it yields every rank), top-r best of 3")
    print(pd.DataFrame(rows).to_string(index=False, formatters={
        "full_s": "{:.2f}".format, "top_s": "{:.3f}".format, "speedup": "{:.0f}x".format,
        "energy": "{:.4f}".format, "energy_abs_err": "{:.1e}".format}))


if __name__ == "__main__":
    main()
