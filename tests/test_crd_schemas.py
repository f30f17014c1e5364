"""Rendered custom objects (PyTorchJob, JobSet, PodMonitor) against their published CRD schemas.

Two checks per object, as the API server applies them:
- validation: the CRD's `openAPIV3Schema` (tests/data/crds/, see its README for source and
  version) as JSON Schema, so wrong types, enums, patterns and missing required fields fail;
- pruning: a field the structural schema does not declare is dropped silently on create
  (no error, no warning), so every such field path is listed and must be none.
CEL rules (`x-kubernetes-validations`) are not evaluated.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

CRDS = os.path.join(REPO, "tests", "data", "crds")
SCHEMA_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.json",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.v1alpha2.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.v1.json",
}
IMAGE = "ghcr.io/example/ganforge:1"
SCHEDULING = ["--node-selector", "pool=a100", "--node-selector", "topology.kubernetes.io/zone=z1",
              "--toleration", "dedicated=training:NoSchedule", "--toleration", "spot:NoExecute",
              "--cpu-per-gpu", "4", "--memory-per-gpu", "30Gi", "--guaranteed", "--one-pod-per-node",
              "--namespace", "ml", "--monitor-label", "prometheus=main", "--storage-class", "rwx"]
# name: (flavour, nodes, GPUs per node, further flags and overrides)
CASES = {
    "job-1-cpu": ("job", 1, 0, ["--mlflow-uri", "none"]),
    "job-256x8-scheduled": ("job", 256, 8, [*SCHEDULING, "train.batch_size=4096"]),
    "pytorchjob-1-cpu": ("pytorchjob", 1, 0, ["--mlflow-uri", "none"]),
    "pytorchjob-elastic-2to4x8-scheduled": ("pytorchjob", 4, 8, ["--min-nodes", "2", *SCHEDULING,
                                                                 "train.batch_size=96"]),
    "pytorchjob-256x8-scheduled": ("pytorchjob", 256, 8, [*SCHEDULING, "train.batch_size=4096"]),
    "jobset-1-cpu": ("jobset", 1, 0, ["--mlflow-uri", "none"]),
    "jobset-256x8-scheduled": ("jobset", 256, 8, [*SCHEDULING, "--exclusive-topology",
                                                  "cloud.google.com/gke-nodepool", "train.batch_size=4096"]),
}
CUSTOM_KIND = {"job": "PodMonitor", "pytorchjob": "PyTorchJob", "jobset": "JobSet"}


# -- the two checks ------------------------------------------------------------------------------

def json_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema (draft 4): `nullable` and
    `x-kubernetes-int-or-string` spelled out; other x-kubernetes-* keys are ignored by jsonschema."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string") is True and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") is True:
        if isinstance(node.get("type"), str):
            out["type"] = [node["type"], "null"]
        if "enum" in node:
            out["enum"] = [*node["enum"], None]
    return out


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)


def schema_for(obj: dict) -> dict:
    with open(os.path.join(CRDS, SCHEMA_FILES[obj["apiVersion"], obj["kind"]])) as f:
        return json.load(f)


def violations(obj: dict, schema: dict) -> list[str]:
    """What the API server's schema validation would reject, one line per error."""
    validator = jsonschema.Draft4Validator(json_schema(schema), format_checker=FORMATS)
    return sorted(f"{e.json_path}: {e.message[:200]}" for e in validator.iter_errors(obj))


def pruned_fields(obj: Any, schema: dict, path: str = "") -> list[str]:
    """Paths of the fields in `obj` that the API server would drop on create: keys of an object
    the schema neither declares in `properties` nor allows by `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields: true`. Root `metadata` is ObjectMeta, checked apart."""
    out: list[str] = []
    if isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(obj):
                out += pruned_fields(item, items, f"{path}[{i}]")
        return out
    if not isinstance(obj, dict):
        return out
    declared = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields") is True or extra is True
    implicit = {"apiVersion", "kind", "metadata"} if not path or schema.get("x-kubernetes-embedded-resource") else set()
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        if key in declared:
            if not (key == "metadata" and implicit):
                out += pruned_fields(value, declared[key], where)
        elif isinstance(extra, dict):
            out += pruned_fields(value, extra, where)
        elif key not in implicit and not keeps_unknown:
            out.append(where)
    return out


# -- rendered objects ----------------------------------------------------------------------------

