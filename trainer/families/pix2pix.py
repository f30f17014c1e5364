"""pix2pix (`model.arch=pix2pix`): paired translation with a U-Net and a conditional PatchGAN.

D judges (input, output) pairs stacked along channels; G adds an L1 term to the target.
`model.direction` picks which member of each stored pair is the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError
from trainer.data import to_unit_range
from trainer.distributed import DistEnv
from trainer.families.image_to_image import (
    VAL_MAX,
    TranslationTrainer,
    adversarial,
    check_translation,
    psnr,
    read_images,
)
from trainer.precision import upcast
from trainer.sampling import spread


class Pix2PixTrainer(TranslationTrainer):
    """pix2pix for one rank."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.val = self.pair(read_images(cfg.data.val, VAL_MAX)) if env.is_main and cfg.data.val else None

    def pair(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(input, target) from a paired batch, per `model.direction`."""
        a, b = batch["a"], batch["b"]
        return {"a": a, "b": b} if self.cfg.model.direction == "AtoB" else {"a": b, "b": a}

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pair(self.data.next())
        return to_unit_range(pair["a"]), to_unit_range(pair["b"])

    def g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """G(a): fool D on (a, G(a)) and stay near b in L1; D frozen."""
        cfg, d = self.cfg.loss, self.D.network
        made: list[torch.Tensor] = []

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                fake = self.G.module(a)
                made.append(fake)
                adv = adversarial(cfg.type, d(torch.cat([a, fake], 1)), True)
                l1 = F.l1_loss(upcast(fake), b)
                loss = adv + cfg.l1_weight * l1
            return loss, {"loss/g": loss, "loss/g_adv": adv, "loss/l1": l1}

        return self.G.update(loss_fn, frozen=self.D).stats("g"), (made[0],)

    def d_loss(self, a: torch.Tensor, b: torch.Tensor, fakes: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D on (input, target) against (input, output), halved."""
        kind = self.cfg.loss.type
        with self.autocast():
            real_out = self.D.module(torch.cat([a, b], 1))
            fake_out = self.D.module(torch.cat([a, fakes[0].detach()], 1))
            loss = 0.5 * (adversarial(kind, real_out, True) + adversarial(kind, fake_out, False))
        return loss, {"d/real": upcast(real_out.detach()).mean(), "d/fake": upcast(fake_out.detach()).mean(), "loss/d": loss}

    def held_out_grid(self) -> tuple[list[torch.Tensor], int, dict[str, float]]:
        """Rows of input | output | target; the L1 and PSNR to the targets."""
        a, b = self.val["a"], self.val["b"]
        fake_b = self.translate(a)
        values = {"val/l1": float((fake_b - b).abs().mean()), "val/psnr": psnr(fake_b, b)}
        return [torch.stack([a[i], fake_b[i], b[i]]) for i in spread(min(len(a), len(b)))], 3, values


# -- config checks -------------------------------------------------------------------------------
def check_pix2pix(cfg: Config, world_size: int) -> None:
    """pix2pix: a side its U-Net halves down to 1x1."""
    check_translation(cfg)
    res = cfg.model.resolution
    if res < 16 or res & (res - 1):
        raise ConfigError("model.resolution", f"must be a power of two >= 16 for the U-Net; got {res}")
