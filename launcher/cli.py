"""`ganforge` command: one subcommand per job; errors become one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from launcher import config_cli, data_cli, eval_cli, export_cli, import_cli, k8s, launch, runs_cli

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ganforge", description="Distributed GAN training from WebDataset shards.")
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import this module's FAMILIES (model families from outside ganforge; also $GANFORGE_PLUGINS)")
    sub = p.add_subparsers(dest="cmd", required=True)
    data_cli.add_parser(sub)
    launch.add_parser(sub)
    k8s.add_parser(sub)
    runs_cli.add_parser(sub)
    eval_cli.add_parser(sub)
    config_cli.add_parser(sub)
    export_cli.add_parser(sub)
    import_cli.add_parser(sub)

    t = sub.add_parser("train", help="train in this process (use `ganforge launch` for several)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (dotted key=value; `ganforge config keys PREFIX` filters):\n"
                              + config_cli.keys_table(config_cli.config_keys()))
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.set_defaults(func=train)

    s = sub.add_parser("sample", help="generate samples from a run's checkpoint")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--n", type=int, default=64, help="samples drawn with --seed (default 64)")
    s.add_argument("--seed", type=int, default=0)
    given = s.add_mutually_exclusive_group()
    given.add_argument("--z", metavar="Z.npy", help="latents from a float .npy array (N x z_dim) instead")
    given.add_argument("--seeds", metavar="A-B", help="one sample per seed (e.g. 0-9 or 1,5), latent "
                                                     "np.random.RandomState(seed).randn(z_dim) as in StyleGAN2-ADA")
    s.add_argument("--out", required=True, help="FILE.png (grid), FILE.npy (raw float32 N x C x H x W) or DIR/ "
                                                "(one PNG each: seedNNNN.png with --seeds)")
    s.add_argument("--noise-mode", choices=["const", "random", "none"], default="const",
                   help="stylegan2: per-layer noise maps: stored (const), drawn from --seed (random), or zero")
    s.add_argument("--checkpoint", help="a checkpoint file (default: the newest valid one of --run)")
    s.add_argument("--no-ema", action="store_true", help="use the raw generator instead of its EMA")
    s.add_argument("--truncation", type=float, default=1.0, metavar="PSI",
                   help="stylegan2: truncation psi, w -> w_avg + psi (w - w_avg) (default 1: none)")
    s.set_defaults(func=sample)

    tr = sub.add_parser("translate", help="translate images with a CycleGAN or pix2pix run")
    tr.add_argument("--run", required=True, help="run directory")
    tr.add_argument("--direction", choices=["AtoB", "BtoA"], default="AtoB",
                    help="AtoB: G_AB (pix2pix: its input to its target); BtoA: CycleGAN's G_BA")
    tr.add_argument("--input", required=True, help="an image file, or a folder of images (searched recursively)")
    tr.add_argument("--out", required=True, help="output folder: same names, relative paths and sizes as the inputs")
    tr.add_argument("--checkpoint", help="a checkpoint file (default: the newest valid one of --run)")
    tr.set_defaults(func=translate)

    up = sub.add_parser("upscale", help="upscale images with an esrgan (super-resolution) run")
    up.add_argument("--run", required=True, help="run directory")
    up.add_argument("--input", required=True, help="an image file, or a folder of images (searched recursively)")
    up.add_argument("--out", required=True, help="output folder: same names and relative paths, model.scale times larger")
    up.add_argument("--tile", type=int, default=0, metavar="N",
                    help="run on N x N tiles of the input (with overlapping context: no seams) to bound memory; 0: whole")
    up.add_argument("--checkpoint", help="a checkpoint file (default: the newest valid one of --run)")
    up.add_argument("--no-ema", action="store_true", help="use the raw generator instead of its EMA")
    up.set_defaults(func=upscale)

    d = sub.add_parser("demo", help="MNIST shards + a 2-process DCGAN run + a sample grid, in a few minutes")
    d.add_argument("--dir", default="runs", help="where data, runs and mlflow.db go (default runs/)")
    d.add_argument("--minutes", type=float, default=3.5, help="training time budget")
    d.add_argument("--nproc", type=int, default=0, help="processes (default: all GPUs, or 2 on CPU)")
    d.add_argument("overrides", nargs="*", help="dotted key=value overrides for the run")
    d.set_defaults(func=demo)
    return p


def train(args: argparse.Namespace) -> int:
    from trainer.main import main as train_main

    return train_main(["--config", args.config, *args.overrides])


def sample(args: argparse.Namespace) -> int:
    from data_pipeline.progress import bar
    from trainer.generate import sample_to_file

    path = sample_to_file(args.run, args.n, args.seed, args.out, args.checkpoint, use_ema=not args.no_ema,
                          truncation=args.truncation, progress=bar, z_file=args.z, seeds=args.seeds,
                          noise_mode=args.noise_mode)
    print(path)
    return 0


def translate(args: argparse.Namespace) -> int:
    from trainer.families.image_to_image import translate_path

    written = translate_path(args.run, args.direction, args.input, args.out, args.checkpoint, log=log.info)
    print(f"wrote {len(written)} images to {args.out}")
    return 0


def upscale(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError
    from trainer.families.esrgan import upscale_path

    if args.tile < 0:
        raise ConfigError("--tile", f"tile side in LR pixels, 0 for the whole image; got {args.tile}")
    written = upscale_path(args.run, args.input, args.out, args.checkpoint, args.tile, not args.no_ema, log=log.info)
    print(f"wrote {len(written)} images to {args.out}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from launcher.demo import run_demo

    return run_demo(args.dir, args.minutes, args.nproc, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before anything imports torch: --help stays fast
    if args.plugin:  # in the environment, so every process a launch starts loads them too
        from trainer.plugins import ENV

        os.environ[ENV] = ",".join(filter(None, [os.environ.get(ENV, ""), *args.plugin]))
    from trainer.logs import setup

    setup()
    from data_pipeline import DataError
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.export import ExportError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ganforge: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, ExportError) as e:
        print(f"ganforge: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