def render(out, flavor: str, nodes: int, gpus: int, extra: list[str]) -> list[dict]:
    """`ganforge k8s render` through the CLI's own entry point (in-process: torch loads once)."""
    from launcher.cli import main

    argv = ["k8s", "render", "--config", os.path.join(REPO, "configs", "dcgan_digits.yaml"), "--nodes", str(nodes),
            "--gpus-per-node", str(gpus), "--image", IMAGE, "--flavor", flavor, "--out", str(out), *extra]
    assert main(argv) == 0, argv
    return load_objects(out)


def load_objects(path) -> list[dict]:
    return [o for f in sorted(os.listdir(path)) if f.endswith(".yaml") and f != "kustomization.yaml"
            for o in yaml.safe_load_all(open(os.path.join(path, f))) if o]


def custom_objects(objs: list[dict]) -> list[dict]:
    return [o for o in objs if (o.get("apiVersion"), o.get("kind")) in SCHEMA_FILES]


def assert_matches_crd(obj: dict, where: str) -> None:
    schema = schema_for(obj)
    errors = violations(obj, schema)
    assert not errors, f"{where} {obj['kind']} violates its CRD schema:\n" + "\n".join(errors)
    pruned = pruned_fields(obj, schema)
    assert not pruned, f"{where} {obj['kind']}: the API server would silently drop:\n" + "\n".join(pruned)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_custom_object_passes_its_crd_schema_and_loses_no_field(case, tmp_path):
    flavor, nodes, gpus, extra = CASES[case]
    objs = custom_objects(render(tmp_path / "out", flavor, nodes, gpus, extra))
    assert sorted(o["kind"] for o in objs) == sorted({"PodMonitor", CUSTOM_KIND[flavor]}), case
    for obj in objs:
        assert_matches_crd(obj, case)


def test_committed_k8s_tree_custom_objects_pass_their_crd_schemas_and_lose_no_field():
    objs = [(d, o) for d in ("base", "overlays/pytorchjob", "overlays/jobset")
            for o in custom_objects(load_objects(os.path.join(REPO, "k8s", d)))]
    assert sorted(o["kind"] for _, o in objs) == ["JobSet", "PodMonitor", "PyTorchJob"]
    for d, obj in objs:
        assert_matches_crd(obj, f"k8s/{d}")


# -- the checks themselves can fail --------------------------------------------------------------

@pytest.fixture(scope="module")
def pytorchjob(tmp_path_factory) -> dict:
    objs = render(tmp_path_factory.mktemp("pytorchjob"), "pytorchjob", 2, 8, SCHEDULING)
    return next(o for o in objs if o["kind"] == "PyTorchJob")


def test_pruning_check_names_every_undeclared_field_and_nothing_else(pytorchjob):
    obj = copy.deepcopy(pytorchjob)
    worker = obj["spec"]["pytorchReplicaSpecs"]["Worker"]
    obj["spec"]["elasticPolicy"]["maxNodes"] = 4  # not a field of ElasticPolicy
    worker["template"]["spec"]["containers"][0]["gpus"] = 8
    worker["template"]["metadata"]["labels"]["any-label"] = "kept"  # labels: additionalProperties
    obj["metadata"]["labels"]["also-kept"] = "x"  # root metadata is ObjectMeta, not pruned by the CRD
    assert pruned_fields(obj, schema_for(obj)) == [
        "spec.elasticPolicy.maxNodes",
        "spec.pytorchReplicaSpecs.Worker.template.spec.containers[0].gpus",
    ]
    assert pruned_fields(pytorchjob, schema_for(pytorchjob)) == []


def test_pruning_check_keeps_what_the_schema_preserves():
    schema = {"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "shut": {"type": "object"},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"a": {}}}}}}
    obj = {"open": {"x": {"y": 1}}, "shut": {"x": 1}, "map": {"k": {"a": 1, "b": 2}}, "top": 0}
    assert pruned_fields(obj, schema) == ["shut.x", "map.k.b", "top"]


def test_schema_check_rejects_wrong_types_and_missing_fields_and_accepts_int_or_string(pytorchjob):
    schema = schema_for(pytorchjob)
    assert violations(pytorchjob, schema) == []
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["nprocPerNode"] = 8  # a string in kubeflow.org/v1
    del bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"]
    bad["spec"]["runPolicy"]["backoffLimit"] = 2**31  # int32
    errors = violations(bad, schema)
    assert len(errors) == 3 and all(e.startswith("$.spec.") for e in errors), errors
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    for quantity in (8, "8", "500m"):
        ok = copy.deepcopy(pytorchjob)
        ok["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"] = {
            "limits": {**container["resources"]["limits"], "cpu": quantity}}
        assert violations(ok, schema) == [], quantity
    assert jsonschema.Draft4Validator(json_schema({"type": "string", "nullable": True})).is_valid(None)
