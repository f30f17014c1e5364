"""`ganforge config keys|show`, layered --config files, and a --help that imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, run_cli


def test_config_keys_lists_every_key_with_its_type_default_and_doc():
    from trainer.config import Config, to_flat

    r = run_cli("config", "keys")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert set(rows) == set(to_flat(Config())), "every key of the Config dataclasses, nothing else"
    from launcher.config_cli import config_keys

    assert all(k.doc for k in config_keys()), [k.name for k in config_keys() if not k.doc]
    line = rows["train.max_steps"]
    assert "int" in line and " 1000 " in line and "G steps" in line
    assert "bce | hinge" in rows["loss.type"]  # the allowed values


def test_config_keys_filters_by_prefix_and_names_a_prefix_that_matches_nothing():
    r = run_cli("config", "keys", "checkpoint.")
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("checkpoint.")
    assert all(line.startswith("checkpoint.") for line in r.stdout.splitlines())
    r = run_cli("config", "keys", "trian.")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "trian." in r.stderr


def test_config_show_layers_files_then_overrides(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("train:\n  max_steps: 7\n  lr_d: 0.125\n")
    r = run_cli("config", "show", "--config", "configs/dcgan_digits.yaml", "--config", str(site), "train.lr_d=0.5")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    recipe = yaml.safe_load(open(f"{REPO}/configs/dcgan_digits.yaml"))
    assert shown["model"]["arch"] == recipe["model"]["arch"]  # from the first file
    assert shown["train"]["max_steps"] == 7  # the second file over the first
    assert shown["train"]["lr_d"] == 0.5  # the override over both
    r = run_cli("config", "show", "--config", "configs/dcgan_digits.yaml", "train.bogus=1")
    assert r.returncode == 2 and "train.bogus" in r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["config", "keys", "--help"]])
def test_help_imports_no_torch(argv):
    code = (f"import sys\nfrom launcher.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", "torch is imported before --help is answered"
    if argv == ["train", "--help"]:
        assert "train.max_steps" in r.stdout and "G steps" in r.stdout


def test_config_show_prints_no_secret():
    r = run_cli("config", "show", "--config", "configs/dcgan_digits.yaml",
                "log.mlflow_uri=https://alice:SECRET@mlflow.example:5000")
    assert r.returncode == 0 and "SECRET" not in r.stdout and "alice" in r.stdout
