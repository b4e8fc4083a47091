"""``regpipe-bench``: every method on every image pair, one table (see :mod:`regpipe.bench`).

Pairs come from a file (``--pairs``: YAML, JSON or CSV) or from the development set of a
shared data folder (``--dev-set``). Results go to ``--output``: ``results.json`` and
``results.csv`` (one row per pair and method, written after each), ``results.md`` (means
± SD per method, every pair, failures), ``dice_boxplot.png``, ``runtime_vs_dice.png``,
``tre_boxplot.png`` and ``pairs.json`` (the pairs used, reusable with ``--pairs``).

Exit codes: 0 every method succeeded on every pair; 1 at least one failed (the others ran) or
an input error (one line on stderr); 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from regpipe.cli._common import (
    network_passes_argument,
    region_argument,
    run_cli,
    smoothness_argument,
)
from regpipe.errors import InputError

LOGGER = logging.getLogger("regpipe.bench")
DEFAULT_METHODS = "ours,ours+io,ants-syn"


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe-bench",
        description="Benchmark our network (with and without instance optimisation), our "
        "affine and ANTs on image pairs: Dice, HD95, TRE, folding, SD log J, runtime, memory.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, metavar="FILE",
                        help="pairs file (.yaml/.json/.csv): fixed, moving, fixed_labels, "
                        "moving_labels, fixed_landmarks, moving_landmarks (.fcsv), modality, "
                        "mask, labels, name, subset")
    source.add_argument("--dev-set", type=Path, metavar="SHARED_DATA",
                        help="build the development set from this shared data folder")
    parser.add_argument("--subset", default="all", choices=["brain", "synth", "ood", "all"],
                        help="development subset (default all)")
    parser.add_argument("--n-pairs", type=_positive, metavar="N",
                        help="at most N pairs per development subset (default all)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list of identity, affine, ours, ours+io, ants-affine, "
                        f"ants-syn, ants-synquick (default {DEFAULT_METHODS})")
    parser.add_argument("--weights", default="default",
                        help="network weights of ours/ours+io: default, a registry name, a "
                        "checkpoint file, or none (affine + fast instance optimisation)")
    parser.add_argument("--region", type=region_argument,
                        help="conditional weights: body region of the condition (default "
                        "other, as for regpipe-register)")
    parser.add_argument("--pair-type", type=str.lower, choices=["inter", "intra"],
                        help="conditional weights: inter (default) or intra")
    parser.add_argument("--smoothness", type=smoothness_argument, metavar="LAM",
                        help="conditional weights: regularisation weight lam (default 1.5)")
    parser.add_argument("--no-symmetric", dest="symmetric", action="store_false",
                        help="one network pass for ours/ours+io (default: the two-pass "
                        "symmetric estimate, as regpipe-register)")
    parser.add_argument("--network-passes", type=network_passes_argument, default=1, metavar="N",
                        help="apply the network N times for ours/ours+io (default 1, as "
                        "regpipe-register)")
    parser.add_argument("--io-iterations", type=_positive, default=50, metavar="N",
                        help="fast instance-optimisation steps of ours+io (default 50)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="CPU threads for PyTorch (default: PyTorch's)")
    parser.add_argument("--ants-threads", type=_positive, metavar="N",
                        help="run ANTs on N threads without a seed (faster, not reproducible); "
                        "default: seeded, one thread")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--output", "-o", type=Path, required=True, metavar="DIR",
                        help="output folder")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="where the development set's derived images go "
                        "(default OUTPUT/cache)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the successful rows of results.json that match the current "
                       "settings and run only the rest (failed rows are retried)")
    again.add_argument("--overwrite", action="store_true",
                       help="discard the results already in OUTPUT")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def _check_conditional(methods) -> None:
    """--region/--pair-type/--smoothness need conditional weights (before any work)."""
    from regpipe.networks.checkpoint import is_conditional_file

    for method in methods:
        if not method.condition():
            continue
        if method.weights is None or not is_conditional_file(method.weights):
            raise InputError(f"--region, --pair-type and --smoothness steer a conditional "
                             f"network; {method.name} has {method.weights or 'no network'}, "
                             "which is not conditional")


def _main(args: argparse.Namespace) -> int:
    from regpipe.bench import (
        RESULTS_JSON,
        check_pair_names,
        parse_methods,
        read_pairs,
        resolve_method_weights,
        run_benchmark,
        write_pairs,
    )
    from regpipe.bench_pairs import check_pair_files
    from regpipe.bench_report import write_report

    output: Path = args.output
    if (output / RESULTS_JSON).is_file() and not (args.resume or args.overwrite):
        raise InputError(f"{output} already holds results: pass --resume to continue them "
                         "or --overwrite to start again")
    if args.pairs is not None and (args.n_pairs is not None or args.subset != "all"):
        raise InputError("--subset and --n-pairs apply to --dev-set only")
    condition = {"region": args.region, "pair_type": args.pair_type,
                 "smoothness": args.smoothness}
    methods = parse_methods(args.methods, weights=args.weights,
                            io_iterations=args.io_iterations, condition=condition,
                            symmetric=args.symmetric, network_passes=args.network_passes)
    methods = resolve_method_weights(methods)
    if any(value is not None for value in condition.values()):
        _check_conditional(methods)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {output}: {error}") from None
    if args.pairs is not None:
        pairs = read_pairs(args.pairs)
    else:
        from regpipe.devset import build_dev_set

        LOGGER.info("building the development set (%s) from %s", args.subset, args.dev_set)
        pairs = build_dev_set(args.dev_set, args.cache or output / "cache", args.subset,
                              args.n_pairs)
    check_pair_names(pairs)
    check_pair_files(pairs)  # a missing file fails now, not at pair 37 hours later
    if args.overwrite:  # only now: a bad --pairs must not cost the previous results
        (output / RESULTS_JSON).unlink(missing_ok=True)
    write_pairs(pairs, output / "pairs.json")
    LOGGER.info("%d pair(s) x %d method(s): %s", len(pairs), len(methods),
                ", ".join(m.name for m in methods))
    current = {(p.name, m.name) for p in pairs for m in methods}
    try:
        rows = run_benchmark(pairs, methods, output, seed=args.seed, threads=args.threads,
                             ants_threads=args.ants_threads, device=args.device,
                             resume=args.resume)
    except KeyboardInterrupt as stop:  # report what is done; --resume continues from there
        done = list(getattr(stop, "rows", []))
        if done:
            report = write_report(done, output)
            print(f"regpipe-bench: interrupted after {len(done)} of {len(current)} result(s); "
                  f"partial report {report}; continue with --resume", file=sys.stderr)
        raise
    others = [r for r in rows if (r["pair"], r["method"]) not in current]
    if others:
        LOGGER.warning("%d row(s) of other pairs or methods from earlier runs stay in %s but "
                       "not in the report", len(others), output / RESULTS_JSON)
    report = write_report([r for r in rows if (r["pair"], r["method"]) in current], output)
    failed = [r for r in rows if r.get("status") != "ok" and (r["pair"], r["method"]) in current]
    print(f"regpipe-bench: {len(current) - len(failed)} result(s), {len(failed)} failure(s); "
          f"report {report}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
