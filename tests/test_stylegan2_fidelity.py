"""StyleGAN2 training as stylegan2-ada-pytorch does it (training/loss.py, training_loop.py, augment.py,
networks.py): each test pins one behaviour where ganforge used to depart from the reference.

The reference's per-GPU choices are checked in their world-size-invariant form (one style-mixing
cutoff per global batch, the path-length mean over the global batch); docs/stylegan2.md has the table.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_stylegan2 import tiny_cfg


@pytest.fixture()
def make_trainer(digits_dir, tmp_path, monkeypatch):
    from trainer.distributed import init_distributed
    from trainer.families.stylegan2 import StyleGAN2Trainer

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)

    def make(*overrides: str) -> StyleGAN2Trainer:
        cfg = tiny_cfg(f"data.train={digits_dir}", f"run.dir={tmp_path}/run", "model.mbstd_group=0", *overrides)
        return StyleGAN2Trainer(cfg, init_distributed())

    return make


# -- loss.py ----------------------------------------------------------------------------------------
def test_style_mixing_draws_one_cutoff_for_the_whole_batch(make_trainer):
    from trainer.families.stylegan2 import GMAIN

    t = make_trainer("model.style_mixing=0.5")
    num_ws, cutoffs = t.G.network.num_ws, []
    for step in range(200):
        t.state.step = step
        cutoff = t.g_inputs(GMAIN, 8)["mix_cutoff"]
        assert cutoff.shape == (8,) and bool((cutoff == cutoff[0]).all()), "one cutoff per batch"
        cutoffs.append(int(cutoff[0]))
    mixed = [c for c in cutoffs if c < num_ws]
    assert set(mixed) == set(range(1, num_ws)), "randint(1, num_ws): every layer but the first can start w_mix"
    assert 0.4 < len(mixed) / len(cutoffs) < 0.6, "one coin per batch with P = style_mixing"


def test_path_length_gradient_flows_through_the_batch_mean_as_in_the_reference(make_trainer):
    from trainer.core import derive_seed
    from trainer.families.stylegan2 import GREG, PL_NOISE, draw

    # decay 0.5 from a = 0.3: the term through the mean is large; with decay 1 it would vanish.
    t = make_trainer("loss.pl_decay=0.5", "model.style_mixing=0")
    t.pl_mean = torch.tensor(0.3)
    g = t.G.network
    params = [p for p in g.parameters() if p.requires_grad]
    penalty, pl_mean = t.path_length()
    ours = torch.autograd.grad(penalty, params, allow_unused=True)

    # loss.py literally: pl_mean = self.pl_mean.lerp(pl_lengths.mean(), pl_decay), kept in the graph.
    n = t.cfg.train.batch_size // t.cfg.loss.pl_batch_shrink
    img, ws = g(**t.g_inputs(GREG, n), return_ws=True)
    y = draw(derive_seed(t.cfg.seed, 0, GREG, PL_NOISE), tuple(img.shape), t.env) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)
    lengths = grad.square().sum(2).mean(1).sqrt()
    ref_mean = torch.tensor(0.3).lerp(lengths.mean(), 0.5)
    reference = torch.autograd.grad((lengths - ref_mean).square().mean(), params, allow_unused=True,
                                    retain_graph=True)
    detached = torch.autograd.grad((lengths - ref_mean.detach()).square().mean(), params, allow_unused=True)

    torch.testing.assert_close(pl_mean, ref_mean.detach())
    torch.testing.assert_close(penalty, (lengths - ref_mean).square().mean())
    pairs = [(a, b, c) for a, b, c in zip(ours, reference, detached, strict=True) if b is not None]
    assert pairs
    for a, b, _ in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(b, c, rtol=1e-3, atol=1e-6) for _, b, c in pairs), "the mean's gradient matters"


# -- networks.py: w_avg -------------------------------------------------------------------------------
def test_w_avg_moves_in_every_training_mapping_call_but_the_mixing_one(make_trainer):
    t = make_trainer("loss.pl_every=1", "loss.r1_every=1", "model.style_mixing=1")
    mapping = t.G.network.mapping
    calls = []
    mapping.register_forward_hook(lambda m, args, w: calls.append((bool(args[2]) if len(args) > 2 else False,
                                                                   w.detach().clone())))
    expected = mapping.w_avg.clone()
    t.train_step()
    updates = [w for update, w in calls if update]
    batch = t.cfg.train.batch_size
    assert [len(w) for w in updates] == [batch, batch // t.cfg.loss.pl_batch_shrink, batch], "Gmain, Greg, Dmain"
    assert len(calls) == 6, "each phase's second (style-mixing) mapping call leaves w_avg alone"
    for w in updates:
        expected = w.mean(0).lerp(expected, mapping.w_avg_beta)  # networks.py: w.mean(0).lerp(w_avg, beta)
    torch.testing.assert_close(mapping.w_avg, expected)


# -- training_loop.py ---------------------------------------------------------------------------------
def test_lazy_regularisation_corrects_lr_and_betas_even_with_zero_weights(make_trainer):
    t = make_trainer("loss.pl_weight=0", "loss.r1_gamma=0", "loss.pl_every=4", "loss.r1_every=16")
    beta1, beta2 = t.cfg.train.beta1, t.cfg.train.beta2
    for phase, k in ((t.G, 4), (t.D, 16)):
        group = phase.opt.param_groups[0]
        assert group["betas"] == pytest.approx((beta1 ** (k / (k + 1)), beta2 ** (k / (k + 1))))
    assert (t.g_ratio, t.d_ratio) == (4 / 5, 16 / 17)


def test_ema_ramp_counts_the_images_before_the_step(make_trainer):
    from trainer.ema import ema_beta

    t = make_trainer("train.ema_kimg=10", "train.ema_rampup=0.05")
    t.train_step()  # cur_nimg = 0: beta = 0, G_ema becomes G
    for e, g in zip(t.ema.model.parameters(), t.G.network.parameters(), strict=True):
        assert torch.equal(e, g.detach())
    before = [p.clone() for p in t.ema.model.parameters()]
    batch = t.cfg.train.batch_size
    t.train_step()
    beta = ema_beta(batch, batch, 10, 0.05)  # cur_nimg = one batch before the second step
    assert beta != ema_beta(batch, 2 * batch, 10, 0.05)
    for e0, e1, g in zip(before, t.ema.model.parameters(), t.G.network.parameters(), strict=True):
        torch.testing.assert_close(e1, g.detach() + beta * (e0 - g.detach()))


def test_ada_statistic_counts_real_signs_from_dmain_and_dreg(make_trainer):
    t = make_trainer("train.augment=ada", "train.ada_interval=100", "loss.r1_every=2", "loss.r1_gamma=0.1")
    batch = t.cfg.train.batch_size
    t.train_step()  # step 0: Dmain and Dreg
    assert float(t.ada.signs[1]) == 2 * batch
    t.train_step()  # step 1: Dmain only
    assert float(t.ada.signs[1]) == 3 * batch


# -- augment.py --------------------------------------------------------------------------------------
def controlled(columns: dict[int, float]) -> torch.Tensor:
    """One row of augmentation uniforms with every coin off at p = 0.5 except the given columns."""
    from trainer.augment import RANDOM_COLUMNS

    u = torch.full((1, RANDOM_COLUMNS), 0.999)
    for i, v in columns.items():
        u[0, i] = v
    return u


def test_geometric_augmentation_mirrors_without_repeating_the_edge_pixel():
    from trainer.augment import augment

    ramp = torch.arange(8.0).repeat(1, 3, 8, 1)  # (1, 3, 8, 8): column x holds x
    # xint (columns 4-6): t = (u * 2 - 1) * 0.125 of 8 pixels, rounded: u = 0.9 -> +1, 0.1 -> -1.
    # The reference samples output x at input x - tx from an image padded by F.pad(mode='reflect'):
    # [..., 2, 1 | 0, 1, ..., 7 | 6, 5, ...], so column 0 of a +1 shift reads column 1.
    right = augment(ramp, controlled({4: 0.0, 5: 0.9, 6: 0.5}), 0.5)
    left = augment(ramp, controlled({4: 0.0, 5: 0.1, 6: 0.5}), 0.5)
    torch.testing.assert_close(right[0, 0, 0], torch.tensor([1.0, 0, 1, 2, 3, 4, 5, 6]), atol=1e-4, rtol=0)
    torch.testing.assert_close(left[0, 0, 0], torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 6]), atol=1e-4, rtol=0)


def test_rotations_turn_the_reference_way():
    from trainer.augment import augment

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    # The reference's G_inv @ rotate2d_inv(-theta) for both rotations: a quarter turn of an (H, W)
    # image is torch.rot90(x, 1, (2, 3)) (checked against its AugmentPipe once, by hand).
    quarter = augment(x, controlled({2: 0.0, 3: 0.3}), 0.5)  # rotate90, i = floor(0.3 * 4) = 1
    arbitrary = augment(x, controlled({9: 0.0, 10: 0.75}), 0.5)  # theta = (0.75 * 2 - 1) * pi = pi / 2
    torch.testing.assert_close(quarter, x.rot90(1, (2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(arbitrary, x.rot90(1, (2, 3)), atol=1e-4, rtol=0)
