"""`ganforge import`: released StyleGAN2-ADA, CycleGAN and pix2pix weights become ganforge runs that
reproduce the reference networks' outputs; a hostile pickle is refused before anything in it runs;
bad input fails in one line and writes nothing."""

from __future__ import annotations

import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from launcher.cli import main
from tests.conftest import REPO, run_cli

FIXTURES = os.path.join(REPO, "tests", "data", "import_fixtures")
TOLERANCE = 1e-4


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def recorded(name: str) -> dict[str, np.ndarray]:
    with np.load(fixture(name)) as f:
        return dict(f)


def ganforge(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ganforge ARGV` in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ganforge: "), err
    return lines[0]


def import_cyclegan(capsys, out: str, *extra: str) -> tuple[int, str, str]:
    return ganforge(capsys, "import", "cyclegan", "--g-ab", fixture("cyclegan_tiny_net_G_A.pth"),
                    "--g-ba", fixture("cyclegan_tiny_net_G_B.pth"), "--resolution", "32", "--out", out, *extra)


# -- the network pickle reader --------------------------------------------------------------------
def test_network_pickle_gives_state_dicts_and_init_kwargs_without_the_reference_code():
    from trainer.importers.network_pickle import read_network_pickle

    nets, init_kwargs = read_network_pickle(fixture("stylegan2_tiny.pkl"))
    assert set(nets) == {"G", "D", "G_ema"}
    assert init_kwargs["G_ema"]["z_dim"] == 32 and init_kwargs["G_ema"]["img_resolution"] == 16
    assert init_kwargs["G_ema"]["mapping_kwargs"] == {"num_layers": 2}
    assert init_kwargs["D"]["epilogue_kwargs"] == {"mbstd_group_size": 4}
    assert "mapping.w_avg" in nets["G_ema"] and "synthesis.b16.torgb.weight" in nets["G_ema"]
    assert nets["G"].keys() == nets["G_ema"].keys()
    assert not torch.equal(nets["G"]["mapping.fc0.weight"], nets["G_ema"]["mapping.fc0.weight"])
    assert all(isinstance(t, torch.Tensor) and type(t) is torch.Tensor for n in nets.values() for t in n.values())
    assert not any(m.startswith(("torch_utils", "dnnlib", "_imported_module_")) for m in sys.modules)


class Evil:
    """Unpickling this would create `marker`."""

    def __init__(self, call, marker: str):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call is eval:
            return eval, (f"open({self.marker!r}, 'w').close()",)
        return self.call, (f"touch {self.marker}",)


def hostile_pickles(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (pickle file, marker file it would create if any of its code ran)."""
    files = {}

    def write(name: str, make) -> None:
        marker = str(tmp_path / f"marker_{name}")
        path = str(tmp_path / f"{name}.pkl")
        with open(path, "wb") as f:
            pickle.dump(make(marker), f)
        files[name] = (path, marker)

    write("os_system", lambda m: Evil(os.system, m))
    write("eval", lambda m: Evil(eval, m))
    write("nested_in_allowed", lambda m: {"G_ema": {"state": [Evil(os.system, m)]}})
    write("module_class", lambda m: {"G_ema": torch.nn.Linear(2, 2)})

    class Storage:  # a storage payload that is itself a hostile pickle
        def __init__(self, marker: str):
            self.marker = marker

        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(Evil(os.system, self.marker)),)

    write("storage_payload", Storage)
    files["embedded_source"] = embedded_source_pickle(tmp_path)
    return files


def snapshot_like_pickle(path: str, source: str, state: dict, protocol: int) -> None:
    """Write a pickle shaped like a StyleGAN2-ADA snapshot: G, D and G_ema persistent objects whose
    reconstruct function executes `source` (as the reference's own unpickling does) and whose
    __dict__ is `state`."""
    fake = {name: types.ModuleType(name) for name in ("torch_utils", "torch_utils.persistence")}

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class Persistent:  # a module; its submodules (states in _modules) are persistent too
        def __init__(self, state: dict):
            self.state = dict(state, _modules=OrderedDict((k, Persistent(v)) for k, v in state["_modules"].items()))

        def __reduce__(self):
            meta = {"type": "class", "version": 6, "module_src": source, "class_name": "Generator",
                    "state": self.state}
            return _reconstruct_persistent_obj, (meta,)

    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        with open(path, "wb") as f:
            pickle.dump({name: Persistent(state) for name in ("G", "D", "G_ema")}, f, protocol=protocol)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def module_state(params: dict, buffers: dict, modules: dict) -> dict:
    return {"training": False, "_parameters": OrderedDict(params), "_buffers": OrderedDict(buffers),
            "_non_persistent_buffers_set": {"scratch"}, "_modules": OrderedDict(modules),
            "_init_kwargs": {"z_dim": 4}}


def embedded_source_pickle(tmp_path) -> tuple[str, str]:
    """A snapshot-like pickle whose embedded class source would create a marker file if executed."""
    marker = str(tmp_path / "marker_embedded_source")
    path = str(tmp_path / "embedded_source.pkl")
    snapshot_like_pickle(path, f"open({marker!r}, 'w').close()\nclass Generator:\n    pass\n",
                         module_state({}, {}, {}), pickle.DEFAULT_PROTOCOL)
    return path, marker


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_network_pickles_of_every_protocol_give_the_same_tensors(tmp_path, protocol):
    from trainer.importers.network_pickle import read_network_pickle

    weight, scratch = torch.randn(3, 4), torch.zeros(2)
    child = module_state({"weight": torch.nn.Parameter(weight), "bias": None}, {"scratch": scratch}, {})
    path = str(tmp_path / "snapshot.pkl")
    snapshot_like_pickle(path, "", module_state({}, {"w_avg": weight[1]}, {"fc0": child}), protocol)
    nets, init_kwargs = read_network_pickle(path)
    assert list(nets["G_ema"]) == ["w_avg", "fc0.weight"]  # no None bias, no non-persistent buffer
    assert torch.equal(nets["G_ema"]["fc0.weight"], weight) and torch.equal(nets["G_ema"]["w_avg"], weight[1])
    assert init_kwargs["G"] == {"z_dim": 4}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile storage payload
def test_hostile_pickles_are_refused_in_one_line_and_nothing_in_them_runs(tmp_path):
    from trainer.checkpoint import CheckpointError
    from trainer.importers.network_pickle import read_network_pickle

    cases = hostile_pickles(tmp_path)
    for name, (path, marker) in cases.items():
        if name == "embedded_source":  # passes the allow-list; its source is recorded, never executed
            read_network_pickle(path)
        else:
            with pytest.raises(CheckpointError) as e:
                read_network_pickle(path)
            assert path in str(e.value) and "\n" not in str(e.value), name
        assert not os.path.exists(marker), f"{name}: code from the pickle ran"
    refused = {}
    for name in ("os_system", "eval", "module_class"):
        with pytest.raises(CheckpointError) as e:
            read_network_pickle(cases[name][0])
        refused[name] = str(e.value)
    assert "posix.system" in refused["os_system"] or "nt.system" in refused["os_system"]
    assert "builtins.eval" in refused["eval"]
    assert "torch.nn.modules.linear.Linear" in refused["module_class"]


def test_import_command_refuses_a_hostile_pickle_with_exit_1(tmp_path):
    path, marker = hostile_pickles(tmp_path)["os_system"]
    r = run_cli("import", "stylegan2-ada", "--pkl", path, "--out", str(tmp_path / "run"), timeout=300)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert path in line and "posix.system" in line and "refused" in line
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "run")


# -- CycleGAN and pix2pix ---------------------------------------------------------------------------
def test_cyclegan_import_reproduces_the_reference_generators_and_discriminators(tmp_path, capsys):
    from trainer.families.image_to_image import load_translator
    from trainer.generate import load_checkpoint_state
    from trainer.models import build_models

    run = str(tmp_path / "cyclegan")
    code, out, err = import_cyclegan(capsys, run, "--d-a", fixture("cyclegan_tiny_net_D_B.pth"),
                                     "--d-b", fixture("cyclegan_tiny_net_D_A.pth"))
    assert code == 0, err
    ref = recorded("cyclegan_tiny_outputs.npz")
    a, b = torch.from_numpy(ref["a"]), torch.from_numpy(ref["b"])
    with torch.no_grad():
        g_ab, cfg = load_translator(run, "AtoB")
        g_ba, _ = load_translator(run, "BtoA")
        assert (cfg.model.g_width, cfg.model.n_blocks, cfg.model.norm, cfg.model.resolution) == (4, 2, "instance", 32)
        assert np.abs(g_ab(a).numpy() - ref["g_ab_a"]).max() <= TOLERANCE
        assert np.abs(g_ba(b).numpy() - ref["g_ba_b"]).max() <= TOLERANCE
        _, state, cfg = load_checkpoint_state(run)
        _, d = build_models(cfg.model)
        d.load_state_dict(state["D"])
        d.eval()
        assert np.abs(d.d_a(a).numpy() - ref["d_on_a"]).max() <= TOLERANCE
        assert np.abs(d.d_b(b).numpy() - ref["d_on_b"]).max() <= TOLERANCE


def test_pix2pix_import_reproduces_the_reference_unet_with_its_skip_order_swapped(tmp_path, capsys):
    from trainer.families.image_to_image import load_translator
    from trainer.generate import load_checkpoint_state
    from trainer.models import build_models

    run = str(tmp_path / "pix2pix")
    code, out, err = ganforge(capsys, "import", "pix2pix", "--g", fixture("pix2pix_tiny_net_G.pth"),
                              "--d", fixture("pix2pix_tiny_net_D.pth"), "--out", run)
    assert code == 0, err
    ref = recorded("pix2pix_tiny_outputs.npz")
    a, b = torch.from_numpy(ref["a"]), torch.from_numpy(ref["b"])
    with torch.no_grad():
        g, cfg = load_translator(run, "AtoB")
        assert (cfg.model.resolution, cfg.model.g_width, cfg.model.norm) == (32, 2, "batch")
        assert np.abs(g(a).numpy() - ref["g_a"]).max() <= TOLERANCE
        _, state, cfg = load_checkpoint_state(run)
        _, d = build_models(cfg.model)
        d.load_state_dict(state["D"])
        assert np.abs(d.eval()(torch.cat([a, b], 1)).numpy() - ref["d_ab"]).max() <= TOLERANCE
        # without the reordering of the concatenated inputs the outputs differ: the swap is real
        unswapped = {k: v for k, v in state["G"].items()}
        for k in [k for k in unswapped if k.startswith("up.") and k.endswith(".1.weight") and not k.startswith("up.0.")]:
            h = unswapped[k].shape[0] // 2
            unswapped[k] = torch.cat([unswapped[k][h:], unswapped[k][:h]])
        g.load_state_dict(unswapped)
        assert np.abs(g(a).numpy() - ref["g_a"]).max() > 10 * TOLERANCE


def test_imported_run_is_a_starting_point_for_init_from(tmp_path, capsys):
    from trainer.checkpoint import read_init
    from trainer.config import from_dict
    from trainer.core import load_weights
    from trainer.models import build_models

    run = str(tmp_path / "pix2pix")
    assert ganforge(capsys, "import", "pix2pix", "--g", fixture("pix2pix_tiny_net_G.pth"), "--out", run)[0] == 0
    path, state = read_init(run)
    assert os.path.basename(path) == "step_00000000" and state["step"] == 0
    assert "pix2pix" in state["imported_from"] and state["imported_networks"] == ["G"]
    with open(os.path.join(run, "config.yaml")) as f:
        assert "arch: pix2pix" in f.read()
    model = from_dict(state["config"]).model
    assert model.d_width == model.g_width == 2  # no --d: D sized as the reference's default (ndf = ngf)
    g, d = build_models(model)
    load_weights(g, state["G"], "G")
    load_weights(d, state["D"], "D")  # no --d: D as ganforge builds it, so fine-tuning can start


def test_an_imported_run_is_not_resumed_as_a_training_state(tmp_path, capsys):
    from trainer.checkpoint import CheckpointError, read_init
    from trainer.config import from_dict
    from trainer.distributed import DistEnv
    from trainer.families import check_config
    from trainer.families.pix2pix import Pix2PixTrainer

    run = str(tmp_path / "pix2pix")
    assert ganforge(capsys, "import", "pix2pix", "--g", fixture("pix2pix_tiny_net_G.pth"), "--out", run)[0] == 0
    path, state = read_init(run)
    from data_pipeline.packaged import ensure_built

    ensure_built("edges2photos", str(tmp_path / "ep"), 32)
    cfg = from_dict(state["config"])
    cfg.data.train, cfg.run.dir, cfg.log.mlflow_uri, cfg.train.batch_size = str(tmp_path / "ep" / "train"), run, "none", 4
    check_config(cfg)
    trainer = Pix2PixTrainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    with pytest.raises(CheckpointError, match="weights only .* checkpoint.init_from="):
        trainer.load_state_dict(state, path)


def test_stylegan2_ada_import_reproduces_g_ema_and_d(tmp_path, capsys):
    from trainer.generate import load_checkpoint_state, sample_to_file
    from trainer.models import build_models

    run = str(tmp_path / "stylegan2")
    code, out, err = ganforge(capsys, "import", "stylegan2-ada", "--pkl", fixture("stylegan2_tiny.pkl"), "--out", run)
    assert code == 0, err
    ref = recorded("stylegan2_tiny_outputs.npz")
    z = str(tmp_path / "z.npy")
    np.save(z, ref["z"])
    for psi, key in ((0.7, "g_ema_psi07_const"), (1.0, "g_ema_psi1_const")):
        sample_to_file(run, 0, 0, str(tmp_path / f"s{psi}.npy"), truncation=psi, z_file=z, noise_mode="const")
        assert np.abs(np.load(tmp_path / f"s{psi}.npy") - ref[key]).max() <= TOLERANCE, psi
    _, state, cfg = load_checkpoint_state(run)
    _, d = build_models(cfg.model)
    d.load_state_dict(state["D"])
    with torch.no_grad():
        logits = d.eval()(torch.from_numpy(ref["g_ema_psi07_const"]))
    assert np.abs(logits.numpy().reshape(ref["d_logits"].shape) - ref["d_logits"]).max() <= TOLERANCE


# -- bad input --------------------------------------------------------------------------------------
def test_an_existing_non_empty_out_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, _, err = import_cyclegan(capsys, str(run))
    assert code == 2
    assert "--out" in one_line(err) and str(run) in err
    assert os.listdir(run) == ["notes.txt"] and (run / "notes.txt").read_text() == "mine"


def test_one_cyclegan_discriminator_alone_is_bad_usage(tmp_path, capsys):
    code, _, err = import_cyclegan(capsys, str(tmp_path / "run"), "--d-a", fixture("cyclegan_tiny_net_D_B.pth"))
    assert code == 2 and "--d-b" in one_line(err)
    assert not os.path.exists(tmp_path / "run")


def test_a_missing_or_wrong_file_is_named_in_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.pth")
    code, _, err = ganforge(capsys, "import", "cyclegan", "--g-ab", missing, "--g-ba", fixture("cyclegan_tiny_net_G_B.pth"),
                            "--out", str(tmp_path / "r1"))
    assert code == 1 and missing in one_line(err) and "no such file" in err
    # a discriminator given as a generator
    wrong = fixture("cyclegan_tiny_net_D_A.pth")
    code, _, err = ganforge(capsys, "import", "cyclegan", "--g-ab", wrong, "--g-ba", fixture("cyclegan_tiny_net_G_B.pth"),
                            "--out", str(tmp_path / "r2"))
    assert code == 1 and wrong in one_line(err) and "ResnetGenerator" in err
    # a ResNet generator given as the pix2pix U-Net
    wrong = fixture("cyclegan_tiny_net_G_A.pth")
    code, _, err = ganforge(capsys, "import", "pix2pix", "--g", wrong, "--out", str(tmp_path / "r3"))
    assert code == 1 and wrong in one_line(err) and "UnetGenerator" in err
    # not a pickle at all, and a .pth given as a network pickle
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    for bad in (str(text), fixture("pix2pix_tiny_net_D.pth")):
        code, _, err = ganforge(capsys, "import", "stylegan2-ada", "--pkl", bad, "--out", str(tmp_path / "r4"))
        assert code == 1 and bad in one_line(err)
    assert not any(os.path.exists(tmp_path / r) for r in ("r1", "r2", "r3", "r4"))


@pytest.mark.slow
def test_an_imported_stylegan2_run_fine_tunes_on_digits_under_two_processes_and_resumes_exactly(digits_dir, tmp_path,
                                                                                             capsys):
    """The official-structure 32x32 grey pickle (tests/data/import_fixtures/README.md) imported, then 20
    steps of 2-process DDP from its weights (checkpoint.init_from): straight through, and 10 + resume."""
    import yaml

    from tests.conftest import accelerate_cpu
    from trainer.checkpoint import read_checkpoint

    imported = str(tmp_path / "imported")
    code, _, err = ganforge(capsys, "import", "stylegan2-ada", "--pkl", fixture("stylegan2_gray32.pkl"),
                            "--out", imported)
    assert code == 0, err
    with open(os.path.join(imported, "config.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    same_nets = [f"model.{k}={model[k]}" for k in ("resolution", "channels", "z_dim", "w_dim", "map_layers",
                                                    "channel_base", "g_width", "d_width", "mbstd_group")]
    args = ["--config", "configs/stylegan2_digits.yaml", f"data.train={digits_dir}", *same_nets,
            f"checkpoint.init_from={imported}", "train.batch_size=8", "log.mlflow_uri=none", "train.threads=1",
            "loss.r1_every=4", "loss.pl_every=2", "checkpoint.every_steps=10", "log.every_steps=5"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    for run, steps in ((whole, 20), (split, 10), (split, 20)):
        r = accelerate_cpu(2, *args, f"run.dir={run}", f"train.max_steps={steps}")
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    start = read_checkpoint(os.path.join(imported, "checkpoints", "step_00000000"))
    a, b = (read_checkpoint(os.path.join(run, "checkpoints", "step_00000020")) for run in (whole, split))
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"
    # it trained from the imported weights: near them after 20 small steps, and moved
    moved = [float((a["G"][k] - start["G"][k]).abs().max()) for k in start["G"] if start["G"][k].is_floating_point()]
    assert 0 < max(moved) < 1.0


def test_dcgan_import_reproduces_the_pytorch_examples_generator_and_discriminator(tmp_path, capsys):
    from trainer.generate import load_checkpoint_state, load_generator
    from trainer.models import build_models

    run = str(tmp_path / "dcgan")
    code, out, err = ganforge(capsys, "import", "dcgan", "--g", fixture("dcgan_tiny_netG.pth"),
                              "--d", fixture("dcgan_tiny_netD.pth"), "--out", run)
    assert code == 0, err
    ref = recorded("dcgan_tiny_outputs.npz")
    g, cfg, _ = load_generator(run)
    with torch.no_grad():
        got = g.eval()(torch.from_numpy(ref["z"])).numpy()
    assert np.abs(got - ref["g_z"]).max() <= TOLERANCE
    _, state, cfg = load_checkpoint_state(run)
    _, d = build_models(cfg.model)
    d.load_state_dict(state["D"])
    with torch.no_grad():  # ganforge's D returns logits; the reference's ends in a Sigmoid
        probs = torch.sigmoid(d.eval()(torch.from_numpy(ref["x"]))).numpy()
    assert np.abs(probs - ref["d_x"]).max() <= TOLERANCE


def tensor_reduce(storage_bytes_fn, size: tuple, stride: tuple):
    """An object that pickles as a tensor over a storage payload (as torch's own reduce does)."""

    class Tensorish:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage_bytes_fn(), 0, size, stride, False, OrderedDict())

    return Tensorish()


def test_pickled_tensors_larger_than_their_storage_or_the_file_are_refused(tmp_path):
    """A stride-0 view, a view past its storage's end, and one small storage behind many tensors
    would make the reader allocate far more than the file holds: each is refused in one line."""
    from trainer.checkpoint import CheckpointError
    from trainer.importers.network_pickle import read_network_pickle

    reduced = torch.zeros(4096).storage().__reduce__()  # (torch.storage._load_from_bytes, (legacy torch.save bytes,))

    class Payload:  # a storage as torch pickles it
        def __reduce__(self):
            return reduced

    shared = Payload()  # one object: pickle memoises it, so every tensor below refers to one payload
    cases = {
        "stride0": ({"w": tensor_reduce(lambda: shared, (2000, 2000), (0, 0))}, "does not hold"),
        "past_end": ({"w": tensor_reduce(lambda: shared, (4097,), (1,))}, "does not hold"),
        "many": ({f"w{i}": tensor_reduce(lambda: shared, (4096,), (1,)) for i in range(200)},  # 3.3 MB from ~30 kB
                 "more bytes than the file has"),
    }
    for name, (params, why) in cases.items():
        path = str(tmp_path / f"{name}.pkl")
        snapshot_like_pickle(path, "", module_state(params, {}, {}), pickle.DEFAULT_PROTOCOL)
        with pytest.raises(CheckpointError, match=why) as e:
            read_network_pickle(path)
        assert "\n" not in str(e.value) and path in str(e.value), name


def test_a_network_pickle_without_constructor_arguments_is_one_line_not_a_traceback(tmp_path, capsys):
    path, run = str(tmp_path / "nokwargs.pkl"), str(tmp_path / "run")
    state = module_state({"weight": torch.nn.Parameter(torch.randn(3, 4))}, {}, {})
    del state["_init_kwargs"]
    snapshot_like_pickle(path, "", state, pickle.DEFAULT_PROTOCOL)
    code, _, err = ganforge(capsys, "import", "stylegan2-ada", "--pkl", path, "--out", run)
    assert code == 1 and one_line(err) and path in err and not os.path.exists(run)
