"""`ganforge launch`: a torchrun (or accelerate) job set up for long runs on preemptible nodes.

torchrun's defaults suit a single test run: static rendezvous, no restarts, a RANK that
changes when a node comes back. Here the rendezvous is c10d with a run id derived from
`run.name` (so a replaced node rejoins the same job), workers are restarted a few times, and
every restart resumes from the newest checkpoint of `run.dir`. The config is checked before
anything starts, so a bad key exits 2 here instead of on every node after the rendezvous.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field

from launcher.cluster import RDZV_PORT, ClusterHints, detect_cluster

DEFAULT_MAX_RESTARTS = 3
# The job's c10d store (hosted by node 0's agent) or its peers went away: retry the pod.
# sysexits' EX_TEMPFAIL; the rendered manifests map it to a retry like 143 (docs/launch.md).
EXIT_STORE_LOST = 75
# torchrun's agent fails with these when the store host or the other nodes are gone.
STORE_LOST_ERRORS = ("RendezvousConnectionError", "RendezvousTimeoutError", "DistNetworkError", "DistStoreError")
# Checks of worker health per second matter less than the agent's CPU on a busy node.
DEFAULT_MONITOR_INTERVAL = 1.0
# Workers checkpoint on SIGTERM; torchrun kills them this many seconds later. The Kubernetes
# manifests give the pod a longer grace period than this, so the agent can report back.
DEFAULT_SHUTDOWN_TIMEOUT = 90


class LaunchError(Exception):
    """A launcher option that cannot work; the message names the option and value."""


@dataclass
class LaunchPlan:
    """The exact command to run, the variables it adds to the environment, and why."""

    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    summary: str = ""

    def shell(self) -> str:
        """One copy-pasteable line: `env K=V ... command`."""
        prefix = ["env", *(f"{k}={v}" for k, v in sorted(self.env.items()))] if self.env else []
        return shlex.join(prefix + self.cmd)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="start a (multi-node, elastic) training job with torchrun or accelerate",
                       description="Validate the config, then run trainer/main.py under torchrun (c10d "
                                   "rendezvous, restarts) or accelerate. Options left out are read from "
                                   "Kubernetes (Indexed Job/JobSet), Kubeflow PyTorchJob (PET_*) or Slurm "
                                   "(SLURM_*) variables when present.")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/dcgan_digits.yaml")
    p.add_argument("--nproc-per-node", default=None, help="processes per node: N or auto "
                   "(all GPUs; 1 on CPU, where one process already uses every core)")
    p.add_argument("--nnodes", default=None, help="N, or MIN:MAX for an elastic job (default 1)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's index; node 0 hosts the rendezvous store (default: from the cluster)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help=f"HOST[:PORT] of node 0's c10d store (port {RDZV_PORT} if left out); "
                        "required for several nodes outside a cluster")
    p.add_argument("--local-addr", default=None,
                   help="this node's address as the others reach it (default: its hostname; 127.0.0.1 "
                        "when the endpoint is on loopback)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help=f"worker-group restarts before the job fails (default {DEFAULT_MAX_RESTARTS})")
    p.add_argument("--monitor-interval", type=float, default=DEFAULT_MONITOR_INTERVAL,
                   help="seconds between worker health checks")
    p.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help="seconds workers get to checkpoint after SIGTERM before they are killed")
    p.add_argument("--backend", choices=["torchrun", "accelerate"], default="torchrun")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when a GPU is visible, else CPU (gloo)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment; start nothing")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.set_defaults(func=launch)


def launch(args: argparse.Namespace) -> int:
    from trainer.main import prepare

    try:
        hints = detect_cluster(os.environ)
        nnodes = parse_nnodes(args.nnodes or hints.nnodes or "1")
        device = resolve_device(args.device)
        nproc = resolve_nproc(args.nproc_per_node or hints.nproc_per_node or "auto", device)
        cfg = prepare(args.config, args.overrides)  # ConfigError: exit 2 before anything starts
        check_world_sizes(cfg, nnodes, nproc)
        plan = plan_launch(args, cfg.run.name, nnodes, nproc, device, hints, os.environ)
    except LaunchError as e:
        print(f"ganforge: launch: {e}", file=sys.stderr)
        return 2
    print(f"# {plan.summary}", flush=True)
    print(plan.shell(), flush=True)
    if args.dry_run:
        return 0
    return run_plan(plan)


def parse_nnodes(text: str) -> tuple[int, int]:
    """"4" -> (4, 4); "2:4" -> (2, 4)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", str(text))
    if not m:
        raise LaunchError(f"--nnodes must be N or MIN:MAX, got {text!r}")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) else lo
    if lo < 1 or hi < lo:
        raise LaunchError(f"--nnodes needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def resolve_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise LaunchError("--device cuda, but no CUDA device is visible")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def resolve_nproc(text: str, device: str) -> int:
    """A process per GPU; on CPU one per node, since one process already uses every core."""
    if text in ("auto", "gpu", "cpu"):
        if device == "cuda":
            import torch

            return torch.cuda.device_count()
        return 1
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"--nproc-per-node must be a positive integer or auto, got {text!r}")
    return int(text)


