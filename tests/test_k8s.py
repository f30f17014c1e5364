"""`ganforge k8s render` and k8s/: valid objects, and the fields that decide what preemption does.

Core kinds are checked offline with `kubernetes-validate --strict`; the kustomize tree with
the real `kubectl kustomize`. PyTorchJob, JobSet and PodMonitor are validated against their
published CRD schemas in tests/test_crd_schemas.py; here their pod and job templates are also
validated as core objects.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import BIN, REPO, run_cli

RECIPE = "configs/dcgan_digits.yaml"
IMAGE = "ghcr.io/example/ganforge:1"
CORE = {"ConfigMap", "PersistentVolumeClaim", "Service", "Job", "Deployment", "PodTemplate", "NetworkPolicy"}
KUSTOMIZATIONS = ["base", "overlays/pytorchjob", "overlays/jobset", "mlflow", "storage"]
# Missing kubectl is a failure in CI (.ci/run sets CI=true), a skip elsewhere.
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None and os.environ.get("CI", "").lower() != "true",
                                   reason="kubectl is not installed")


def render(out, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("k8s", "render", "--config", RECIPE, "--nodes", "4", "--gpus-per-node", "8", "--image", IMAGE,
                   "--out", str(out), *extra, timeout=120)


def load_dir(path) -> list[dict]:
    return [o for f in sorted(os.listdir(path)) if f.endswith(".yaml") and f != "kustomization.yaml"
            for o in yaml.safe_load_all(open(os.path.join(path, f))) if o]


def validate_strict(objs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    """kubernetes-validate --strict on these objects (unknown fields are errors)."""
    path = tmp_path / f"objs-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump_all(objs))
    return subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", str(path)],
                          capture_output=True, text=True, timeout=120)


def by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("render") / "manifests"
    r = render(out)
    assert r.returncode == 0, r.stderr
    return load_dir(out)


def test_rendered_core_kinds_pass_strict_validation(rendered, tmp_path):
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == ["ConfigMap", "Job", "NetworkPolicy", "PodMonitor", "Service"]
    r = validate_strict([o for o in rendered if o["kind"] in CORE], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 4


def test_indexed_job_survives_preemption_and_fails_fast_on_a_bad_config(rendered):
    job = by_kind(rendered)["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 4
    assert job["backoffLimitPerIndex"] >= 1 and job["podReplacementPolicy"] == "Failed"
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and fail[0]["onExitCodes"]["operator"] == "In" and fail[0]["onExitCodes"]["values"] == [2]
    assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [75, 143] for r in rules)
    pod = job["template"]["spec"]
    c = pod["containers"][0]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    timeout = int(c["args"][c["args"].index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > timeout > 0, "SIGKILL must come after the checkpoint"
    assert c["args"][:2] == ["ganforge", "launch"] and "command" not in c, "the image's init must stay PID 1"
    assert pod["subdomain"] == by_kind(rendered)["Service"]["metadata"]["name"]


def test_pods_are_unprivileged_gpu_pods_with_tracking_and_metrics(rendered, tmp_path):
    objs = by_kind(rendered)
    pod = objs["Job"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert {"/tmp", "/checkpoints", "/dev/shm"} <= writable and "/data" not in writable  # shards: read only
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no recursive chown per start
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"ganforge-checkpoints", "ganforge-data"}  # created once by `k8s storage`
    # Every local rank's /metrics port is a named container port the PodMonitor scrapes.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    scraped = [e["port"] for e in objs["PodMonitor"]["spec"]["podMetricsEndpoints"]]
    assert sorted(scraped) == sorted(f"metrics-{r}" for r in range(8)) and set(scraped) <= set(ports)
    # ... keeping the exporter's `job` label, and selected by kube-prometheus-stack's default selector
    assert all(e["honorLabels"] is True for e in objs["PodMonitor"]["spec"]["podMetricsEndpoints"])
    assert objs["PodMonitor"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    from trainer.families import load_config

    path = tmp_path / "config.yaml"
    path.write_text(objs["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(str(path))
    assert ports["metrics-0"] == cfg.log.prometheus_port and cfg.run.dir.startswith("/checkpoints/")
    assert cfg.data.train.startswith("/data/") and cfg.log.mlflow_uri == ""


def test_launcher_in_a_rendered_pod_meets_pod_0_through_the_service(rendered, digits_dir, tmp_path):
    """The pod's own variables (as the Job controller and downward API fill them) drive the launcher."""
    objs = by_kind(rendered)
    c = objs["Job"]["spec"]["template"]["spec"]["containers"][0]
    job_name = objs["Job"]["metadata"]["name"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env |= {"JOB_COMPLETION_INDEX": "0", "JOB_NAME": job_name}
    config = tmp_path / "config.yaml"
    config.write_text(objs["ConfigMap"]["data"]["config.yaml"])
    args = c["args"][2:]
    args[args.index("--config") + 1] = str(config)
    r = run_cli("launch", *args, "--dry-run", f"data.train={digits_dir}", "run.dir=" + str(tmp_path / "r"),
                env={k: v for k, v in env.items() if k != "HOME"}, timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[1]
    assert f"--rdzv-endpoint {job_name}-0.{objs['Service']['metadata']['name']}:29400" in line
    assert "--nnodes 4" in line and "--nproc-per-node 8" in line and "--rdzv-conf is_host=1" in line


def test_render_writes_nothing_over_existing_output_or_for_a_bad_config(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.yaml").write_text("mine\n")
    r = render(out)
    assert r.returncode == 2 and "--force" in r.stderr and (out / "keep.yaml").read_text() == "mine\n"
    fresh = tmp_path / "fresh"
    r = render(fresh, "train.batch_size=12")  # 4 nodes x 8 GPUs do not divide 12
    assert r.returncode == 2 and "train.batch_size" in r.stderr and not fresh.exists()
    r = render(fresh, "--monitor-label", "release")
    assert r.returncode == 2 and "--monitor-label" in r.stderr and not fresh.exists()
    r = render(fresh, "--min-nodes", "2")
    assert r.returncode == 2 and "pytorchjob" in r.stderr and not fresh.exists()
    r = render(out, "--force", "--flavor", "jobset")
    assert r.returncode == 0 and not (out / "keep.yaml").exists()
    assert "JobSet" in {o["kind"] for o in load_dir(out)}


def test_the_podmonitor_carries_the_label_your_prometheus_selects(tmp_path):
    r = render(tmp_path / "out", "--monitor-label", "prometheus=main")
    assert r.returncode == 0, r.stderr
    labels = by_kind(load_dir(tmp_path / "out"))["PodMonitor"]["metadata"]["labels"]
    assert labels["prometheus"] == "main" and "release" not in labels


def test_committed_k8s_tree_is_what_render_writes(tmp_path):
    out = tmp_path / "k8s"
    r = render(out, "--kustomize")
    assert r.returncode == 0, r.stderr
    committed = os.path.join(REPO, "k8s")
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert files == sorted(os.path.relpath(os.path.join(d, f), committed)
                           for d, _, fs in os.walk(committed) for f in fs)
    for rel in files:
        assert (out / rel).read_text() == open(os.path.join(committed, rel)).read(), \
            f"k8s/{rel} differs from the renderer: re-run the command in docs/kubernetes.md"


@needs_kubectl
def test_every_kustomization_builds_and_its_core_kinds_validate(tmp_path):
    built = {}
    for k in KUSTOMIZATIONS:
        r = subprocess.run(["kubectl", "kustomize", os.path.join(REPO, "k8s", k)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, f"{k}: {r.stderr}"
        built[k] = [o for o in yaml.safe_load_all(r.stdout) if o]
    kinds = {k: sorted({o["kind"] for o in objs}) for k, objs in built.items()}
    assert kinds["base"] == ["ConfigMap", "Job", "NetworkPolicy", "PodMonitor", "Service"]
    assert kinds["overlays/pytorchjob"] == ["ConfigMap", "NetworkPolicy", "PodMonitor", "PyTorchJob"]
    assert kinds["overlays/jobset"] == ["ConfigMap", "JobSet", "NetworkPolicy", "PodMonitor"]
    assert kinds["mlflow"] == ["Deployment", "NetworkPolicy", "Service"]
    assert kinds["storage"] == ["PersistentVolumeClaim"]
    core = [o for objs in built.values() for o in objs if o["kind"] in CORE]
    r = validate_strict(core, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    # The custom resources' templates, validated as the core objects they become.
    pj = by_kind(built["overlays/pytorchjob"])["PyTorchJob"]["spec"]
    js = by_kind(built["overlays/jobset"])["JobSet"]["spec"]
    worker = pj["pytorchReplicaSpecs"]["Worker"]
    job_template = js["replicatedJobs"][0]["template"]
    wrapped = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "worker"}, "template": worker["template"]},
               {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "workers"}, "spec": job_template["spec"]}]
    r = validate_strict(wrapped, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    # Elastic PyTorchJob: c10d, a node range, and restarts the operator counts (bounded).
    assert pj["elasticPolicy"]["rdzvBackend"] == "c10d" and worker["replicas"] == pj["elasticPolicy"]["maxReplicas"] == 4
    assert worker["restartPolicy"] == "OnFailure" and worker["template"]["spec"]["containers"][0]["name"] == "pytorch"
    # JobSet: the same Indexed Job; a config error (FailJob by the pod failure policy) ends the JobSet.
    assert job_template["spec"]["completionMode"] == "Indexed" and job_template["spec"]["completions"] == 4
    assert js["failurePolicy"]["maxRestarts"] > 0
    assert js["failurePolicy"]["rules"][0]["action"] == "FailJobSet"
    assert js["failurePolicy"]["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]


def test_pods_admit_only_their_peers_and_monitoring_on_the_metrics_ports(rendered):
    objs = by_kind(rendered)
    pod = objs["Job"]["spec"]["template"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    policy = objs["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= pod["metadata"]["labels"].items()
    peers, monitoring = policy["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": selected}}]}  # c10d store, gloo/NCCL: peers only
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    metrics = sorted(p["containerPort"] for p in pod["spec"]["containers"][0]["ports"] if p["name"].startswith("metrics"))
    assert sorted(p["port"] for p in monitoring["ports"]) == metrics and len(metrics) == 8
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["GANFORGE_METRICS_ADDR"] == "0.0.0.0"  # scraped on the pod's address, behind the policy


def test_mlflow_server_admits_only_ganforge_pods():
    from launcher.k8s import RenderOptions, mlflow_objects

    objs = by_kind(mlflow_objects(RenderOptions(nodes=1, gpus_per_node=1, image="x")))
    assert objs["Deployment"]["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    rule, = objs["NetworkPolicy"]["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ganforge"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]


def test_mlflow_uri_none_turns_tracking_off_in_the_run_itself(tmp_path):
    out = tmp_path / "m"
    r = render(out, "--mlflow-uri", "none")
    assert r.returncode == 0, r.stderr
    objs = by_kind(load_dir(out))
    from trainer.families import load_config
    from trainer.telemetry.mlflow import resolve_tracking_uri

    path = tmp_path / "config.yaml"
    path.write_text(objs["ConfigMap"]["data"]["config.yaml"])
    cfg = load_config(str(path))
    env = {e["name"]: e.get("value") for e in objs["Job"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert cfg.log.mlflow_uri == "none" and env["MLFLOW_TRACKING_URI"] == "none"
    assert resolve_tracking_uri(cfg.log.mlflow_uri, cfg.run.dir) is None  # no sqlite file on the shared volume


@pytest.mark.parametrize("flavor", ["job", "pytorchjob", "jobset"])
def test_deleting_a_rendered_run_never_deletes_a_volume(flavor, tmp_path):
    """`kubectl delete -f <out>` / `-k k8s/base|overlays/*|mlflow` must not touch the PVCs."""
    r = render(tmp_path / "out", "--flavor", flavor)
    assert r.returncode == 0, r.stderr
    assert not [o for o in load_dir(tmp_path / "out") if o["kind"] == "PersistentVolumeClaim"]
    for k in ["base", "overlays/pytorchjob", "overlays/jobset", "mlflow"]:
        assert not [f for f in os.listdir(os.path.join(REPO, "k8s", k)) if f.startswith("persistentvolumeclaim")]


def test_storage_is_its_own_one_time_component(tmp_path):
    r = run_cli("k8s", "storage", "--out", str(tmp_path / "s"), "--storage-class", "nfs", "--namespace", "gan",
                timeout=120)
    assert r.returncode == 0, r.stderr
    claims = {o["metadata"]["name"]: o for o in load_dir(tmp_path / "s")}
    assert set(claims) == {"ganforge-checkpoints", "ganforge-data", "mlflow"}
    assert all(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["namespace"] == "gan" for o in claims.values())
    assert claims["ganforge-checkpoints"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["ganforge-data"]["spec"]["storageClassName"] == "nfs"
    assert (tmp_path / "s" / "kustomization.yaml").exists()
    r = validate_strict(list(claims.values()), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def exit_outcome(flavor: str, spec: dict, code: int) -> str:
    """What the controller does when a trainer container exits with `code`, read from the rendered
    policies as the controllers apply them: "retry" (not counted), "counted" (retried until a
    bound), "fail" (the job fails at once)."""
    if flavor == "pytorchjob":
        # training-operator >= 1.8: OnFailure restarts any non-zero exit in place and counts
        # container restarts against runPolicy.backoffLimit; ExitCode would count none.
        assert spec["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
        assert spec["runPolicy"]["backoffLimit"] > 0
        return "counted"
    job = spec["replicatedJobs"][0]["template"]["spec"] if flavor == "jobset" else spec
    for rule in job["podFailurePolicy"]["rules"]:  # first match decides (Job >= 1.26)
        codes = rule.get("onExitCodes")
        if codes and (code in codes["values"]) == (codes["operator"] == "In"):
            if rule["action"] == "FailJob" and flavor == "jobset":
                reasons = [r for r in spec["failurePolicy"]["rules"] if r["action"] == "FailJobSet"]
                assert any("PodFailurePolicy" in r["onJobFailureReasons"] for r in reasons)
            return {"Ignore": "retry", "FailJob": "fail", "Count": "counted"}[rule["action"]]
    assert job["backoffLimitPerIndex"] > 0 and job["maxFailedIndexes"] == 0
    return "counted"


@pytest.mark.parametrize("flavor", ["job", "pytorchjob", "jobset"])
def test_preemption_and_a_lost_store_are_retried_and_restarts_are_bounded(flavor, tmp_path):
    from launcher.launch import EXIT_STORE_LOST

    r = render(tmp_path / "out", "--flavor", flavor)
    assert r.returncode == 0, r.stderr
    kind = {"job": "Job", "pytorchjob": "PyTorchJob", "jobset": "JobSet"}[flavor]
    spec = by_kind(load_dir(tmp_path / "out"))[kind]["spec"]
    assert exit_outcome(flavor, spec, 143) in ("retry", "counted")
    assert exit_outcome(flavor, spec, EXIT_STORE_LOST) in ("retry", "counted")
    assert exit_outcome(flavor, spec, 137) == "counted"  # an OOM kill: bounded, never forever
    assert exit_outcome(flavor, spec, 1) == "counted"
    if flavor == "pytorchjob":
        # The operator has one counter for everything: a config error is retried in place until
        # backoffLimit; the budget lets every pod crash DEFAULT_MAX_RESTARTS times and node 0 be
        # lost as often (each loss restarts the other 3 pods once).
        assert spec["runPolicy"]["backoffLimit"] >= 3 * (4 + 3)
        assert exit_outcome(flavor, spec, 2) == "counted"
    else:
        assert exit_outcome(flavor, spec, 143) == exit_outcome(flavor, spec, EXIT_STORE_LOST) == "retry"
        assert exit_outcome(flavor, spec, 2) == "fail"
    if flavor == "jobset":
        assert 0 < spec["failurePolicy"]["maxRestarts"] <= 10


def test_restart_loop_alerts_pass_their_promtool_unit_tests():
    from tests.test_observability import binary

    promtool = binary("promtool")  # missing: a failure in CI, a skip elsewhere
    folder = os.path.join(REPO, "deploy", "prometheus")
    check = subprocess.run([promtool, "check", "rules", "k8s-alerts.yml"], capture_output=True, text=True, cwd=folder)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "k8s-alerts_test.yml"], capture_output=True, text=True,
                          cwd=folder, timeout=120)
    assert test.returncode == 0, test.stdout + test.stderr
    rules = {r["alert"] for g in yaml.safe_load(open(os.path.join(folder, "k8s-alerts.yml")))["groups"]
             for r in g["rules"]}
    tested = set(re.findall(r"alertname: (\w+)", open(os.path.join(folder, "k8s-alerts_test.yml")).read()))
    assert rules == tested == {"GanforgeRestartLoop", "GanforgeContainerRestartLoop", "GanforgeJobPodsFailing"}


def test_the_docs_elastic_example_renders_as_written(tmp_path):
    import shlex

    text = open(os.path.join(REPO, "docs", "kubernetes.md")).read()
    block = re.search(r"```bash\n\s*(ganforge k8s render [^`]*--min-nodes[^`]*?)\n\s*```", text)
    assert block, "docs/kubernetes.md has no elastic render example"
    args = shlex.split(block.group(1).replace("\\\n", " "))
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "elastic")
    r = run_cli(*args[1:], timeout=120)
    assert r.returncode == 0, r.stderr
    spec = by_kind(load_dir(tmp_path / "elastic"))["PyTorchJob"]["spec"]
    assert spec["elasticPolicy"]["minReplicas"] == 2 and spec["elasticPolicy"]["maxReplicas"] == 8
    # Without a batch for the whole range it exits 2 naming the batch that works.
    r = run_cli(*args[1:out], "--out", str(tmp_path / "bad"), timeout=120)
    assert r.returncode == 2 and "train.batch_size=840" in r.stderr and not (tmp_path / "bad").exists()


def test_render_help_names_the_version_floors():
    r = run_cli("k8s", "render", "--help", timeout=60)
    assert r.returncode == 0
    for floor in ("Kubernetes >= 1.29", "training-operator >= v1.8.0", "JobSet >= v0.7.0"):
        assert floor in r.stdout


def test_scheduling_options_reach_the_pod_and_validate(tmp_path):
    r = render(tmp_path / "out", "--flavor", "jobset", "--node-selector", "pool=a100", "--node-selector",
               "topology.kubernetes.io/zone=z1", "--toleration", "dedicated=training:NoSchedule",
               "--toleration", "spot:NoExecute", "--cpu-per-gpu", "4", "--memory-per-gpu", "30Gi", "--guaranteed",
               "--one-pod-per-node", "--exclusive-topology", "cloud.google.com/gke-nodepool")
    assert r.returncode == 0, r.stderr
    js = by_kind(load_dir(tmp_path / "out"))["JobSet"]
    assert js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
        "cloud.google.com/gke-nodepool"
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100", "topology.kubernetes.io/zone": "z1"}
    assert {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "spot", "operator": "Exists", "effect": "NoExecute"} in pod["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    res = pod["containers"][0]["resources"]
    assert res["requests"] == {"cpu": "32", "memory": "240Gi", "nvidia.com/gpu": 8}
    assert res["limits"] == res["requests"], "Guaranteed QoS: limits equal requests"
    anti, = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"].items() <= job["template"]["metadata"]["labels"].items()
    r = validate_strict([{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "workers"}, "spec": job}],
                        tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for bad in (["--toleration", "spot"], ["--node-selector", "pool"], ["--memory-per-gpu", "lots"],
                ["--exclusive-topology", "pool"]):  # the last: not a jobset
        r = render(tmp_path / "bad", *bad)
        assert r.returncode == 2 and bad[0] in r.stderr and not (tmp_path / "bad").exists(), (bad, r.stderr)


@pytest.mark.parametrize("nodes", [4, 101, 1000])
def test_pod_names_stay_valid_labels_for_long_run_names_and_many_nodes(nodes):
    from launcher.k8s import job_name

    name = job_name("a-very-long-run-name-that-goes-on-and-on-and-on-and-on-x" * 2, nodes)
    longest = [f"{name}-workers-0-{nodes - 1}-abcde",  # JobSet pod (hostname without the suffix)
               f"{name}-{nodes - 1}-abcde",  # Indexed Job pod
               f"{name}-worker-{nodes - 1}"]  # PyTorchJob pod
    label = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
    assert all(label.fullmatch(n) for n in longest), [(n, len(n)) for n in longest]
    assert job_name("dcgan_digits", nodes) == "gan-dcgan-digits"
