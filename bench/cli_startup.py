"""Start-up time of the `ganforge` command: `ganforge --help` and `ganforge train --help`, whole processes.

Usage: python bench/cli_startup.py [--repeats N]
Last stdout line: JSON with the median wall seconds of each and the spread (min, max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BIN = os.path.join(os.path.dirname(sys.executable), "ganforge")


def wall(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([BIN, *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    result = {}
    for name, argv in (("help", ["--help"]), ("train_help", ["train", "--help"])):
        wall(argv)  # warm-up: file cache
        times = [wall(argv) for _ in range(args.repeats)]
        result[f"{name}_s"] = round(statistics.median(times), 3)
        result[f"{name}_spread_s"] = [round(min(times), 3), round(max(times), 3)]
        print(f"ganforge {' '.join(argv)}: median {result[f'{name}_s']} s over {args.repeats}", flush=True)
    result["repeats"] = args.repeats
    print(json.dumps(result))


if __name__ == "__main__":
    main()
