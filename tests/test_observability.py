"""Observability: the per-rank exporter, alert rules, the deploy/ stack's consistency, a real
Prometheus scraping a 2-process run, and `ganforge runs compare` on real MLflow runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.conftest import BIN, REPO, free_port, run_cli

DEPLOY = os.path.join(REPO, "deploy")
ALERTS = os.path.join(DEPLOY, "prometheus", "alerts.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "dashboards", "ganforge.json")
RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16"]
METRIC = re.compile(r"\bganforge_[a-z_]+")


def binary(name: str) -> str:
    """Path of a Prometheus binary; missing is a failure in CI (deploy/install-prometheus.sh installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed; .ci/run installs it with deploy/install-prometheus.sh")
        pytest.skip(f"{name} not on PATH (run deploy/install-prometheus.sh)")
    return path


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def free_port_pair() -> int:
    """A port P with P and P + 1 both free on 127.0.0.1 (ranks 0 and 1 of one node)."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry: its families plus the histogram suffixes."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.fixture()
def exporter():
    import torch

    from trainer.telemetry.prometheus import PrometheusExporter

    e = PrometheusExporter(free_port(), rank=1, job="digits", world_size=2, device=torch.device("cpu"),
                           node="node-a", build={"version": "0.1.0", "commit": "abc"}, addr="127.0.0.1")
    assert e.enabled
    yield e
    e.close()


def exercise(e) -> None:
    """What a rank reports over two steps with one log step and one checkpoint."""
    import torch

    e.step_done(1, 0.2, 8, 0.05)
    e.step_done(2, 0.3, 8, 0.1)
    e.report({"loss/d": 0.7, "loss/g": 1.5, "loss/gp": 0.01, "d/real": 0.4, "d/fake": -0.3,
              "lr/g": 2e-4, "lr/d": 1e-3, "grad_norm/g": 3.0}, 1, torch.device("cpu"), 0)
    e.checkpoint_saved(1.5, 1_700_000_000.0)
    e.restarted(1)
    e.evaluated({"eval/fid": 12.5, "eval/kid": 0.03}, "digits", 2)


def test_exporter_output_passes_promtool_and_carries_only_rank_node_job_labels(exporter):
    from prometheus_client.parser import text_string_to_metric_families

    exercise(exporter)
    text = http_get(f"http://127.0.0.1:{exporter.port}/metrics")
    check = subprocess.run([binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("ganforge_")}
    base = (("job", "digits"), ("node", "node-a"), ("rank", "1"))
    allowed_extra = {"network", "term", "input", "le", "version", "commit", "metric", "features"}
    for name, labels in samples:
        keys = {k for k, _ in labels}
        assert {"rank", "node", "job"} <= keys and keys - {"rank", "node", "job"} <= allowed_extra, (name, labels)
    assert samples[("ganforge_steps_total", base)] == 2
    fid = tuple(sorted((*base, ("metric", "fid"), ("features", "digits"))))
    assert samples[("ganforge_eval", fid)] == 12.5 and samples[("ganforge_eval_step", base)] == 2
    assert samples[("ganforge_step", base)] == 2
    assert samples[("ganforge_images_total", base)] == 16
    assert samples[("ganforge_data_wait_seconds_total", base)] == pytest.approx(0.15)
    assert samples[("ganforge_step_seconds_count", base)] == 2
    assert samples[("ganforge_step_seconds_sum", base)] == pytest.approx(0.5)
    assert samples[("ganforge_loss", tuple(sorted(base + (("network", "D"), ("term", "gp")))))] == 0.01
    assert samples[("ganforge_loss", tuple(sorted(base + (("network", "G"), ("term", "adversarial")))))] == 1.5
    assert samples[("ganforge_learning_rate", tuple(sorted(base + (("network", "D"),))))] == 1e-3
    assert samples[("ganforge_nonfinite_steps_total", base)] == 1
    assert samples[("ganforge_last_checkpoint_timestamp_seconds", base)] == 1_700_000_000.0
    assert samples[("ganforge_checkpoint_seconds_count", base)] == 1
    assert samples[("ganforge_restarts_total", base)] == 1
    assert samples[("ganforge_world_size", base)] == 2
    assert samples[("ganforge_device_memory_bytes", base)] > 0
    assert samples[("ganforge_build_info", tuple(sorted(base + (("commit", "abc"), ("version", "0.1.0")))))] == 1


def test_nonfinite_total_counts_each_reported_step_once(exporter):
    import torch

    for running_total in (0, 2, 2, 3):  # the loop reports a running total at every log step
        exporter.report({}, running_total, torch.device("cpu"), 0)
    text = http_get(f"http://127.0.0.1:{exporter.port}/metrics")
    assert re.search(r"^ganforge_nonfinite_steps_total\{.*\} 3\.0$", text, re.M)


def test_port_in_use_gives_one_warning_and_a_silent_exporter(caplog):
    from trainer.telemetry.prometheus import PrometheusExporter

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        e = PrometheusExporter(port, rank=0, job="j", world_size=1, addr="127.0.0.1")
        exercise(e)  # every training-side call still returns normally
        e.close()
    err = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "training continues" in err[0]
    assert not e.enabled


def test_exporter_is_disabled_when_the_port_is_zero():
    import torch

    from trainer.distributed import DistEnv
    from trainer.telemetry.prometheus import PrometheusExporter

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert PrometheusExporter.for_rank(0, env, "j", {}) is None


def test_alert_rules_pass_their_promtool_unit_tests():
    promtool = binary("promtool")
    check = subprocess.run([promtool, "check", "rules", ALERTS], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "5 rules found" in check.stdout
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                          cwd=os.path.join(DEPLOY, "prometheus"))
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr
    tested = set(re.findall(r"alertname: (\w+)", open(os.path.join(DEPLOY, "prometheus", "alerts_test.yml")).read()))
    defined = {r["alert"] for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"]}
    assert defined == tested == {"GanforgeTrainingStalled", "GanforgeNonFiniteSteps", "GanforgeCheckpointTooOld",
                                 "GanforgeDataBound", "GanforgeRankMissing"}


def test_prometheus_config_is_valid_and_keeps_the_exporters_job_label():
    check = subprocess.run([binary("promtool"), "check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    cfg = yaml.safe_load(open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")))
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ganforge")
    assert job["honor_labels"] is True  # `job` = run name, as the alerts and dashboard expect
    ports = sorted(int(t.rsplit(":", 1)[1]) for sc in job["static_configs"] for t in sc["targets"])
    assert ports == list(range(9400, 9408))


def dashboard_exprs() -> list[str]:
    dash = json.load(open(DASHBOARD))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]]
    return exprs


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"]]


def test_dashboard_alerts_and_alert_tests_use_only_metrics_the_exporter_exports(exporter):
    exercise(exporter)
    exported = exported_names(http_get(f"http://127.0.0.1:{exporter.port}/metrics"))
    alert_tests = open(os.path.join(DEPLOY, "prometheus", "alerts_test.yml")).read()
    for where, texts in (("dashboard", dashboard_exprs()), ("alerts.yml", alert_exprs()),
                         ("alerts_test.yml", [alert_tests])):
        used = {m for text in texts for m in METRIC.findall(text)}
        assert used, f"{where} uses no ganforge metric"
        assert used <= exported, f"{where} uses metrics the exporter does not export: {sorted(used - exported)}"
    # The dashboard covers what the stack promises to show.
    used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert {"ganforge_images_total", "ganforge_loss", "ganforge_data_wait_seconds_total",
            "ganforge_last_checkpoint_timestamp_seconds", "ganforge_step_seconds_bucket"} <= used


def test_compose_stack_files_fit_together():
    compose = yaml.safe_load(open(os.path.join(DEPLOY, "compose.yaml")))
    services = compose["services"]
    assert {"trainer", "mlflow", "prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert os.path.exists(os.path.join(DEPLOY, src)), f"compose.yaml: {name} mounts missing {src}"
    trainer_cmd = " ".join(services["trainer"]["command"])
    assert "log.prometheus_port=9400" in trainer_cmd
    assert services["trainer"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "server" in services["mlflow"]["command"]
    datasource = yaml.safe_load(open(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml")))
    uids = {d["uid"] for d in datasource["datasources"]}
    dash = json.load(open(DASHBOARD))
    used_uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]}
    assert used_uids <= uids
    provider = yaml.safe_load(open(os.path.join(DEPLOY, "grafana", "provisioning", "dashboards", "ganforge.yml")))
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"] if v.startswith("./grafana/dashboards")}
    assert provider["providers"][0]["options"]["path"] in mounted


def start_prometheus(tmp_path, targets: list[str]) -> tuple[subprocess.Popen, str]:
    """A real Prometheus on 127.0.0.1 scraping `targets` every second, with the project's alert rules."""
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [ALERTS],
              "scrape_configs": [{"job_name": "ganforge", "honor_labels": True,
                                  "static_configs": [{"targets": targets}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def query(base: str, expr: str) -> dict:
    return json.loads(http_get(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}"))


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 60) -> None:
    """Signal the process group we started; kill it if it outlives `wait` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_real_prometheus_scrapes_both_ranks_of_a_two_process_run(digits_dir, tmp_path):
    promtool = binary("promtool")
    base_port = free_port_pair()
    prom, prom_url = start_prometheus(tmp_path, [f"127.0.0.1:{base_port}", f"127.0.0.1:{base_port + 1}"])
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "trainer/main.py", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={tmp_path}/run",
           "run.name=scraped", *TINY, "log.mlflow_uri=none", f"log.prometheus_port={base_port}",
           "train.max_steps=100000", "train.max_minutes=4", "checkpoint.every_steps=20", "log.every_steps=10",
           "eval.every_steps=20", "eval.n=128", "eval.metrics=fid"]  # for the evaluation panel
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", GANFORGE_METRICS_ADDR="127.0.0.1")
    train = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp_path / "train.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ranks: dict[str, float] = {}
        deadline = time.monotonic() + 150  # bounds the test; nothing is asserted about the time
        while time.monotonic() < deadline and train.poll() is None and prom.poll() is None:
            try:
                result = query(prom_url, 'ganforge_steps_total{job="scraped"}')["data"]["result"]
                ranks = {r["metric"]["rank"]: float(r["value"][1]) for r in result}
            except OSError:
                pass  # Prometheus still starting
            if set(ranks) == {"0", "1"} and min(ranks.values()) > 0:
                break
            time.sleep(1)
        log = (tmp_path / "train.log").read_text()[-3000:] + (tmp_path / "prometheus.log").read_text()[-2000:]
        assert set(ranks) == {"0", "1"} and min(ranks.values()) > 0, f"Prometheus saw {ranks}\n{log}"

        # Each rank's own endpoint, as `curl 127.0.0.1:PORT/metrics` shows it, passes promtool.
        for port in (base_port, base_port + 1):
            text = http_get(f"http://127.0.0.1:{port}/metrics")
            assert "ganforge_steps_total{" in text
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
        world = query(prom_url, 'ganforge_world_size{job="scraped"}')["data"]["result"]
        assert sorted((r["metric"]["rank"], r["value"][1]) for r in world) == [("0", "2"), ("1", "2")]

        # Every dashboard query is valid PromQL for this Prometheus and returns data: a panel that
        # is empty on a running job is a broken panel. Rates need a few scrapes, so poll a while.
        exprs = {e: e.replace("$job", ".*").replace("$__rate_interval", "30s") for e in dashboard_exprs()
                 if not e.startswith("label_values(")}  # label_values: a Grafana function, not PromQL
        empty: dict[str, object] = dict.fromkeys(exprs)
        deadline = time.monotonic() + 90
        while empty and time.monotonic() < deadline and train.poll() is None:
            for expr in list(empty):
                answer = query(prom_url, exprs[expr])
                assert answer["status"] == "success", (expr, answer)
                values = [float(r["value"][1]) for r in answer["data"]["result"]]
                if values and all(math.isfinite(v) for v in values):
                    del empty[expr]
                else:
                    empty[expr] = answer["data"]["result"]
            time.sleep(2)
        assert not empty, f"dashboard queries with no (finite) data on a running job: {empty}"
        rules = json.loads(http_get(f"{prom_url}/api/v1/rules"))["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == 5, "the alert rules load in a real Prometheus"
    finally:
        stop(train, signal.SIGTERM)
        stop(prom, signal.SIGTERM, wait=20)


def train_run(tmp_path, digits_dir, name: str, lr_d: str) -> subprocess.Popen:
    args = [os.path.join(BIN, "ganforge"), "train", "--config", RECIPE, f"data.train={digits_dir}",
            f"run.dir={tmp_path / 'runs' / name}", f"run.name={name}", *TINY, f"train.lr_d={lr_d}",
            "train.max_steps=24", "log.every_steps=4", "checkpoint.every_steps=100", "log.sample_every_steps=100"]
    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_runs_compare_shows_the_differing_lr_d_final_losses_and_a_plot(digits_dir, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    procs = [train_run(tmp_path, digits_dir, "lr_low", "0.0002"), train_run(tmp_path, digits_dir, "lr_high", "0.001")]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"

    r = run_cli("runs", "list", "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "lr_low" in r.stdout and "lr_high" in r.stdout and r.stdout.count("FINISHED") == 2

    plot = tmp_path / "compare.png"
    r = run_cli("runs", "compare", "lr_low", "lr_high", "--tracking-uri", uri, "--plot", str(plot))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    lr_row = next(line for line in lines if line.startswith("train.lr_d "))
    assert lr_row.split()[1:] == ["0.0002", "0.001"]
    assert not any(line.startswith("train.batch_size ") for line in lines), "equal params are not listed"

    client = MlflowClient(tracking_uri=uri)
    runs = {run.info.run_name: run for run in client.search_runs([client.get_experiment_by_name("ganforge").experiment_id])}
    final = [f"{runs[n].data.metrics['loss/g']:.4g}" for n in ("lr_low", "lr_high")]
    loss_row = next(line for line in lines if line.startswith("loss/g "))
    assert [cell for cell in loss_row.split()[1:] if not cell.startswith("(")] == final
    assert next(line for line in lines if line.startswith("steps ")).split()[1:] == ["24", "24"]
    with Image.open(plot) as img:
        assert img.size[0] > 400 and img.size[1] > 200

    # The same comparison by run id; unknown names fail with one line naming them.
    r = run_cli("runs", "compare", runs["lr_low"].info.run_id, "lr_high", "--tracking-uri", uri)
    assert r.returncode == 0 and "train.lr_d" in r.stdout
    r = run_cli("runs", "compare", "lr_none", "--tracking-uri", uri)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "lr_none" in r.stderr

    # The final EMA generator is an artifact of each finished run, loadable without pickle.
    path = client.download_artifacts(runs["lr_high"].info.run_id, "model/generator_ema.pt", str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert state["step"] == 24 and state["config"]["train"]["lr_d"] == 0.001 and "G_ema" in state


def test_runs_list_names_a_missing_store(tmp_path):
    r = run_cli("runs", "list", "--tracking-uri", f"sqlite:///{tmp_path}/nothing.db")
    assert r.returncode == 1 and "nothing.db" in r.stderr and not os.path.exists(tmp_path / "nothing.db")


def test_the_exporter_listens_on_loopback_unless_told_otherwise(monkeypatch):
    from tests.conftest import free_port
    from trainer.telemetry.prometheus import PrometheusExporter

    monkeypatch.delenv("GANFORGE_METRICS_ADDR", raising=False)
    exporter = PrometheusExporter(free_port(), rank=0, job="loopback", world_size=1)
    try:
        assert exporter.server.server_address[0] == "127.0.0.1"  # /metrics has no authentication
    finally:
        exporter.close()
