"""The one console script, ``difflora``: dispatches to each package's ``main(argv)``.

Subcommand modules are imported lazily so ``difflora adapter info`` never imports the server or torch-heavy
training code it does not need.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "adapter": ("weights.cli:main", "inspect and convert adapter files (info, convert)"),
    "faces": ("pipeline_data.faces.cli:main", "embed photos and check identity consistency"),
    "tiny": ("pipeline_data.tiny.cli:main", "build the bundled tiny base model (pretrain)"),
    "data": ("pipeline_data.cli:main", "build and check the per-identity adapter dataset"),
    "hypernet": ("hypernet.cli:main", "train and evaluate the hypernetwork"),
    "predict": ("hypernet.cli:predict_main", "predict an adapter from photos"),
    "serve": ("service.main:serve_main", "run the HTTP service"),
    "batch": ("service.batch:main", "batch personalization without a server"),
    "db": ("service.dbcli:main", "create or upgrade the service database (upgrade, current)"),
    "keys": ("service.tenants:main", "API keys of the service's tenants (add, list)"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: difflora COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'difflora COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"difflora: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[cmd]
    mod_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(mod_name), func_name)
    except (ImportError, AttributeError) as e:
        print(f"difflora {cmd}: not available in this installation ({e})", file=sys.stderr)
        return 2
    rc = func(rest)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
