"""``difflora faces``: embed photos and check identity consistency.

    difflora faces embed PHOTO... [--backend dlib|insightface] [--model-dir DIR] [--recognizer torch|dlib] [--json]
    difflora faces check DIR [--backend ...] [--recognizer ...] [--json] [--max-photos N] [--no-progress]

``embed`` prints one JSON object per photo and one for the identity with ``--json`` (else a table); it exits 1 when
any photo gave no embedding. ``check`` reports each identity sub-folder of DIR (photos, failed, outliers,
consistency) with a progress bar; it exits 0 when it ran. Bad input: a one-line message on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline_data.cliargs import nonnegative_int
from pipeline_data.faces import BACKENDS, BackendUnavailableError, get_encoder
from pipeline_data.faces.dlib_backend import RECOGNIZERS
from pipeline_data.faces.identity import build_identity
from pipeline_data.photos import list_photos


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise _ArgError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="difflora faces", description="Face detection, embedding and identity consistency.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name, help_ in (("embed", "embed photos of one person"), ("check", "check identity folders")):
        s = sub.add_parser(name, help=help_, description=help_)
        if name == "embed":
            s.add_argument("photos", nargs="+", type=Path, help="photo files (one person)")
        else:
            s.add_argument("dir", type=Path, help="folder of identity sub-folders (or one folder of photos)")
            s.add_argument("--max-photos", type=nonnegative_int, default=0, help="photos per identity (0 = all)")
            s.add_argument("--no-progress", action="store_true", help="no progress bar")
        s.add_argument("--backend", choices=sorted(BACKENDS), default="dlib", help="face backend (default dlib)")
        s.add_argument("--model-dir", type=Path, default=None, help="backend model folder (insightface pack)")
        s.add_argument(
            "--recognizer", choices=RECOGNIZERS, default=None,
            help="dlib backend's descriptor net: torch (default; the PyTorch port, same descriptors, faster) or "
            "dlib (dlib's own)",
        )  # fmt: skip
        s.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return p


def _encoder(args):
    kw = {} if args.model_dir is None else {"model_dir": args.model_dir}
    if args.recognizer is not None:
        if args.backend != "dlib":
            raise _ArgError(f"difflora faces {args.cmd}: --recognizer applies to the dlib backend, not {args.backend}")
        kw["recognizer"] = args.recognizer
    return get_encoder(args.backend, **kw)


def _label(enc) -> str:
    """``dlib (torch net)`` / ``insightface``: the backend, and the dlib backend's descriptor net."""
    rec = getattr(enc, "recognizer", None)
    return enc.name if rec is None else f"{enc.name} ({rec} net)"


def _embed(args) -> int:
    folders = [str(p) for p in args.photos if p.is_dir()]
    if folders:
        raise _ArgError(
            f"difflora faces embed: {', '.join(folders)}: is a folder, not a photo "
            "(give its photos, or use `difflora faces check` for a folder)"
        )
    missing = [str(p) for p in args.photos if not p.is_file()]
    if missing:
        raise _ArgError(f"difflora faces embed: no such file: {', '.join(missing)}")
    enc = _encoder(args)
    ident = build_identity(enc, list(args.photos), names=[str(p) for p in args.photos])
    if args.json:
        for ph in ident.photos:
            print(json.dumps({"type": "photo", **ph.to_dict(embedding=True)}))
        print(json.dumps(ident.to_dict(embedding=True)))
    else:
        for ph in ident.photos:
            if ph.ok:
                r = ph.result
                box = ",".join(f"{v:.0f}" for v in r.face.box)
                status = f"outlier: {ph.reason}" if ph.outlier else "ok"
                extra = f"  ({'; '.join(r.warnings)})" if r.warnings else ""
                print(f"{ph.name}: face [{box}] score {r.face.score:.2f}, {status}{extra}")
        if ident.embedding is not None:
            print(
                f"identity: {len(ident.inliers)} of {len(ident.photos)} photos used, consistency "
                f"{ident.consistency:.3f} ({_label(enc)}, threshold {enc.threshold:.3f})"
                + ("" if ident.consistent else ", NOT consistent")
            )
    for ph in ident.photos:
        if not ph.ok:
            msg = ph.error if ph.error.startswith(ph.name) else f"{ph.name}: {ph.error}"
            print(f"difflora faces embed: {msg} [{ph.error_code}]", file=sys.stderr)
    return 1 if ident.failed else 0


def _check(args) -> int:
    from tqdm import tqdm

    root: Path = args.dir
    if not root.is_dir():
        raise _ArgError(f"difflora faces check: not a directory: {root}")
    groups = [(d.name, list_photos(d)) for d in sorted(root.iterdir()) if d.is_dir()]
    groups = [(n, ps) for n, ps in groups if ps]
    if not groups and list_photos(root):
        groups = [(root.name, list_photos(root))]
    if not groups:
        raise _ArgError(f"difflora faces check: no photos in {root} or its sub-folders")
    if args.max_photos > 0:
        groups = [(n, ps[: args.max_photos]) for n, ps in groups]
    enc = _encoder(args)
    total = sum(len(ps) for _, ps in groups)
    bar = tqdm(total=total, unit="photo", disable=args.no_progress, file=sys.stderr, desc="faces check")
    reports = []
    for name, ps in groups:
        results = []
        for p in ps:
            results.extend(enc.embed_many([p], errors="return"))
            bar.update(1)
        ident = build_identity(enc, ps, results=results)
        reports.append((name, ident))
    bar.close()
    n_out = sum(len(i.outliers) for _, i in reports)
    n_fail = sum(len(i.failed) for _, i in reports)
    if args.json:
        for name, ident in reports:
            print(json.dumps({"identity": name, **ident.to_dict(embedding=False)}))
    else:
        w = max(len(n) for n, _ in reports)
        print(f"{'identity'.ljust(w)}  photos  failed  outliers  consistency")
        for name, ident in reports:
            flag = "" if ident.consistent else "  !"
            print(
                f"{name.ljust(w)}  {len(ident.photos):6d}  {len(ident.failed):6d}  {len(ident.outliers):8d}  "
                f"{ident.consistency:11.3f}{flag}"
            )
            for i in ident.outliers:
                print(f"{''.ljust(w)}    outlier {ident.photos[i].name}: {ident.photos[i].reason}")
    print(
        f"{len(reports)} identities, {total} photos: {n_fail} without a face embedding, {n_out} outliers, "
        f"{sum(not i.consistent for _, i in reports)} inconsistent ({_label(enc)}, threshold {enc.threshold:.3f})",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``difflora faces``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        return _embed(args) if args.cmd == "embed" else _check(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except _ArgError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (BackendUnavailableError, ValueError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"difflora faces: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflora faces: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
