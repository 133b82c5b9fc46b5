#!/usr/bin/env python3
"""Fit the erfc tail used by the Erf and Gelu kernels (shaders/elementwise.wgsl) and their CPU
twin (runtime/src/ops/elementwise.rs), and print the coefficients.

For x >= 1: erfc(x) = t * exp(-x^2 + P(s)), t = 1 / (1 + x/2), s maps t from [t(10), t(1)]
onto [-1, 1], P a degree-8 polynomial fitted by least squares to ln(erfc(x) e^(x^2) / t) on
[1, 10] against Python's math.erfc (double precision). Below 1 the kernels sum erf's Taylor
series instead (no cancellation near 0). The script also reports the fit's worst relative error
with the polynomial evaluated in float32 by Horner's rule (about 1.2e-7).

Run: .venv/bin/python tools/erf_fit.py  (numpy only)
"""

from __future__ import annotations

import math

import numpy as np

LO, HI, DEGREE = 1.0, 10.0, 8


def main() -> None:
    xs = np.linspace(LO, HI, 40001)
    t = 1.0 / (1.0 + 0.5 * xs)
    tmin, tmax = 1.0 / (1.0 + 0.5 * HI), 1.0 / (1.0 + 0.5 * LO)
    s = (2.0 * t - (tmin + tmax)) / (tmax - tmin)
    scaled = np.array([math.erfc(x) * math.exp(x * x) for x in xs])
    coef = np.polynomial.polynomial.Polynomial.fit(s, np.log(scaled / t), DEGREE, domain=[-1, 1],
                                                   window=[-1, 1]).coef.astype(np.float32)
    acc = np.full_like(s, coef[-1], dtype=np.float32)
    s32 = s.astype(np.float32)
    for c in coef[-2::-1]:
        acc = (acc * s32 + c).astype(np.float32)
    worst = float(np.max(np.abs(t * np.exp(acc.astype(np.float64)) / scaled - 1.0)))
    print(f"// t range [{tmin!r}, {tmax!r}]; worst relative error of t*exp(P(s)) in f32: {worst:.2e}")
    for k, c in enumerate(coef):
        print(f"P{k} = {float(c)!r}")


if __name__ == "__main__":
    main()
