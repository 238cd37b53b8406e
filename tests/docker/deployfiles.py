"""Small readers for the deployment files: Dockerfile instructions and compose variable interpolation.

Enough of the Dockerfile grammar for our files: comments, line continuations, JSON (exec) and shell forms,
``ENV k=v ...``, ``ARG`` defaults in ``FROM``, stages, ``HEALTHCHECK [options] CMD ...``.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    op: str  # upper-case instruction ("RUN", "ENV", ...)
    args: str  # the rest of the (joined) line
    line: int  # 1-based line of the instruction

    def argv(self) -> list[str]:
        """Exec form (JSON array) or shell form split like a shell would."""
        a = self.args.strip()
        if a.startswith("["):
            value = json.loads(a)
            if not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                raise ValueError(f"line {self.line}: {self.op} JSON form must be a list of strings")
            return value
        return shlex.split(a)


@dataclass
class Stage:
    base: str  # FROM image with global ARG defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]

    def last(self, op: str) -> Instruction | None:
        found = self.all(op)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, later ones win (``ENV K=V K2=V2`` and the legacy ``ENV K V``)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            parts = shlex.split(ins.args)
            if parts and "=" not in parts[0]:
                out[parts[0]] = " ".join(parts[1:])
                continue
            for p in parts:
                k, _, v = p.partition("=")
                out[k] = v
        return out

    def volumes(self) -> list[str]:
        vols: list[str] = []
        for ins in self.all("VOLUME"):
            vols += ins.argv()
        return vols

    def workdir(self) -> str:
        wd = "/"
        for ins in self.all("WORKDIR"):
            wd = ins.args.strip() if ins.args.strip().startswith("/") else f"{wd.rstrip('/')}/{ins.args.strip()}"
        return wd


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def command(self) -> list[str]:
        """ENTRYPOINT + CMD of the final stage (the command the container runs)."""
        ep, cmd = self.final.last("ENTRYPOINT"), self.final.last("CMD")
        return (ep.argv() if ep else []) + (cmd.argv() if cmd else [])


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) per instruction; comment lines dropped, also inside continuations."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if not buf:
            start = n
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        out.append((start, buf + s))
        buf = ""
    if buf:
        raise ValueError(f"line continuation at the end of the file (from line {start})")
    return out


def _subst(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: str | Path) -> Dockerfile:
    path = Path(path)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in _logical_lines(path.read_text()):
        op, _, rest = text.partition(" ")
        ins = Instruction(op.upper(), rest.strip(), line)
        if ins.op == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(_subst(parts[0], global_args), name))
        elif not stages:
            if ins.op != "ARG":
                raise ValueError(f"{path}:{line}: only ARG may come before the first FROM, got {ins.op}")
            k, _, v = ins.args.partition("=")
            global_args[k.strip()] = v.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise ValueError(f"{path}: no FROM")
    return Dockerfile(path, global_args, stages)


def healthcheck_command(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """HEALTHCHECK ``--opt=value ... CMD <exec or shell form>`` -> (options, argv)."""
    opts: dict[str, str] = {}
    rest = ins.args
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        k, _, v = opt[2:].partition("=")
        opts[k] = v
        rest = rest.strip()
    kw, _, cmd = rest.partition(" ")
    if kw.upper() != "CMD":
        raise ValueError(f"line {ins.line}: HEALTHCHECK without CMD")
    return opts, Instruction("CMD", cmd.strip(), ins.line).argv()


_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$(\w+)")


class MissingVariableError(KeyError):
    """A ``${VAR:?message}`` variable is unset (compose refuses to start)."""


def interpolate(value, env: dict[str, str], seen: set[str] | None = None):
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}`` in every string of a
    loaded YAML document. ``seen`` collects the variable names referenced."""
    seen = set() if seen is None else seen
    if isinstance(value, dict):
        return {k: interpolate(v, env, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, seen) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        seen.add(name)
        op, arg = m.group(2), m.group(3)
        cur = env.get(name)
        if op in (":-", "-"):
            unset = cur is None or (op == ":-" and cur == "")
            return interpolate(arg, env, seen) if unset else cur
        if op in (":?", "?"):
            if cur is None or (op == ":?" and cur == ""):
                raise MissingVariableError(f"{name}: {arg}")
            return cur
        return cur or ""

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def parse_volume(spec: str) -> tuple[str, str, bool]:
    """Compose short volume syntax ``source:target[:mode]`` -> (source, target, read_only)."""
    parts = spec.split(":")
    if len(parts) == 1:
        return "", parts[0], False
    mode = parts[2] if len(parts) > 2 else "rw"
    return parts[0], parts[1], "ro" in mode.split(",")
