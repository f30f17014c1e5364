"""What a cluster scheduler tells a node about its job, read from the environment.

The same container command (`ganforge launch --config F`) runs under a Kubernetes Indexed
Job or JobSet, a Kubeflow PyTorchJob and Slurm: each of them describes the job in its own
environment variables, and `detect_cluster` turns them into launcher options. Options given
on the command line win over these hints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

RDZV_PORT = 29400  # torchrun's default c10d port; the headless Service exposes it


@dataclass(frozen=True)
class ClusterHints:
    """Launcher options implied by the environment; None where it says nothing."""

    source: str = "local"
    nnodes: str | None = None  # "N" or "MIN:MAX"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    nproc_per_node: str | None = None
    max_restarts: int | None = None


def detect_cluster(env: Mapping[str, str]) -> ClusterHints:
    """Hints from Kubeflow PyTorchJob (PET_*), a Kubernetes Indexed Job, or Slurm (SLURM_*)."""
    if any(k.startswith("PET_") for k in env):
        return _pytorchjob(env)
    if "JOB_COMPLETION_INDEX" in env:
        return _indexed_job(env)
    if "SLURM_JOB_ID" in env and ("SLURM_NODEID" in env or "SLURM_JOB_NODELIST" in env):
        return _slurm(env)
    return ClusterHints()


def _pytorchjob(env: Mapping[str, str]) -> ClusterHints:
    """Kubeflow's training operator sets torchrun's own PET_* variables (and MASTER_* without elasticity)."""
    endpoint = env.get("PET_RDZV_ENDPOINT")
    if not endpoint and env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR")):
        # Non-elastic PyTorchJob: the master replica's Service; c10d runs its store there.
        host = env.get("PET_MASTER_ADDR", env.get("MASTER_ADDR"))
        endpoint = f"{host}:{env.get('PET_MASTER_PORT', env.get('MASTER_PORT', RDZV_PORT))}"
    rank = env.get("PET_NODE_RANK")
    restarts = env.get("PET_MAX_RESTARTS")
    return ClusterHints(source="pytorchjob", nnodes=env.get("PET_NNODES"),
                        node_rank=int(rank) if rank and rank.isdigit() else None,
                        rdzv_endpoint=endpoint, nproc_per_node=env.get("PET_NPROC_PER_NODE"),
                        max_restarts=int(restarts) if restarts and restarts.isdigit() else None)


def _indexed_job(env: Mapping[str, str]) -> ClusterHints:
    """Indexed Job (or a JobSet's): pod i is `<job>-i` under a headless Service; pod 0 hosts c10d.

    The manifests set JOB_NAME (downward API, label batch.kubernetes.io/job-name) and
    GANFORGE_RDZV_SERVICE (the Service that is the pods' subdomain); without them the
    endpoint is left to the command line.
    """
    index = env["JOB_COMPLETION_INDEX"]
    job, service = env.get("JOB_NAME"), env.get("GANFORGE_RDZV_SERVICE")
    endpoint = None
    if job and service:
        endpoint = f"{job}-0.{service}:{env.get('GANFORGE_RDZV_PORT', RDZV_PORT)}"
    return ClusterHints(source="indexed-job", nnodes=env.get("GANFORGE_NNODES"),
                        node_rank=int(index) if index.isdigit() else None, rdzv_endpoint=endpoint)


def _slurm(env: Mapping[str, str]) -> ClusterHints:
    """One `srun` task per node runs the launcher; the first node of the allocation hosts c10d."""
    nodes = env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    rank = env.get("SLURM_NODEID")
    first = first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    gpus = env.get("SLURM_GPUS_ON_NODE")
    return ClusterHints(source="slurm", nnodes=nodes, node_rank=int(rank) if rank and rank.isdigit() else None,
                        rdzv_endpoint=f"{first}:{RDZV_PORT}" if first else None,
                        nproc_per_node=gpus if gpus and gpus.isdigit() and int(gpus) > 0 else None)


def first_host(nodelist: str) -> str | None:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07" (as `scontrol show hostnames`)."""
    m = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return None
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]
