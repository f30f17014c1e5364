"""`ganforge k8s render`: Kubernetes manifests for one run that survive preemption.

Three flavours share one pod template: an Indexed Job (plain Kubernetes >= 1.29), a Kubeflow
PyTorchJob with an elastic policy, and a JobSet. Every pod runs `ganforge launch`, which
reads its node index and rendezvous address from the environment the flavour provides; the
run's config travels in a ConfigMap. The volumes (checkpoints, data, MLflow's store) are a
separate, one-time component (`ganforge k8s storage`, k8s/storage): deleting a run, or the
MLflow server, never deletes a volume. The committed k8s/ tree is this module's output for
configs/dcgan_digits.yaml (`--kustomize`), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from launcher.cluster import RDZV_PORT
from launcher.launch import DEFAULT_MAX_RESTARTS, EXIT_STORE_LOST

CONFIG_DIR = "/etc/ganforge"
CHECKPOINTS, DATA = "/checkpoints", "/data"
EXIT_CONFIG_ERROR, EXIT_PREEMPTED = 2, 143  # trainer/main.py's contract
RETRYABLE = [EXIT_STORE_LOST, EXIT_PREEMPTED]  # node 0 (the store) or a peer went away; preempted
METRICS_PORT = 9400  # rank r of a node serves /metrics on METRICS_PORT + local rank
MLFLOW_URI = "http://mlflow:5000"  # the Service of k8s/mlflow, same namespace
MLFLOW_IMAGE = "ghcr.io/mlflow/mlflow:v3.17.2"  # the mlflow pinned in constraints.txt
MONITORING_NAMESPACE = "monitoring"  # where Prometheus runs: the only namespace let in to /metrics
FLAVORS = ("job", "pytorchjob", "jobset")
MONITOR_LABEL = "release=kube-prometheus-stack"  # the Helm chart's default podMonitorSelector
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
LABEL_VALUE = re.compile(rf"({_NAME})?")


VERSION_FLOORS = """needs (older versions silently drop fields the manifests rely on):
  job         Kubernetes >= 1.29 (backoffLimitPerIndex, podReplacementPolicy, podFailurePolicy)
  pytorchjob  Kubeflow training-operator >= v1.8.0 (elasticPolicy, restartPolicy OnFailure +
              runPolicy.backoffLimit)
  jobset      JobSet >= v0.7.0 (failurePolicy.rules, restartStrategy) on Kubernetes >= 1.29
  PodMonitor  prometheus-operator (monitoring.coreos.com/v1); checked against v0.93.0
