"""`ganforge import`: released weights of the reference implementations as a ganforge run directory."""

from __future__ import annotations

import argparse
import hashlib
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn released StyleGAN2-ADA, CycleGAN, pix2pix or DCGAN weights into a ganforge run")
    kinds = p.add_subparsers(dest="import_kind", required=True)

    s = kinds.add_parser("stylegan2-ada", help="an official network-snapshot-*.pkl (read as data: its code never runs)")
    s.add_argument("--pkl", required=True, help="the network pickle (G, D, G_ema)")
    s.add_argument("--out", required=True, help="new run directory (an existing non-empty one is refused)")
    s.set_defaults(func=import_stylegan2_ada)

    c = kinds.add_parser("cyclegan", help="the reference's ResNet generators (and PatchGAN discriminators), .pth")
    c.add_argument("--g-ab", required=True, help="generator A -> B (the reference's *_net_G_A.pth)")
    c.add_argument("--g-ba", required=True, help="generator B -> A (the reference's *_net_G_B.pth)")
    c.add_argument("--d-a", help="discriminator of domain-A images (the reference's *_net_D_B.pth); with --d-b")
    c.add_argument("--d-b", help="discriminator of domain-B images (the reference's *_net_D_A.pth); with --d-a")
    c.add_argument("--resolution", type=int, default=256, help="image side the run trains on (default 256)")
    c.add_argument("--out", required=True, help="new run directory (an existing non-empty one is refused)")
    c.set_defaults(func=import_cyclegan)

    x = kinds.add_parser("pix2pix", help="the reference's U-Net generator (and PatchGAN discriminator), .pth")
    x.add_argument("--g", required=True, help="the U-Net generator (the reference's *_net_G.pth)")
    x.add_argument("--d", help="the discriminator of (input, output) pairs (*_net_D.pth)")
    x.add_argument("--resolution", type=int, help="image side (default: the U-Net's, 2^levels); must match it")
    x.add_argument("--out", required=True, help="new run directory (an existing non-empty one is refused)")
    x.set_defaults(func=import_pix2pix)

    g = kinds.add_parser("dcgan", help="pytorch/examples DCGAN generator (and discriminator) state dicts, .pth")
    g.add_argument("--g", required=True, help="the generator (the reference's netG_epoch_*.pth)")
    g.add_argument("--d", help="the discriminator (netD_epoch_*.pth)")
    g.add_argument("--out", required=True, help="new run directory (an existing non-empty one is refused)")
    g.set_defaults(func=import_dcgan)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe(kind: str, files: list[str | None]) -> str:
    """What the run was imported from: the kind and each file with its sha256."""
    return f"{kind}: " + ", ".join(f"{os.path.abspath(f)} (sha256 {sha256(f)[:16]})" for f in files if f)


def finish(out: str, path: str, nets: list[str]) -> int:
    fresh = "" if "D" in nets else " (D as ganforge builds it: no discriminator was given)"
    print(f"{out}: imported {', '.join(nets)}{fresh} as {path}; use it with `ganforge sample|translate|eval "
          f"--run {out}` or checkpoint.init_from={out}")
    return 0


def import_stylegan2_ada(args: argparse.Namespace) -> int:
    from trainer.importers import check_out_dir, write_imported_run
    from trainer.importers.stylegan2_ada import from_pickle

    check_out_dir(args.out)
    overrides, weights = from_pickle(args.pkl)
    path = write_imported_run(args.out, overrides, weights, describe("stylegan2-ada network pickle", [args.pkl]))
    return finish(args.out, path, sorted(weights))


def import_cyclegan(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError
    from trainer.importers import check_out_dir, write_imported_run
    from trainer.importers.cyclegan_pix2pix import from_cyclegan

    if (args.d_a is None) != (args.d_b is None):
        raise ConfigError("--d-a" if args.d_a is None else "--d-b", "give both discriminators (--d-a and --d-b) or neither")
    if args.resolution < 4 or args.resolution % 4:
        raise ConfigError("--resolution", f"must be a positive multiple of 4 for the ResNet generator; got {args.resolution}")
    check_out_dir(args.out)
    overrides, weights = from_cyclegan(args.g_ab, args.g_ba, args.d_a, args.d_b, args.resolution)
    path = write_imported_run(args.out, overrides, weights,
                              describe("cyclegan", [args.g_ab, args.g_ba, args.d_a, args.d_b]))
    return finish(args.out, path, sorted(weights))


def import_pix2pix(args: argparse.Namespace) -> int:
    from trainer.importers import check_out_dir, write_imported_run
    from trainer.importers.cyclegan_pix2pix import from_pix2pix

    check_out_dir(args.out)
    overrides, weights = from_pix2pix(args.g, args.d, args.resolution)
    path = write_imported_run(args.out, overrides, weights, describe("pix2pix", [args.g, args.d]))
    return finish(args.out, path, sorted(weights))


def import_dcgan(args: argparse.Namespace) -> int:
    from trainer.importers import check_out_dir, write_imported_run
    from trainer.importers.dcgan import from_pytorch_examples

    check_out_dir(args.out)
    overrides, weights = from_pytorch_examples(args.g, args.d)
    path = write_imported_run(args.out, overrides, weights, describe("dcgan (pytorch/examples)", [args.g, args.d]))
    return finish(args.out, path, sorted(weights))
