"""Device discipline without a GPU: a training step creates no tensor off the trainer's device.

On a CUDA machine a tensor built without `device=` lands on the CPU and breaks the step (e.g.
stacking a CPU flag with CUDA statistics in the reporter). Here the step runs on the CPU with
the *default* device set to `meta`: a tensor built without `device=` then lands on `meta`, which
no CPU computation accepts and which the statistics check names. What the check cannot see:
code that names the CPU on purpose and is wrong to (it passes here as on the GPU), kernels that
exist only on CUDA, and dtype or precision effects of autocast on the GPU (`make gpu-check`).
"""

from __future__ import annotations

import pytest
import torch

from tests.test_gpu import family_args
from trainer.families import load_config


def on_cpu(fetch):
    """`fetch` (a data cursor's `next`) with the CPU as default device: the loader's own
    collation builds host tensors by design, before the batch moves to the trainer's device."""

    def fetch_on_cpu():
        with torch.device("cpu"):
            return fetch()

    return fetch_on_cpu


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp", "cyclegan", "pix2pix", "stylegan2"])
def test_a_step_builds_no_tensor_off_the_trainer_device(family, digits_dir, packaged, tmp_path, monkeypatch):
    from trainer.distributed import DistEnv
    from trainer.run import make_trainer

    recipe, args = family_args(family, digits_dir, packaged)
    cfg = load_config(recipe, [f"run.dir={tmp_path}/run", "log.mlflow_uri=none", *args, "precision=fp32",
                               "train.threads=1"])
    trainer = make_trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    trainer.train_step()  # optimiser state and other lazily built state: once, outside the check
    for cursor in (trainer.data, getattr(trainer, "data_b", None)):
        if cursor is not None:
            monkeypatch.setattr(cursor, "next", on_cpu(cursor.next))
    for _ in range(2):  # the second step too: lazy regularisers and ADA run on alternate steps
        with torch.device("meta"):
            stats = trainer.train_step()
        wrong = {k: str(v.device) for k, v in stats.items() if v.device.type != "cpu"}
        assert not wrong, f"statistics built off the trainer's device: {wrong}"