elastic (pytorchjob --min-nodes M --nodes N): every world size from M to N nodes must divide
train.batch_size (render names the smallest batch that does)."""


class RenderError(Exception):
    """An option the manifests cannot honour; the message names it."""


@dataclass
class RenderOptions:
    nodes: int
    gpus_per_node: int
    image: str
    flavor: str = "job"
    min_nodes: int | None = None  # elastic lower bound (pytorchjob); default: nodes
    data_dir: str | None = None  # data.train inside the pod; default /data/<basename>
    shutdown_seconds: int = 90  # workers' time to checkpoint after SIGTERM
    storage_class: str | None = None
    checkpoint_storage: str = "100Gi"
    data_storage: str = "200Gi"
    mlflow_uri: str = MLFLOW_URI
    namespace: str | None = None
    monitor_label: str = MONITOR_LABEL  # key=value the Prometheus Operator selects PodMonitors by
    node_selector: tuple[str, ...] = ()  # KEY=VALUE each
    tolerations: tuple[str, ...] = ()  # KEY[=VALUE]:EFFECT each
    cpu_per_gpu: str = "6"
    memory_per_gpu: str = "32Gi"
    guaranteed: bool = False  # limits = requests: QoS Guaranteed
    one_pod_per_node: bool = False
    exclusive_topology: str | None = None  # JobSet: one replicated Job per domain of this node label


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("k8s", help="Kubernetes manifests for a run")
    ksub = k.add_subparsers(dest="k8s_cmd", required=True)
    p = ksub.add_parser("render", help="write ready manifests (Indexed Job, PyTorchJob or JobSet) for a run",
                        description="Write the manifests of one run (no volumes: `ganforge k8s storage` writes "
                                    "those, once).", epilog=VERSION_FLOORS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML recipe; embedded in a ConfigMap")
    p.add_argument("--nodes", type=int, required=True, help="pods (one per node)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per pod, one process each (0: CPU)")
    p.add_argument("--image", required=True, help="container image with ganforge installed (deploy/Dockerfile)")
    p.add_argument("--flavor", choices=FLAVORS, default="job")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace the contents of --out")
    p.add_argument("--kustomize", action="store_true",
                   help="write a kustomize tree instead: base/ (Indexed Job), overlays/pytorchjob, "
                        "overlays/jobset, mlflow/")
    p.add_argument("--min-nodes", type=int, help="elastic lower bound for the pytorchjob flavour")
    p.add_argument("--data-dir", help=f"data.train inside the pod (default {DATA}/<name of data.train>)")
    p.add_argument("--shutdown-seconds", type=int, default=90,
                   help="time workers get to write a checkpoint after SIGTERM; the pod's grace period adds 30")
    p.add_argument("--storage-class", help="StorageClass of the ReadWriteMany volumes (default: the cluster's)")
    p.add_argument("--mlflow-uri", default=MLFLOW_URI, help="tracking server seen from the pods ('none' disables)")
    p.add_argument("--namespace", help="namespace for every object (default: kubectl's current one)")
    p.add_argument("--monitor-label", default=MONITOR_LABEL, metavar="KEY=VALUE",
                   help=f"label on the PodMonitor that your Prometheus selects (default {MONITOR_LABEL}, "
                        "kube-prometheus-stack's default podMonitorSelector)")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule only on nodes with this label (repeatable)")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE]:EFFECT",
                   help="tolerate this taint (repeatable; EFFECT NoSchedule, PreferNoSchedule or NoExecute); "
                        "GPU pods always tolerate nvidia.com/gpu")
    p.add_argument("--cpu-per-gpu", default="6", help="CPU request per GPU (default 6; CPU pods: 2 in all)")
    p.add_argument("--memory-per-gpu", default="32Gi",
                   help="memory request and limit per GPU (default 32Gi; leave room for the node's own use)")
    p.add_argument("--guaranteed", action="store_true", help="CPU limit = request too: QoS class Guaranteed")
    p.add_argument("--one-pod-per-node", action="store_true",
                   help="never two of the run's pods on one node (required pod anti-affinity on the hostname)")
    p.add_argument("--exclusive-topology", metavar="NODE_LABEL",
                   help="jobset: the JobSet's Job gets the nodes of one topology domain to itself "
                        "(e.g. cloud.google.com/gke-nodepool)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for the run")
    p.set_defaults(func=render_cli)

    s = ksub.add_parser("storage", help="write the volumes every run shares (once per namespace; never part of a run)")
    s.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    s.add_argument("--force", action="store_true", help="replace the contents of --out")
    s.add_argument("--storage-class", help="StorageClass of the ReadWriteMany volumes (default: the cluster's)")
    s.add_argument("--checkpoint-storage", default="100Gi", help="size of the checkpoint volume")
    s.add_argument("--data-storage", default="200Gi", help="size of the data (shards) volume")
    s.add_argument("--namespace", help="namespace for every object (default: kubectl's current one)")
    s.set_defaults(func=storage_cli)


def render_cli(args: argparse.Namespace) -> int:
    opts = RenderOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image, flavor=args.flavor,
                         min_nodes=args.min_nodes, data_dir=args.data_dir, shutdown_seconds=args.shutdown_seconds,
                         storage_class=args.storage_class, mlflow_uri=args.mlflow_uri, namespace=args.namespace,
                         monitor_label=args.monitor_label, node_selector=tuple(args.node_selector),
                         tolerations=tuple(args.toleration), cpu_per_gpu=args.cpu_per_gpu,
                         memory_per_gpu=args.memory_per_gpu, guaranteed=args.guaranteed,
                         one_pod_per_node=args.one_pod_per_node, exclusive_topology=args.exclusive_topology)

    def files() -> dict[str, str]:
        monitor_label(opts)
        cfg, text = run_config(args.config, args.overrides, opts)
        return kustomize_tree(cfg, text, opts) if args.kustomize else manifest_files(cfg, text, opts)

    return write_listed("render", files, args.out, args.force)


def storage_cli(args: argparse.Namespace) -> int:
    opts = RenderOptions(nodes=1, gpus_per_node=0, image="-", storage_class=args.storage_class,
                         checkpoint_storage=args.checkpoint_storage, data_storage=args.data_storage,
                         namespace=args.namespace)
    return write_listed("storage", lambda: storage_files(opts, "ganforge k8s storage"), args.out, args.force)


def write_listed(command: str, files, out: str, force: bool) -> int:
    """Write what `files()` makes into `out` and print each path (exit 0); a RenderError is one line (exit 2)."""
    try:
        written = write_tree(files(), out, force)
    except RenderError as e:
        print(f"ganforge: k8s {command}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


# -- the run ------------------------------------------------------------------------------------

def run_config(path: str, overrides: list[str], opts: RenderOptions) -> tuple[Any, str]:
    """The config as the pods will see it (paths on the volumes, metrics on, tracking from the
    env), validated, and the YAML text to embed: the recipe as written plus those settings."""
    from trainer.config import ConfigError, parse_override
    from trainer.families import check_config, load_config

    check_options(opts)
    cfg = load_config(path, overrides)  # ConfigError (exit 2) names the key
    cluster = [f"data.train={opts.data_dir or DATA + '/' + (os.path.basename(cfg.data.train.rstrip('/')) or 'train')}",
               f"run.dir={CHECKPOINTS}/{cfg.run.name}",
               f"log.prometheus_port={cfg.log.prometheus_port or METRICS_PORT}"]
    if opts.mlflow_uri == "none":  # off in the run itself: no sqlite fallback on the shared volume
        cluster.append("log.mlflow_uri=none")
    elif cfg.log.mlflow_uri != "none":
        cluster.append("log.mlflow_uri=")  # MLFLOW_TRACKING_URI of the pod decides
    cfg = load_config(path, [*overrides, *cluster])
    nproc = max(1, opts.gpus_per_node)
    worlds = [n * nproc for n in range(opts.min_nodes or opts.nodes, opts.nodes + 1)]
    for world in worlds:
        try:
            check_config(cfg, world_size=world)
        except ConfigError as e:
            if e.key != "train.batch_size" or len(worlds) == 1:
                raise
            raise RenderError(f"{e}; an elastic job runs with {worlds[0]} to {worlds[-1]} ranks: the smallest "
                              f"global batch that each of them divides is {math.lcm(*worlds)} "
                              f"(train.batch_size={math.lcm(*worlds)}), or narrow --min-nodes..--nodes") from None
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    for text in [*overrides, *cluster]:
        key, value = parse_override(text)
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg, yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def check_options(opts: RenderOptions) -> None:
    if opts.nodes < 1:
        raise RenderError(f"--nodes must be >= 1, got {opts.nodes}")
    if opts.gpus_per_node < 0:
        raise RenderError(f"--gpus-per-node must be >= 0, got {opts.gpus_per_node}")
    if opts.min_nodes is not None and not 1 <= opts.min_nodes <= opts.nodes:
        raise RenderError(f"--min-nodes must be in 1..{opts.nodes}, got {opts.min_nodes}")
    if opts.min_nodes is not None and opts.min_nodes != opts.nodes and opts.flavor != "pytorchjob":
        raise RenderError(f"--min-nodes {opts.min_nodes}: only the pytorchjob flavour resizes a running job")
    if not re.fullmatch(r"[^\s]+", opts.image or ""):
        raise RenderError(f"--image must be an image reference, got {opts.image!r}")
    if opts.shutdown_seconds < 1:
        raise RenderError(f"--shutdown-seconds must be >= 1, got {opts.shutdown_seconds}")
    if opts.flavor not in FLAVORS:
        raise RenderError(f"--flavor must be one of {', '.join(FLAVORS)}, got {opts.flavor!r}")
    node_selector(opts)
    tolerations(opts)
    for flag, value, unit in (("--cpu-per-gpu", opts.cpu_per_gpu, r"(m|)"),
                              ("--memory-per-gpu", opts.memory_per_gpu, r"(Ki|Mi|Gi|Ti|k|M|G|T|)")):
        if not re.fullmatch(rf"\d+(\.\d+)?{unit}", value or ""):
            raise RenderError(f"{flag} must be a Kubernetes quantity (e.g. 6, 500m / 32Gi), got {value!r}")
    if opts.exclusive_topology and opts.flavor != "jobset":
        raise RenderError("--exclusive-topology: only the jobset flavour places a whole Job in one topology domain")
    if opts.exclusive_topology and not LABEL_KEY.fullmatch(opts.exclusive_topology):
        raise RenderError(f"--exclusive-topology must be a node label key, got {opts.exclusive_topology!r}")


def node_selector(opts: RenderOptions) -> dict[str, str]:
    """--node-selector as a dict; a RenderError naming a bad one."""
    out = {}
    for item in opts.node_selector:
        key, sep, value = item.partition("=")
        if not (sep and LABEL_KEY.fullmatch(key) and LABEL_VALUE.fullmatch(value)):
            raise RenderError(f"--node-selector must be KEY=VALUE with a valid label key and value; got {item!r}")
        out[key] = value
    return out


def tolerations(opts: RenderOptions) -> list[dict[str, str]]:
    """The GPU taint's toleration (GPU pods) plus --toleration KEY[=VALUE]:EFFECT."""
    out = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if opts.gpus_per_node else []
    for item in opts.tolerations:
        taint, _, effect = item.rpartition(":")
        key, sep, value = taint.partition("=")
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not LABEL_KEY.fullmatch(key) or (
                sep and not LABEL_VALUE.fullmatch(value)):
            raise RenderError(f"--toleration must be KEY[=VALUE]:EFFECT (NoSchedule, PreferNoSchedule or NoExecute); "
                              f"got {item!r}")
        out.append({"key": key, "operator": "Equal", "value": value, "effect": effect} if sep
                   else {"key": key, "operator": "Exists", "effect": effect})
    return out


