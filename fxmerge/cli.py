"""The ``fxmerge`` command line."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import warnings

from fxmerge import constants as C
from fxmerge.runtime.memory import keep_freed_memory
from fxmerge.errors import FxmergeError, FxmergeWarning
from fxmerge.methods import METHODS, method_names

EXIT_OK, EXIT_UNSOUND, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class CLIError(FxmergeError):
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
    from fxmerge.runtime import models

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

    from fxmerge.runtime import models
    from fxmerge.analysis.channels import analyze
    from fxmerge.analysis.verification import verify

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
        _write_atomically(args.dot, groups.to_dot())
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


def _calibration(args, size):
    """This rank's calibration batches (all of them in a single process):
    batch ``i`` of the whole set goes to rank ``i % world_size``; a folder of
    images is read only where its batches go."""
    from fxmerge.runtime import data as fxdata
    from fxmerge.runtime import distributed

    rank, world = distributed.rank(), distributed.world_size()
    if args.data in ("digits", "generic"):
        if args.data == "digits":
            x = fxdata.digits(size[-1], split="train").subset(args.calib, seed=args.seed).x
            if size[0] != 3:
                x = x[:, :1].repeat(1, size[0], 1, 1)
        else:
            x = fxdata.generic(args.calib, size[-1], seed=args.seed, channels=size[0])
        batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
        return batches[rank::world]
    files = fxdata.image_files(args.data, limit=args.calib)
    groups = [files[i:i + args.batch_size] for i in range(0, len(files), args.batch_size)]
    return [fxdata.image_folder(args.data, size[-1], files=g) for g in groups[rank::world]]


def _check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CLIError(f"cannot write '{path}': directory '{directory}' does not exist")
    if not os.access(directory, os.W_OK):
        raise CLIError(f"cannot write '{path}': directory '{directory}' is not writable")
    if os.path.isdir(path):
        raise CLIError(f"cannot write '{path}': it is a directory")


def cmd_merge(args) -> int:
    import json

    from fxmerge.runtime import distributed
    from fxmerge.runtime import models
    from fxmerge.io import save
    from fxmerge.api import merge

    _check_writable(args.output)
    distributed.init_from_env(args.device)  # under torchrun: this rank's part of the group
    device = distributed.local_device(args.device)
    checkpoints = _checkpoints(args)
    sources = [models.load(args.arch, path) for path in checkpoints]
    a = sources[0]
    size = models.parse_input_size(args.input_size) if args.input_size else models.default_input_size(a)
    batches = _calibration(args, size)
    bn_stats = "source" if args.keep_bn_stats else args.bn_stats
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FxmergeWarning)
        result = merge(sources, batches, budget=args.budget, method=args.method, labels=args.labels,
                       device=device, seed=args.seed, norm_policy=args.norm_policy, ls_inputs=args.ls_inputs,
                       ridge=args.ridge, positions=args.positions, bn_stats=bn_stats, planner=args.planner,
                       max_memory=args.max_memory, frontier_dtype=args.frontier_dtype, strict=args.strict,
                       universe=args.universe,
                       progress=not args.quiet and distributed.is_main(), shard=False)
    if not distributed.is_main():
        return EXIT_OK  # rank 0 writes the model and the report
    for w in caught:
        if issubclass(w.category, FxmergeWarning):
            print(f"fxmerge: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    result.report["arch"] = args.arch
    save(result, args.output, arch=args.arch)
    r = result.report
    if args.json:
        print(json.dumps(r, indent=1, default=float))
    else:
        print(f"{args.method} merge of {args.arch} at budget {r['budget']:.2f}x: "
              f"cost {r['cost_measured']:.3f}x (planned {r['cost_planned']:.3f}x), "
              f"{r['params_merged'] / 1e6:.2f}M parameters, {r['timings']['total']:.1f}s -> {args.output}")
    return EXIT_OK


def _checkpoints(args) -> list:
    """The source checkpoints: ``--models`` (two or more) or ``--a`` and ``--b``."""
    if args.models:
        if args.a or args.b:
            raise CLIError("give the models either as --models a.pt b.pt ... or as --a/--b, not both")
        if len(args.models) < 2:
            raise CLIError(f"--models needs at least two checkpoints, got {len(args.models)}")
        return list(args.models)
    if not (args.a and args.b):
        raise CLIError("give the models to merge: --a A.pt --b B.pt, or --models a.pt b.pt c.pt ...")
    return [args.a, args.b]


def cmd_demo(args) -> int:
    import torch

    from fxmerge.demo import default_runs, format_table, run_demo

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    budgets = _parse_budgets(args.budgets)
    print(f"fxmerge demo: {args.arch} on digits, model A = digits 0-4 (seed 0), model B = digits 5-9 (seed 1); "
          f"calibration: {args.calib} {args.data} images")
    try:
        runs = default_runs(budgets, [m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as e:
        raise CLIError(str(e)) from None
    rows = run_demo(args.arch, budgets=budgets, device=args.device, calib=args.calib, data=args.data,
                    runs=runs, norm_policy=args.norm_policy, bn_stats="source" if args.keep_bn_stats else None, log=print,
                    progress=False)
    print()
    print(format_table(rows))
    return EXIT_OK


def _parse_budgets(text: str) -> list:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--budgets must be comma-separated numbers, got '{text}'") from None
    bad = [v for v in vals if not 1.0 <= v <= 2.0]
    if not vals or bad:
        raise CLIError(f"budgets must lie in [1, 2], got '{text}'")
    return vals


KEEP_BN_STATS_HELP = ("keep the source models' BatchNorm statistics (laid out by the permutation) instead of "
                      "re-estimating them on the calibration data; use it when that data is not the models' own "
                      "(--data generic, PLeaS-free)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, like every bad input)."""

    def error(self, message):
        raise CLIError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fxmerge", description="Graph-IR model merging over torch.fx (PLeaS).")
    p.add_argument("--version", action="version", version=f"fxmerge {C.VERSION}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
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

    m = sub.add_parser("merge", help="merge two checkpoints of one architecture")
    m.add_argument("--arch", required=True, help="architecture (timm name or torchvision:NAME)")
    m.add_argument("--a", metavar="CKPT", help="model A's state dict")
    m.add_argument("--b", metavar="CKPT", help="model B's state dict")
    m.add_argument("--models", nargs="+", metavar="CKPT",
                   help="two or more state dicts to merge (instead of --a/--b); the budget then lies in [1, N]")
    m.add_argument("--universe", default=C.DEFAULT_UNIVERSE, choices=C.UNIVERSES,
                   help="more than two models: aligned to model A's order (reference) or re-aligned to the mean of "
                        f"all (mean; default {C.DEFAULT_UNIVERSE})")
    m.add_argument("--data", default="digits", help="calibration data: digits, generic or a folder of images (default digits)")
    m.add_argument("--calib", type=int, default=512, help="number of calibration images (default 512)")
    m.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default 64)")
    m.add_argument("--budget", type=float, default=1.0, help="cost of the merged model, x one source model, in [1, N] for N models")
    m.add_argument("--method", default=C.DEFAULT_METHOD, choices=method_names(),
                   help=f"merging method (default {C.DEFAULT_METHOD}): " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    m.add_argument("--norm-policy", default=C.DEFAULT_NORM_POLICY, choices=C.NORM_POLICIES,
                   help="features a LayerNorm normalises: split (widen them, per-model statistics) or merged (keep them "
                   f"merged) (default {C.DEFAULT_NORM_POLICY})")
    m.add_argument("--ls-inputs", default=C.DEFAULT_LS_INPUTS, choices=C.LS_INPUTS,
                   help="least-squares inputs: merged (the merged model's own) or ensemble (teacher forcing) "
                   f"(default {C.DEFAULT_LS_INPUTS})")
    m.add_argument("--ridge", type=float, default=C.DEFAULT_RIDGE,
                   help=f"least-squares ridge toward the permuted weights (default {C.DEFAULT_RIDGE:g})")
    m.add_argument("--positions", type=int, default=C.DEFAULT_POSITIONS, help="spatial positions (tokens) sampled per "
                   "image for the statistics; fewer is faster, the least-squares systems of wide layers want more; 0 "
                   f"keeps all (default {C.DEFAULT_POSITIONS})")
    m.add_argument("--bn-stats", default=None, choices=C.BN_STATS,
                   help="BatchNorm statistics of the merged model: sweep (re-estimated on its own activations while "
                   "the layers are fitted), reset (once, after fitting) or source (the sources' own) (default: "
                   + ", ".join(f"{m.bn_stats} for {m.name}" for m in METHODS.values() if m.bn_stats) + ")")
    m.add_argument("--keep-bn-stats", action="store_true", help=KEEP_BN_STATS_HELP + " (same as --bn-stats source)")
    m.add_argument("--planner", default=C.DEFAULT_PLANNER, choices=C.PLANNER_SCORES,
                   help="what the budget planner counts when it un-merges a pair: its disagreement (pairs), that "
                   "times the layers reading its group (reach), residual streams first (residual), or residual "
                   f"streams first where a LayerNorm normalises them (auto) (default {C.DEFAULT_PLANNER})")
    m.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory for the fitting sweep's frontier, statistics and solves, such as 2G or 512M; beyond it the "
                   f"frontier spills to a temporary directory (default {C.DEFAULT_MEMORY_SHARE * 100:.0f}%% of the memory "
                   "available at the start)")
    m.add_argument("--frontier-dtype", default="float32", choices=C.FRONTIER_DTYPES,
                   help="precision the frontier is stored in between sweep waves (default float32)")
    m.add_argument("--strict", action="store_true", help="exit 2 instead of warning when the budget cannot be reached "
                   "or most weights cannot be permuted")
    m.add_argument("--labels", default="shared", choices=C.LABELS, help="shared head or both heads")
    m.add_argument("--input-size", help="C,H,W (default: the model's own)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("-o", "--output", required=True, help="where to write the merged model (.pt)")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("demo", help="train two small models on digits and compare every merging method")
    d.add_argument("--arch", default="resnet", choices=C.DEMO_ARCHS,
                   help="resnet (half-width ResNet-18), vit (timm ViT) or torch-vit (the same ViT written with "
                   "nn.TransformerEncoder) (default resnet)")
    d.add_argument("--budgets", default="1,1.2,1.5,2", help="comma-separated budgets (default 1,1.2,1.5,2)")
    d.add_argument("--calib", type=int, default=512, help="calibration images (default 512)")
    d.add_argument("--data", default="digits", choices=("digits", "generic"), help="calibration source")
    d.add_argument("--methods", default=",".join(method_names()), help="comma-separated methods (default: all)")
    d.add_argument("--norm-policy", default=C.DEFAULT_NORM_POLICY, choices=C.NORM_POLICIES,
                   help=f"LayerNorm policy for ViTs (default {C.DEFAULT_NORM_POLICY})")
    d.add_argument("--keep-bn-stats", action="store_true", help=KEEP_BN_STATS_HELP)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # temporary files are removed on the way out


def main(argv=None) -> int:
    if argv is None and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt)  # the command line: a kill cleans up like Ctrl-C
    if argv is None:  # the command line, not a test calling main(): see fxmerge/runtime/memory.py
        keep_freed_memory()
    code = None  # stays None while an unexpected error propagates (its traceback is printed)
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
    except FxmergeError as e:
        # one line: torch.fx appends the failing node and a traceback to errors
        print(f"fxmerge: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fxmerge: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        if "torch.distributed" in sys.modules:
            from fxmerge.runtime.distributed import available, shutdown

            grouped = available()
            shutdown()
            if grouped and argv is None and code is not None:
                _exit_now(code)
    return code


def _exit_now(code) -> None:
    """End a rank of a process group here, its files closed and its
    temporary files removed: the interpreter's own teardown would destroy
    the distributed runtime's C++ objects, whose threads now and then abort
    the process (SIGABRT, "terminate called without an active exception")
    after the rank has finished cleanly."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


if __name__ == "__main__":
    sys.exit(main())
