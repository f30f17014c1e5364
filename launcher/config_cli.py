"""`ganforge config keys|show`: every config key with its type, default and doc; a resolved config.

The one-line doc of a key is the comment beside its field in trainer/config.py, so the
dataclasses stay the one place where a key is declared and documented.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    name: str  # dotted, as in overrides
    type: str  # the annotation, with the allowed values where the config restricts them
    default: str  # as it would be written in YAML
    doc: str


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class name, field name): the comment on the field's line} for the classes in `source`."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[(node.name, item.target.id)] = comments.get(item.end_lineno, "")
    return out


def config_keys(prefix: str = "") -> list[Key]:
    """Every config key (those starting with `prefix`), in declaration order."""
    import yaml

    from trainer import config as module

    comments = field_comments(inspect.getsource(module))
    keys: list[Key] = []

    def walk(cls: type, path: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            name = f"{path}{f.name}"
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{name}.")
                continue
            typ = str(f.type)
            if name in module.CHOICES:  # Literal[...]: the choices' type, then the choices
                choices = module.CHOICES[name]
                typ = type(choices[0]).__name__ + " (" + " | ".join(repr(c) if c == "" else str(c) for c in choices) + ")"
            text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            keys.append(Key(name, typ, text, comments.get((cls.__name__, f.name), "")))

    walk(module.Config, "")
    return [k for k in keys if k.name.startswith(prefix)]


def keys_table(keys: list[Key]) -> str:
    width = max((len(k.name) for k in keys), default=0)
    tw = max((len(k.type) for k in keys), default=0)
    return "\n".join(f"{k.name:<{width}}  {k.type:<{tw}}  {k.default:<10}  {k.doc}".rstrip() for k in keys)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list config keys, or print a recipe's resolved config")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    k = csub.add_parser("keys", help="every config key: type, default, one-line doc")
    k.add_argument("prefix", nargs="?", default="", help="only keys starting with this, e.g. train.")
    k.set_defaults(func=keys_cli)
    s = csub.add_parser("show", help="the resolved config (recipes, then overrides) as YAML")
    s.add_argument("--config", action="append", required=True,
                   help="YAML recipe; give it several times to layer files (later ones override earlier ones)")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides, applied last")
    s.set_defaults(func=show_cli)


def keys_cli(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError

    keys = config_keys(args.prefix)
    if not keys:
        raise ConfigError(args.prefix, "no config key starts with this (see `ganforge config keys`)")
    print(keys_table(keys))
    return 0


def show_cli(args: argparse.Namespace) -> int:
    import yaml

    from trainer.config import to_dict
    from trainer.families import load_config
    from trainer.redact import redact

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False), end="")  # as config.yaml records it
    return 0
