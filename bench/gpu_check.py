"""`make gpu-check`: the GPU suite in one command, at most about 5 minutes on one H100-class GPU.

Runs the tests marked `gpu` (tests/test_gpu.py), bench/gpu.py (DCGAN 64x64 img/s against
hand-written loops, at batch 128 with a profile of host syncs and launches, and at batch 512) and bench/stylegan2.py on configs/stylegan2_256.yaml (sec/kimg, peak
memory), and writes every figure as JSON into $OUT (default gpu-check-out/), so that they come
back from a remote GPU machine as files: env.json, tests.json (+ gpu-tests.xml), dcgan64.json,
dcgan64_b512.json, profile/*.txt, stylegan2_256.json, summary.json, and log.txt with every command's output.

A step that runs past its time limit is stopped and recorded with exit 124 and the last JSON
line it printed (bench/gpu.py prints its eager figures before it compiles its compiled variants).

GPU_CHECK_CPU_SMOKE=1 runs the same steps on the CPU with tiny sizes: a check that the suite
works, whose figures mean nothing. Exit status: 0 when every step succeeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.environ.get("GPU_CHECK_CPU_SMOKE") == "1"


def run(name: str, cmd: list[str], out: str, timeout: float, log) -> tuple[int, str, float]:
    """(exit status, last stdout line, seconds) of `cmd`; its whole output goes to the log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if SMOKE:
        env["GPU_CHECK_CPU_SMOKE"] = "1"
    print(f"gpu-check: {name}: {' '.join(cmd)}", flush=True)
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, text = r.returncode, r.stdout + r.stderr
        lines = r.stdout.strip().splitlines()
    except subprocess.TimeoutExpired as e:  # what it printed so far still counts (bench/gpu.py: a partial JSON line)
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        code, text, lines = 124, f"{out}{err}\n(timed out after {timeout} s)", out.strip().splitlines()
    seconds = time.perf_counter() - t0
    log.write(text + f"\n===== {name}: exit {code} in {seconds:.1f} s\n")
    log.flush()
    print(f"gpu-check: {name}: exit {code} in {seconds:.1f} s", flush=True)
    return code, lines[-1] if lines else "", seconds


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "smoke": SMOKE}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported()}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def test_counts(xml_path: str) -> dict:
    if not os.path.exists(xml_path):
        return {}
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('name')}: {(case.find('failure') if case.find('failure') is not None else case.find('error')).get('message', '')[:300]}"
                        for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def last_json(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def main() -> int:
    out = os.environ.get("OUT") or os.path.join(REPO, "gpu-check-out")
    os.makedirs(out, exist_ok=True)
    summary: dict = {"env": environment()}
    write = lambda name, data: json.dump(data, open(os.path.join(out, name), "w"), indent=1)  # noqa: E731
    write("env.json", summary["env"])
    py = sys.executable
    xml = os.path.join(out, "gpu-tests.xml")
    if SMOKE:
        dcgan = ["--allow-cpu", "--no-compile", "--steps", "2", "--repeats", "2", "--warmup", "1", "--batch", "4"]
        dcgan_large = dcgan
        sg2 = ["--device", "cpu", "--steps", "1", "--warmup", "1", "model.resolution=32", "train.batch_size=4",
               "model.channel_base=512"]
        tests = ["-k", "dcgan and not two_processes"]  # the rest of the suite is the same code on other recipes
    else:
        dcgan, sg2, tests = [], ["--device", "cuda", "--steps", "16", "--warmup", "16"], []
        dcgan_large = ["--no-compile", "--batch", "512", "--repeats", "3"]
    with open(os.path.join(out, "log.txt"), "w") as log:
        code, _, secs = run("tests", [py, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                                      "--junitxml", xml, *tests], out, 900 if SMOKE else 240, log)
        summary["tests"] = test_counts(xml) | {"exit": code, "seconds": round(secs, 1)}
        write("tests.json", summary["tests"])
        # dcgan64's limit leaves room for compiling its two compiled variants (reduce-overhead) first
        for name, cmd, limit in (("dcgan64", [py, "bench/gpu.py", *dcgan, "--profile", os.path.join(out, "profile")], 150),
                                 ("dcgan64_b512", [py, "bench/gpu.py", *dcgan_large], 60),
                                 ("stylegan2_256", [py, "bench/stylegan2.py", "--config", "configs/stylegan2_256.yaml",
                                                    *sg2], 90)):
            code, line, secs = run(name, cmd, out, 600 if SMOKE else limit, log)
            summary[name] = (last_json(line) or {"error": line}) | {"exit": code, "seconds": round(secs, 1)}
            write(f"{name}.json", summary[name])
    write("summary.json", summary)
    steps = ("tests", "dcgan64", "dcgan64_b512", "stylegan2_256")
    ok = all(summary[k]["exit"] == 0 for k in steps)
    print(json.dumps({k: summary[k] for k in steps}, indent=1))
    print(f"gpu-check: {'passed' if ok else 'FAILED'}; figures in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