def job_name(run_name: str, nodes: int = 1) -> str:
    """A DNS label short enough that the longest pod name of any flavour stays a valid label
    (<= 63): JobSet's `<name>-workers-0-<index>-<5 random>` with `nodes - 1` as the index."""
    budget = 63 - len("-workers-0-") - len(str(max(0, nodes - 1))) - len("-xxxxx") - len("gan-")
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:min(40, budget)].strip("-")
    return f"gan-{slug or 'run'}"


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ganforge", "app.kubernetes.io/instance": name, "ganforge.io/run": name}


def meta(name: str, opts: RenderOptions, **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "labels": labels(extra.pop("run", name))}
    if opts.namespace:
        m["namespace"] = opts.namespace
    return m | extra


# -- objects ------------------------------------------------------------------------------------

def config_map(text: str, name: str, opts: RenderOptions) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{name}-config", opts, run=name),
            "data": {"config.yaml": text}}


def volume_claims(opts: RenderOptions) -> list[dict[str, Any]]:
    """Checkpoints, the shards and MLflow's store, shared by every run and created once: never
    part of a run's manifests, so `kubectl delete -f/-k` on a run cannot take them along."""
    out = []
    for claim, size, mode in (("ganforge-checkpoints", opts.checkpoint_storage, "ReadWriteMany"),
                              ("ganforge-data", opts.data_storage, "ReadWriteMany"),
                              ("mlflow", "20Gi", "ReadWriteOnce")):
        spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": size}}}
        if opts.storage_class:
            spec["storageClassName"] = opts.storage_class
        m = {"name": claim, "labels": {"app.kubernetes.io/name": "ganforge", "app.kubernetes.io/component": "storage"}}
        if opts.namespace:
            m["namespace"] = opts.namespace
        out.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": m, "spec": spec})
    return out