def check_world_sizes(cfg, nnodes: tuple[int, int], nproc: int) -> None:
    """Every world size the job may take must divide the global batch (an elastic job takes several)."""
    from trainer.families import check_config

    for n in range(nnodes[0], nnodes[1] + 1):
        check_config(cfg, world_size=n * nproc)


def rdzv_id(run_name: str) -> str:
    """Stable across restarts and nodes: the same run always meets under the same id."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")[:40] or "run"
    return f"ganforge-{slug}-{hashlib.sha1(run_name.encode()).hexdigest()[:8]}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if not host:
        host, port = endpoint, ""
    if port and not port.isdigit():
        raise LaunchError(f"--rdzv-endpoint must be HOST[:PORT], got {endpoint!r}")
    return host, int(port) if port else RDZV_PORT


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def launch_env(nproc: int, device: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables the job needs on top of the caller's environment."""
    # torchrun's agents reuse the first round's master address when they share the rendezvous
    # TCP store with the workers; a replacement node that joins a later round then waits
    # forever for an address nobody writes. Without sharing, every round publishes its own.
    env: dict[str, str] = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    # OMP_NUM_THREADS shares the node's cores between its processes (kept when already set).
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // nproc))
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # trainer.distributed: gloo on CPU even when a GPU is visible
    return env


def plan_launch(args: argparse.Namespace, run_name: str, nnodes: tuple[int, int], nproc: int, device: str,
                hints: ClusterHints, environ: Mapping[str, str]) -> LaunchPlan:
    """The torchrun or accelerate command for this node, from options, then cluster hints, then defaults."""
    restarts = args.max_restarts if args.max_restarts is not None else hints.max_restarts
    restarts = DEFAULT_MAX_RESTARTS if restarts is None else restarts
    if restarts < 0:
        raise LaunchError(f"--max-restarts must be >= 0, got {restarts}")
    node_rank = args.node_rank if args.node_rank is not None else hints.node_rank
    endpoint = args.rdzv_endpoint or hints.rdzv_endpoint
    multi = nnodes[1] > 1
    if multi and not endpoint:
        raise LaunchError(f"--nnodes {nnodes[0]}:{nnodes[1]} needs --rdzv-endpoint HOST:PORT "
                          "(node 0's address) outside a Kubernetes, PyTorchJob or Slurm job")
    # One node: a free port on loopback, chosen by the c10d store itself (torchrun --standalone).
    host, port = split_endpoint(endpoint) if endpoint else ("127.0.0.1", 0)
    env = launch_env(nproc, device, environ)
    from trainer import main as trainer_main

    script = trainer_main.__file__
    train_args = ["--config", args.config, *args.overrides]
    run_id = rdzv_id(run_name)
    nodes = f"{nnodes[0]}" if nnodes[0] == nnodes[1] else f"{nnodes[0]}:{nnodes[1]}"
    summary = (f"ganforge launch: {nodes} node(s) x {nproc} process(es) on {device} "
               f"({'nccl' if device == 'cuda' else 'gloo'}), c10d rendezvous {host}:{port} id {run_id}, "
               f"max restarts {restarts}, cluster: {hints.source}")
    if args.backend == "accelerate":
        cmd = accelerate_command(nnodes, nproc, node_rank, host, port, restarts, args, script, train_args)
        return LaunchPlan(cmd, env, summary)
    cmd = [*torchrun_command(), "--nnodes", nodes, "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", run_id,
           "--max-restarts", str(restarts), "--monitor-interval", f"{args.monitor_interval:g}",
           "--shutdown-timeout", str(args.shutdown_timeout)]
    if multi and node_rank is not None:
        # Without this each agent guesses from its addresses whether it hosts the store; a
        # replacement node must never start a second, empty store.
        cmd += ["--rdzv-conf", f"is_host={'1' if node_rank == 0 else '0'}"]
    if args.local_addr or is_loopback(host):
        cmd += ["--local-addr", args.local_addr or "127.0.0.1"]  # loopback: every "node" is on this machine
    return LaunchPlan([*cmd, script, *train_args], env, summary)


