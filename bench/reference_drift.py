"""How far each family's reference output moves when kernels sum in another order.

Usage: ATEN_CPU_CAPABILITY=default python bench/reference_drift.py
Trains every recipe of tests/test_reference_samples.py as that test does (20 steps, 2 processes,
fp64) and prints the largest |difference| from the stored arrays. Run under
ATEN_CPU_CAPABILITY=default (plain kernels instead of the CPU's vector ones) it stands in for
another CPU: the test's tolerance on other machines (1e-4) is set from it.
Last stdout line: JSON {"machine": ..., "max_abs_diff": {recipe: value}}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from tests.test_reference_samples import RECIPES, STORE, build_data, machine, outputs

    diffs = {}
    with tempfile.TemporaryDirectory() as work:
        data = build_data(f"{work}/data")
        for recipe in RECIPES:
            got = outputs(recipe, data[recipe], work)
            diffs[recipe] = float(np.abs(got - np.load(os.path.join(STORE, f"{recipe}.npy"))).max())
            print(f"{recipe:>24}: {diffs[recipe]:.3g}", flush=True)
    print(json.dumps({"machine": machine(), "max_abs_diff": diffs}))


if __name__ == "__main__":
    main()