def headless_service(name: str, opts: RenderOptions) -> dict[str, Any]:
    """Gives pod i the DNS name `<job>-i.<service>`; pod 0's is the c10d endpoint."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, opts),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,  # DNS before any readiness
                     "selector": {"ganforge.io/run": name},
                     "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}}


def monitor_label(opts: RenderOptions) -> tuple[str, str]:
    """--monitor-label as (key, value); a RenderError naming it when it is not KEY=VALUE."""
    key, sep, value = opts.monitor_label.partition("=")
    if not (sep and LABEL_KEY.fullmatch(key) and LABEL_VALUE.fullmatch(value)):
        raise RenderError(f"--monitor-label must be KEY=VALUE with a valid Kubernetes label key and value; "
                          f"got {opts.monitor_label!r}")
    return key, value


def pod_monitor(cfg, name: str, opts: RenderOptions) -> dict[str, Any]:
    """Scrapes every local rank's port. honorLabels keeps the exporter's own `job` label (the
    dashboard and alerts group by it) instead of renaming it `exported_job`."""
    endpoints = [{"port": f"metrics-{r}", "path": "/metrics", "interval": "15s", "honorLabels": True}
                 for r in range(max(1, opts.gpus_per_node))]
    m = meta(name, opts)
    key, value = monitor_label(opts)
    m["labels"] = m["labels"] | {key: value}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": m,
            "spec": {"selector": {"matchLabels": {"ganforge.io/run": name}}, "podMetricsEndpoints": endpoints}}


def container(cfg, name: str, opts: RenderOptions, launch_args: list[str], container_name: str = "trainer"
              ) -> dict[str, Any]:
    gpus = opts.gpus_per_node
    nproc = max(1, gpus)
    cpu, memory = (per_gpu(opts.cpu_per_gpu, gpus), per_gpu(opts.memory_per_gpu, gpus)) if gpus else ("2", "8Gi")
    resources: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if opts.guaranteed:
        resources["limits"]["cpu"] = cpu
    if gpus:
        resources["requests"]["nvidia.com/gpu"] = gpus
        resources["limits"]["nvidia.com/gpu"] = gpus
    env = [
        {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "GANFORGE_RDZV_SERVICE", "value": name},
        {"name": "MLFLOW_TRACKING_URI", "value": opts.mlflow_uri},  # "none" disables tracking
        # Pods are scraped on their own address; the NetworkPolicy limits who reaches it.
        {"name": "GANFORGE_METRICS_ADDR", "value": "0.0.0.0"},
        # The root filesystem is read-only: caches and home go to the /tmp volume.
        {"name": "HOME", "value": "/tmp"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    ports = [{"name": "rdzv", "containerPort": RDZV_PORT}]
    ports += [{"name": f"metrics-{r}", "containerPort": cfg.log.prometheus_port + r} for r in range(nproc)]
    return {
        "name": container_name,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        # args, not command: the image's ENTRYPOINT (tini) stays PID 1 and passes SIGTERM on.
        "args": ["ganforge", "launch", "--config", f"{CONFIG_DIR}/config.yaml", "--nproc-per-node", str(nproc),
                    "--max-restarts", str(DEFAULT_MAX_RESTARTS), "--shutdown-timeout", str(opts.shutdown_seconds),
                    *launch_args],
        "env": env,
        "ports": ports,
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "checkpoints", "mountPath": CHECKPOINTS},
            {"name": "data", "mountPath": DATA, "readOnly": True},  # the shards; training never writes them
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},  # NCCL and loader workers need more than 64 MiB
        ],
    }


def per_gpu(quantity: str, gpus: int) -> str:
    """`quantity` times `gpus`, in the quantity's own unit (6 -> 48, 500m -> 4000m, 30Gi -> 240Gi)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(\D*)", quantity).groups()
    total = float(number) * gpus
    return f"{int(total) if total.is_integer() else total}{unit}"