def torchrun_command() -> list[str]:
    """The torchrun of this environment (beside its python), else the module form."""
    here = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if os.access(here, os.X_OK):
        return [here]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def accelerate_command(nnodes: tuple[int, int], nproc: int, node_rank: int | None, host: str, port: int,
                       restarts: int, args: argparse.Namespace, script: str, train_args: list[str]) -> list[str]:
    """`accelerate launch` with the same rendezvous; accelerate has no elastic node range."""
    if nnodes[0] != nnodes[1]:
        raise LaunchError(f"--nnodes {nnodes[0]}:{nnodes[1]}: an elastic node range needs --backend torchrun")
    n = nnodes[0]
    if n > 1 and node_rank is None:
        raise LaunchError("--backend accelerate on several nodes needs --node-rank (or a cluster that sets it)")
    exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [exe if os.access(exe, os.X_OK) else "accelerate", "launch", "--num_machines", str(n),
           "--machine_rank", str(node_rank or 0), "--num_processes", str(n * nproc),
           "--main_process_ip", host, "--main_process_port", str(port),
           "--max_restarts", str(restarts), "--monitor_interval", f"{args.monitor_interval:g}",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--rdzv_backend", "c10d"]
    if n * nproc > 1:
        cmd.append("--multi_gpu")  # also what makes accelerate connect several CPU processes
    return [*cmd, script, *train_args]


def run_plan(plan: LaunchPlan) -> int:
    """Run the command; SIGTERM/SIGINT are passed on once, so workers checkpoint before exiting.

    The launcher is often PID 1 of a container: the kubelet's SIGTERM reaches only it. The
    child runs in its own session so that a terminal's Ctrl-C is not delivered twice (the
    trainer takes a second signal as "exit now").
    """
    env = {**os.environ, **plan.env}
    # torchrun's @record writes the agent's own exception here: how a lost store is told apart.
    error_file = None
    if "TORCHELASTIC_ERROR_FILE" not in env:
        fd, error_file = tempfile.mkstemp(prefix="ganforge-agent-error-", suffix=".json")
        os.close(fd)
        os.unlink(error_file)
        env["TORCHELASTIC_ERROR_FILE"] = error_file
    try:
        code, received = _wait_forwarding_signals(plan.cmd, env)
        lost = code > 0 and not received and _store_lost(env["TORCHELASTIC_ERROR_FILE"])
    finally:
        if error_file and os.path.exists(error_file):
            os.unlink(error_file)
    if lost:
        print(f"ganforge: launch: the job's rendezvous store or its peers went away; exit {EXIT_STORE_LOST} "
              "(retry: the run resumes from its newest checkpoint)", file=sys.stderr)
        return EXIT_STORE_LOST
    if code < 0:
        return 128 - code
    if received and code != 0:
        # torchrun reports a stop by signal as a plain failure; tell the scheduler it was a
        # preemption (143 = SIGTERM), which the Job's podFailurePolicy treats as retryable.
        return 128 + received[0]
    return code


def _store_lost(error_file: str) -> bool:
    """Whether torchrun's agent failed because the rendezvous store or the other agents are gone
    (not a worker's error, which torchrun copies into the same file)."""
    try:
        with open(error_file) as f:
            message = json.load(f)["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    return isinstance(text, str) and text.split(":", 1)[0].strip() in STORE_LOST_ERRORS


def _wait_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, list[int]]:
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return code, received
