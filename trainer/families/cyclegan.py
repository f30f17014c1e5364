"""CycleGAN (`model.arch=cyclegan`): unpaired translation between two image domains.

The generator pair (G_AB + G_BA) and the discriminator pair (D_A + D_B) are one module each, so
one DDP wrapper and one optimiser cover each pair. The second domain streams on its own (its own
order and position); D sees, half the time, images from a pool of earlier generated ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.core import Purpose, derive_seed
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv
from trainer.families.image_to_image import (
    VAL_MAX,
    TranslationTrainer,
    adversarial,
    check_translation,
    read_images,
)
from trainer.precision import upcast
from trainer.sampling import spread


class ImagePool:
    """The last `size` generated images of this rank; D sees them in place of fresh ones half the
    time (Shrivastava et al. 2017), which steadies CycleGAN. The coin flips come from a seed."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if self.size == 0:
            return images
        rng = torch.Generator().manual_seed(seed)
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand((), generator=rng) < 0.5:
                i = int(torch.randint(self.size, (), generator=rng))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> torch.Tensor:
        return torch.stack(self.images).cpu() if self.images else torch.empty(0)

    def load_state_dict(self, images: torch.Tensor, device: torch.device) -> None:
        self.images = [img.to(device) for img in images][: self.size]


class CycleGANTrainer(TranslationTrainer):
    """CycleGAN for one rank."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.data_b = DataCursor(cfg.data.train_b, cfg, env, seed=derive_seed(cfg.seed, Purpose.SECOND_DOMAIN))
        self.pools = (ImagePool(cfg.train.pool_size), ImagePool(cfg.train.pool_size))
        self.gathered_pools: list[dict[str, torch.Tensor]] | None = None
        self.val = None
        if env.is_main and cfg.data.val:
            self.val = {"a": read_images(cfg.data.val, VAL_MAX)["image"], "b": read_images(cfg.data.val_b, VAL_MAX)["image"]}

    def datasets(self) -> list[DataCursor]:
        return [self.data, self.data_b]

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_unit_range(self.data.next()["image"]), to_unit_range(self.data_b.next()["image"])

    def g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """Both generators: fool the other domain's D, cycle back (and map each domain to itself); D frozen."""
        cfg, d = self.cfg.loss, self.D.network
        made: dict[str, torch.Tensor] = {}

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                out = made["out"] = self.G.module(a, b, identity=cfg.identity_weight > 0)
                adv = adversarial(cfg.type, d.d_b(out["fake_b"]), True) + adversarial(cfg.type, d.d_a(out["fake_a"]), True)
                cycle = F.l1_loss(upcast(out["rec_a"]), a) + F.l1_loss(upcast(out["rec_b"]), b)
                loss = adv + cfg.cycle_weight * cycle
                terms = {"loss/g_adv": adv, "loss/cycle": cycle}
                if cfg.identity_weight > 0:
                    idt = F.l1_loss(upcast(out["same_b"]), b) + F.l1_loss(upcast(out["same_a"]), a)
                    loss = loss + cfg.cycle_weight * cfg.identity_weight * idt
                    terms["loss/identity"] = idt
            return loss, terms | {"loss/g": loss}

        stats = self.G.update(loss_fn, frozen=self.D).stats("g")
        return stats, (made["out"]["fake_a"], made["out"]["fake_b"])

    def d_loss(self, a: torch.Tensor, b: torch.Tensor, fakes: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each D on its domain's real images and on pooled generated ones, halved."""
        kind, env, step = self.cfg.loss.type, self.env, self.state.step
        with self.autocast():
            fake_a, fake_b = (pool.query(f.detach(), derive_seed(self.cfg.seed, step, Purpose.POOL_A + i, env.rank))
                              for i, (pool, f) in enumerate(zip(self.pools, fakes, strict=True)))
            real_a, real_b = self.D.module(a, b)
            out_a, out_b = self.D.module(fake_a, fake_b)
            loss_a = 0.5 * (adversarial(kind, real_a, True) + adversarial(kind, out_a, False))
            loss_b = 0.5 * (adversarial(kind, real_b, True) + adversarial(kind, out_b, False))
            loss = loss_a + loss_b
        return loss, {"loss/d_a": loss_a, "loss/d_b": loss_b, "loss/d": loss}

    # -- outputs --------------------------------------------------------------------------------
    def translator(self, direction: str) -> torch.nn.Module:
        g = self.G.network
        return g.g_ab if direction == "AtoB" else g.g_ba

    def held_out_grid(self) -> tuple[list[torch.Tensor], int, dict[str, float]]:
        """Rows of A | G_AB(A) | G_BA(G_AB(A)) | B | G_BA(B) | G_AB(G_BA(B)); the cycle L1 of each domain."""
        a, b = self.val["a"], self.val["b"]
        fake_b, fake_a = self.translate(a), self.translate(b, "BtoA")
        rec_a, rec_b = self.translate(fake_b, "BtoA"), self.translate(fake_a)
        values = {"val/cycle_l1_a": float((rec_a - a).abs().mean()), "val/cycle_l1_b": float((rec_b - b).abs().mean())}
        rows = [torch.stack([a[i], fake_b[i], rec_a[i], b[i], fake_a[i], rec_b[i]]) for i in spread(min(len(a), len(b)))]
        return rows, 6, values

    # -- state ----------------------------------------------------------------------------------
    def gather_state(self) -> None:
        """Every rank, before a checkpoint: bring each rank's image pools to rank 0, which saves them."""
        super().gather_state()
        mine = {"a": self.pools[0].state_dict(), "b": self.pools[1].state_dict()}
        if self.env.world_size == 1:
            self.gathered_pools = [mine]
            return
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        self.gathered_pools = everyone

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"data_b": self.data_b.state_dict(), "pools": self.gathered_pools}

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        super().load_state_dict(state, path)
        self.data_b.load_state_dict(state["data_b"])
        pools = state.get("pools") or []
        # Pools belong to ranks: rank r takes saved pool r (none when the job grew).
        mine = pools[self.env.rank] if self.env.rank < len(pools) else {"a": torch.empty(0), "b": torch.empty(0)}
        self.pools[0].load_state_dict(mine["a"], self.env.device)
        self.pools[1].load_state_dict(mine["b"], self.env.device)


# -- config checks -------------------------------------------------------------------------------
def check_cyclegan(cfg: Config, world_size: int) -> None:
    """CycleGAN: two domains (held-out shards of both or neither) and a side its ResNet G keeps."""
    check_translation(cfg)
    if not cfg.data.train_b:
        raise ConfigError("data.train_b", "cyclegan needs the second domain's shards")
    if bool(cfg.data.val) != bool(cfg.data.val_b):
        raise ConfigError("data.val_b" if cfg.data.val else "data.val", "cyclegan needs held-out shards of both domains, or neither")
    if cfg.model.resolution % 4:
        raise ConfigError("model.resolution", f"must be a multiple of 4 for the ResNet generator; got {cfg.model.resolution}")