def pod_template(cfg, name: str, opts: RenderOptions, launch_args: list[str], container_name: str = "trainer",
                 restart_policy: str | None = "Never") -> dict[str, Any]:
    spec: dict[str, Any] = {
        # SIGTERM -> the launcher -> torchrun -> workers checkpoint; SIGKILL only after this.
        "terminationGracePeriodSeconds": opts.shutdown_seconds + 30,
        "automountServiceAccountToken": False,  # training needs no access to the Kubernetes API
        # OnRootMismatch: the volumes are chown'ed to fsGroup once, not recursively at every start.
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container(cfg, name, opts, launch_args, container_name)],
        "volumes": [
            {"name": "config", "configMap": {"name": f"{name}-config"}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ganforge-checkpoints"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "ganforge-data"}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi" if opts.gpus_per_node else "1Gi"}},
        ],
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if tol := tolerations(opts):
        spec["tolerations"] = tol
    if selector := node_selector(opts):
        spec["nodeSelector"] = selector
    if opts.one_pod_per_node:
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"ganforge.io/run": name}}, "topologyKey": "kubernetes.io/hostname"}]}}
    return {"metadata": {"labels": labels(name)}, "spec": spec}


def pod_failure_policy(container_name: str) -> dict[str, Any]:
    """Preemption is not a failure; a bad config fails at once; a checkpointed stop, and losing the
    store's host or the peers (every other index exits 75 when node 0 goes), are retried uncounted.
    Anything else (1, an OOM kill's 137) counts against backoffLimitPerIndex."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": container_name, "operator": "In",
                                               "values": [EXIT_CONFIG_ERROR]}},
        {"action": "Ignore", "onExitCodes": {"containerName": container_name, "operator": "In",
                                              "values": RETRYABLE}},
    ]}


def indexed_job_spec(cfg, name: str, opts: RenderOptions, subdomain: str | None) -> dict[str, Any]:
    template = pod_template(cfg, name, opts, ["--nnodes", str(opts.nodes)])
    if subdomain:
        template["spec"]["subdomain"] = subdomain
    return {
        "completionMode": "Indexed",  # JOB_COMPLETION_INDEX = node rank; pod i is `<job>-i`
        "completions": opts.nodes,
        "parallelism": opts.nodes,
        "backoffLimitPerIndex": DEFAULT_MAX_RESTARTS,  # a crashing node is replaced alone
        "maxFailedIndexes": 0,  # training needs every index: one exhausted index fails the job
        # A replacement starts only once the old pod is gone: never two pods for one index.
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": pod_failure_policy("trainer"),
        "template": template,
    }


def indexed_job(cfg, name: str, opts: RenderOptions) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(name, opts),
            "spec": indexed_job_spec(cfg, name, opts, subdomain=name)}


def pytorch_job(cfg, name: str, opts: RenderOptions) -> dict[str, Any]:
    """Kubeflow training operator v1: it sets PET_* (nnodes range, c10d endpoint) for the launcher."""
    lo = opts.min_nodes or opts.nodes
    template = pod_template(cfg, name, opts, [], container_name="pytorch", restart_policy=None)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta(name, opts), "spec": {
        "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": lo, "maxReplicas": opts.nodes,
                          "maxRestarts": DEFAULT_MAX_RESTARTS},
        "nprocPerNode": str(max(1, opts.gpus_per_node)),
        # The operator's backoffLimit counts container restarts of running pods; under
        # restartPolicy ExitCode pods are recreated instead and the count stays 0, so an OOM
        # kill (137) would recreate a pod forever. OnFailure restarts in place, counted: any
        # non-zero exit (75 and 143 too, and a config error's 2) until backoffLimit in total.
        "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": pytorchjob_backoff_limit(opts)},
        "pytorchReplicaSpecs": {"Worker": {
            "replicas": opts.nodes,
            "restartPolicy": "OnFailure",
            "template": template}},
    }}


def pytorchjob_backoff_limit(opts: RenderOptions) -> int:
    """Restarts of all pods together: each pod's share of DEFAULT_MAX_RESTARTS, plus one loss of
    node 0 per share (which restarts every other pod once, exit 75)."""
    return DEFAULT_MAX_RESTARTS * (2 * opts.nodes - 1)


def job_set(cfg, name: str, opts: RenderOptions) -> dict[str, Any]:
    """JobSet: one Indexed Job of `nodes` pods, recreated as a whole when it fails."""
    job_spec = indexed_job_spec(cfg, name, opts, subdomain=None)  # JobSet sets the subdomain
    m = meta(name, opts)
    if opts.exclusive_topology:
        m["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": opts.exclusive_topology}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": m, "spec": {
        "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
        "failurePolicy": {"maxRestarts": 5, "restartStrategy": "Recreate", "rules": [
            # The pod failure policy failed the Job (exit code 2: bad config): restarting cannot help.
            {"name": "ConfigError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
        ]},
        "replicatedJobs": [{"name": "workers", "replicas": 1, "template": {"spec": job_spec}}],
    }}


def mlflow_objects(opts: RenderOptions) -> list[dict[str, Any]]:
    """A small MLflow tracking server: sqlite and artifacts on the `mlflow` volume (of k8s/storage)."""
    name = "mlflow"
    lab = {"app.kubernetes.io/name": "mlflow"}
    m = {"name": name, "labels": lab} | ({"namespace": opts.namespace} if opts.namespace else {})
    server = {
        "name": "mlflow", "image": MLFLOW_IMAGE, "imagePullPolicy": "IfNotPresent",
        "command": ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000",
                    "--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination", "/mlflow/artifacts",
                    "--serve-artifacts",
                    # Host headers the pods and `kubectl port-forward` send (DNS-rebinding guard).
                    "--allowed-hosts", "mlflow,mlflow:5000,mlflow.*,localhost,localhost:5000,127.0.0.1:5000"],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "http", "containerPort": 5000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "store", "mountPath": "/mlflow"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": copy.deepcopy(m), "spec": {
        "replicas": 1, "strategy": {"type": "Recreate"},  # one writer of the sqlite store
        "selector": {"matchLabels": lab},
        "template": {"metadata": {"labels": lab}, "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [server],
            "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": name}},
                        {"name": "tmp", "emptyDir": {}}]}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(m),
               "spec": {"selector": lab, "ports": [{"name": "http", "port": 5000, "targetPort": "http"}]}}
    # MLflow has no authentication (and can delete artifacts): only ganforge's pods reach it.
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": copy.deepcopy(m),
              "spec": {"podSelector": {"matchLabels": lab}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ganforge"}}}],
                                    "ports": [{"protocol": "TCP", "port": 5000}]}]}}
    return [deployment, service, policy]


def network_policy(cfg, name: str, opts: RenderOptions) -> dict[str, Any]:
    """The job's pods accept traffic only from each other (c10d store, gloo/NCCL) and, on the
    /metrics ports alone, from the monitoring namespace."""
    metrics = [{"protocol": "TCP", "port": cfg.log.prometheus_port + r} for r in range(max(1, opts.gpus_per_node))]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(name, opts),
            "spec": {"podSelector": {"matchLabels": {"ganforge.io/run": name}}, "policyTypes": ["Ingress"],
                     "ingress": [
                         {"from": [{"podSelector": {"matchLabels": {"ganforge.io/run": name}}}]},
                         {"from": [{"namespaceSelector": {"matchLabels": {
                             "kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}], "ports": metrics},
                     ]}}


def render(cfg, text: str, opts: RenderOptions) -> list[dict[str, Any]]:
    """Every object of the run, for the chosen flavour; `text` is the config to embed."""
    name = job_name(cfg.run.name, opts.nodes)
    objs = [config_map(text, name, opts)]
    if opts.flavor == "job":
        objs += [headless_service(name, opts), indexed_job(cfg, name, opts)]
    elif opts.flavor == "pytorchjob":
        objs.append(pytorch_job(cfg, name, opts))
    else:
        objs.append(job_set(cfg, name, opts))
    return [*objs, pod_monitor(cfg, name, opts), network_policy(cfg, name, opts)]


# -- files --------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Block style (`|`) for multi-line strings: the embedded config stays readable."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(objs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objs)


def file_name(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def manifest_files(cfg, text: str, opts: RenderOptions) -> dict[str, str]:
    """{relative path: text}: one object per file, for `kubectl apply -f DIR`."""
    return {f"{i:02d}-{file_name(o)}": to_yaml([o]) for i, o in enumerate(render(cfg, text, opts))}


def kustomization(resources: list[str], patches: list[dict[str, Any]] | None = None,
                  command: str = "ganforge k8s render --kustomize") -> str:
    doc: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                           "resources": resources}
    if patches:
        doc["patches"] = patches
    head = f"# Written by `{command}`; re-render rather than edit.\n"
    return head + yaml.dump(doc, Dumper=_Dumper, sort_keys=False)


def delete_patch(kind: str, api: str, name: str) -> dict[str, Any]:
    return {"patch": yaml.safe_dump({"$patch": "delete", "apiVersion": api, "kind": kind,
                                     "metadata": {"name": name}}, sort_keys=False)}


def storage_files(opts: RenderOptions, command: str = "ganforge k8s render --kustomize") -> dict[str, str]:
    """The volumes as a kustomization of their own: applied once, deleted by no run."""
    claims = volume_claims(opts)
    files = {file_name(o): to_yaml([o]) for o in claims}
    files["kustomization.yaml"] = kustomization([file_name(o) for o in claims], command=command)
    return files


def kustomize_tree(cfg, text: str, opts: RenderOptions) -> dict[str, str]:
    """base/ = the Indexed Job flavour; overlays swap the Job (and its Service) for a PyTorchJob or JobSet;
    storage/ holds the volumes, apart from every run."""
    name = job_name(cfg.run.name, opts.nodes)
    files: dict[str, str] = {}
    base = render(cfg, text, RenderOptions(**{**opts.__dict__, "flavor": "job", "min_nodes": None}))
    for o in base:
        files[f"base/{file_name(o)}"] = to_yaml([o])
    files["base/kustomization.yaml"] = kustomization([file_name(o) for o in base])
    drop = [delete_patch("Job", "batch/v1", name), delete_patch("Service", "v1", name)]
    for flavor, build in (("pytorchjob", pytorch_job), ("jobset", job_set)):
        obj = build(cfg, name, RenderOptions(**{**opts.__dict__, "flavor": flavor}))
        files[f"overlays/{flavor}/{file_name(obj)}"] = to_yaml([obj])
        files[f"overlays/{flavor}/kustomization.yaml"] = kustomization(["../../base", file_name(obj)], drop)
    server = mlflow_objects(opts)
    for o in server:
        files[f"mlflow/{file_name(o)}"] = to_yaml([o])
    files["mlflow/kustomization.yaml"] = kustomization([file_name(o) for o in server])
    files |= {f"storage/{rel}": text for rel, text in storage_files(opts).items()}
    return files


def write_tree(files: dict[str, str], out: str, force: bool) -> list[str]:
    """Write all files or none: into a sibling temp dir, then swapped in place of `out`."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RenderError(f"--out {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise RenderError(f"--out {out} is not empty; pass --force to replace its contents")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".k8s-render-", dir=parent)
    try:
        for rel, text in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        old = None
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=".k8s-old-", dir=parent)
            os.rename(out, os.path.join(old, "out"))
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out, rel) for rel in sorted(files)]
