"""Silent failures made loud or harmless: skipped steps and BN statistics, skipped samples, bad checkpoints."""

from __future__ import annotations

import pytest
import torch

from trainer.config import load_config

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none"]


@pytest.fixture()
def make_trainer(digits_dir, tmp_path, monkeypatch):
    from trainer.distributed import init_distributed
    from trainer.loop import Trainer

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def make(*overrides: str) -> Trainer:
        cfg = load_config(RECIPE, [f"data.train={digits_dir}", f"run.dir={tmp_path}/run", *TINY, *overrides])
        return Trainer(cfg, init_distributed())

    return make


def bn_buffers(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": b.clone() for i, m in enumerate(modules) for name, b in m.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("n_critic", [1, 2])
def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(make_trainer, monkeypatch, n_critic):
    t = make_trainer(f"train.n_critic={n_critic}")
    t.train_step()  # statistics that moved away from their initial values
    before = bn_buffers(t.G.module, t.D.module)
    assert before and all(torch.isfinite(b.float()).all() for b in before.values())
    real = t.real_batch
    monkeypatch.setattr(t, "real_batch", lambda: (torch.full_like(real()[0], float("nan")), None))
    stats = t.train_step()
    assert stats["skipped/d"] == 1 and t.state.nonfinite == 1
    after = bn_buffers(t.G.module, t.D.module)
    for name, b in before.items():
        assert torch.equal(after[name], b), f"{name} changed by a skipped step"
    assert all(torch.isfinite(p).all() for p in t.ema.model.buffers() if p.is_floating_point())
    monkeypatch.undo()
    t.train_step()  # and training goes on with finite statistics
    assert all(torch.isfinite(b.float()).all() for b in bn_buffers(t.G.module, t.D.module).values())
