"""The ``fxmerge`` command line."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

EXIT_OK, EXIT_UNSOUND, EXIT_BAD_INPUT = 0, 1, 2


class CLIError(Exception):
    """A one-line error for the user; exit status 2."""


def _write_atomically(path: str, text: str) -> None:
    """Write all of ``text`` or nothing: a temp file renamed into place."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CLIError(f"cannot write '{path}': directory '{directory}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fxmerge-")
    except OSError as e:
        raise CLIError(f"cannot write '{path}': {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _build_model(args):
    from . import models

    if args.arch or args.checkpoint:
        if not (args.arch and args.checkpoint):
            raise models.InputError("--arch and --checkpoint go together")
        if args.model:
            raise models.InputError("give either MODEL or --arch/--checkpoint, not both")
        return models.load(args.arch, args.checkpoint), args.arch
    if not args.model:
        raise models.InputError("name a MODEL (timm name or torchvision:NAME) or give --arch and --checkpoint")
    return models.create(args.model), args.model


def cmd_groups(args) -> int:
    import torch

    from . import models
    from .analysis import analyze
    from .verify import verify

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    model, name = _build_model(args)
    model.eval()
    size = models.parse_input_size(args.input_size) if args.input_size else models.default_input_size(model)
    x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    groups = analyze(model, x, model_name=name)
    elapsed = time.perf_counter() - t0
    report = verify(model, x, groups) if args.verify else None
    if args.dot:
        _write_atomically(args.dot, to_dot(groups))
    if args.json:
        import json

        d = groups.to_dict()
        if report is not None:
            d["verified"] = report.ok
            d["unsound"] = [g.id for g in report.failing]
        print(json.dumps(d, indent=1))
    else:
        print(f"{name}: input {list(x.shape)}, analysis {elapsed:.2f}s")
        print(groups.table())
        if report is not None:
            print(report)
    if report is not None and not report.ok:
        return EXIT_UNSOUND
    return EXIT_OK


def to_dot(groups) -> str:
    """Graphviz text: groups and the parameters they permute."""
    lines = ["graph permutation_groups {", "  rankdir=LR;", "  node [fontsize=10];"]
    for g in groups.groups:
        lines.append(f'  g{g.id} [shape=box,label="#{g.id} {g.kind}\\n{g.size_label}"];')
        if g.parent is not None:
            lines.append(f"  g{g.id} -- g{g.parent} [style=dashed];")
        for p, axis in g.members:
            lines.append(f'  "{p}" [shape=ellipse];')
            lines.append(f'  g{g.id} -- "{p}" [label="{axis}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxmerge", description="Graph-IR model merging over torch.fx (PLeaS).")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("groups", help="show the permutation groups of a model")
    g.add_argument("model", nargs="?", help="timm model name or torchvision:NAME (random init)")
    g.add_argument("--arch", help="architecture of --checkpoint (timm name or torchvision:NAME)")
    g.add_argument("--checkpoint", help="state dict (.pth/.pt or .safetensors)")
    g.add_argument("--input-size", help="C,H,W (default: the model's own)")
    g.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--dot", metavar="FILE", help="also write the groups as a Graphviz file")
    g.add_argument("--verify", action="store_true", help="check every group by permuting it (exit 1 if unsound)")
    g.set_defaults(func=cmd_groups)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .models import InputError
    from .tracing import TraceError

    try:
        return args.func(args)
    except (InputError, CLIError, TraceError) as e:
        # one line: torch.fx appends the failing node and a traceback to errors
        print(f"fxmerge: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
