"""Benchmark: every method on every image pair, evaluated by the same code, in one run.

A :class:`~regpipe.bench_pairs.PairSpec` names a fixed and a moving image with optional label
maps, landmark files (``.fcsv``) and a mask; a :class:`MethodSpec` names a method: our network with
or without instance optimisation (``ours``, ``ours+io``), our affine alone (``affine``), no
registration (``identity``), or ANTs (``ants-affine``, ``ants-syn``, ``ants-synquick``).
:func:`run_benchmark` runs each method on each pair, times it
(:func:`~regpipe.resources.measure_resources`),
evaluates its forward transform with :func:`regpipe.evaluation.evaluate_transform` and writes
one row per pair and method to ``results.json`` and ``results.csv`` after every row, so an
interrupted run resumes where it stopped (``resume=True``). A method that fails on a pair
becomes an error row and the run goes on. :mod:`regpipe.bench_report` then writes the
markdown table and the plots.

Example
-------
>>> pairs = [PairSpec("s1", "fixed.nii.gz", "moving.nii.gz",
...                   fixed_labels="fixed_aseg.nii.gz", moving_labels="moving_aseg.nii.gz")]
>>> rows = run_benchmark(pairs, parse_methods("affine,ants-syn"), "bench_out")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from regpipe.atomic import atomic_write
from regpipe.bench_pairs import LoadedPair, PairSpec, load_pair, read_pairs, write_pairs
from regpipe.errors import InputError, RegpipeError
from regpipe.evaluation import evaluate_transform

__all__ = [
    "METHOD_NAMES", "MethodSpec", "PairSpec", "load_pair", "parse_methods", "read_pairs",
    "read_results", "resolve_method_weights", "run_benchmark", "run_method", "write_pairs",
    "write_results",
]

LOGGER = logging.getLogger("regpipe.bench")

#: Method names understood by :func:`parse_methods`.
METHOD_NAMES = ("identity", "affine", "ours", "ours+io", "ants-affine", "ants-syn",
                "ants-synquick")
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
PAIRS_JSON = "pairs.json"


@dataclass(frozen=True)
class MethodSpec:
    """A method: ``kind`` is ``identity``, ``ours`` (``regpipe.register``; ``weights=None``
    with ``io_iterations=0`` is our affine alone) or ``ants`` (``ants_method`` ``affine``,
    ``syn`` or ``synquick``); ``name`` labels it in the tables."""

    name: str
    kind: str
    weights: str | None = None
    io_iterations: int = 0
    ants_method: str | None = None
    #: the condition of conditional weights (``None``: registration's default)
    region: str | None = None
    pair_type: str | None = None
    smoothness: float | None = None
    #: the network's two-pass symmetric estimate (``regpipe.register(symmetric=...)``)
    symmetric: bool = True
    #: network passes (``regpipe.register(network_passes=...)``)
    network_passes: int = 1

    def config(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self).items()
                  if k != "name" and not (k in _CONDITION_KEYS and v is None)}
        if self.kind != "ours" or self.weights is None:
            config.pop("symmetric")  # nothing to symmetrise
        if self.kind != "ours" or self.weights is None or self.network_passes == 1:
            config.pop("network_passes")  # rows of earlier runs (one pass) stay resumable
        return config

    def condition(self) -> dict[str, Any]:
        """The condition options given (keyword arguments of :func:`regpipe.register`)."""
        return {k: getattr(self, k) for k in _CONDITION_KEYS if getattr(self, k) is not None}


_CONDITION_KEYS = ("region", "pair_type", "smoothness")


def parse_methods(text: str | Sequence[str], *, weights: str | None = "default",
                  io_iterations: int = 50, condition: Mapping[str, Any] | None = None,
                  symmetric: bool = True, network_passes: int = 1) -> list[MethodSpec]:
    """Method specs from names (a comma list or a sequence; see :data:`METHOD_NAMES`).

    ``weights`` (a registry name, a file, ``"default"`` or ``None``/``"none"`` for no network),
    ``io_iterations`` (fast instance optimisation steps of ``ours+io``) and ``condition``
    (``region``, ``pair_type``, ``smoothness`` of conditional weights) apply to ``ours`` and
    ``ours+io``.
    """
    condition = {k: v for k, v in (condition or {}).items() if v is not None}
    if set(condition) - set(_CONDITION_KEYS):
        raise InputError(f"unknown condition keys {sorted(set(condition) - set(_CONDITION_KEYS))}")
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise InputError("no method given")
    if str(weights).lower() == "none":
        weights = None
    if io_iterations < 1 and "ours+io" in names:
        raise InputError("ours+io needs io iterations >= 1")
    if network_passes > 1 and weights is None and {"ours", "ours+io"} & set(names):
        raise InputError("network passes > 1 need a network: --weights none has none")
    methods = []
    for name in dict.fromkeys(names):
        if name == "identity":
            methods.append(MethodSpec(name, "identity"))
        elif name == "affine":
            methods.append(MethodSpec(name, "ours"))
        elif name in ("ours", "ours+io"):
            steps = io_iterations if name == "ours+io" else 0
            methods.append(MethodSpec(name, "ours", weights, steps, **condition,
                                      symmetric=symmetric, network_passes=network_passes))
        elif name.startswith("ants-") and name[5:] in ("affine", "syn", "synquick"):
            methods.append(MethodSpec(name, "ants", ants_method=name[5:]))
        else:
            raise InputError(f"unknown method {name!r}: choose from {', '.join(METHOD_NAMES)}")
    return methods


def resolve_method_weights(methods: Sequence[MethodSpec]) -> list[MethodSpec]:
    """The methods with their weights resolved to files (``"default"`` and registry names
    included), so results record, and ``resume`` compares, the file actually used.

    Raises
    ------
    WeightsError
        Before any work, when weights are not available offline.
    """
    from dataclasses import replace

    from regpipe.weights import default_weights_name, resolve_weights

    out = []
    for method in methods:
        if method.kind == "ours" and method.weights is not None:
            name = default_weights_name() if method.weights == "default" else method.weights
            method = replace(method, weights=str(Path(resolve_weights(name)).absolute()))
        out.append(method)
    return out


def run_method(method: MethodSpec, pair: LoadedPair, *, seed: int | None = 0,
               threads: int | None = None, ants_threads: int | None = None,
               device: str = "auto") -> dict[str, Any]:
    """Register ``pair`` with ``method`` and evaluate it: one result row (without the keys
    ``pair``, ``subset``, ``method`` and ``status``)."""
    import time

    from regpipe.resources import measure_resources
    from regpipe.transforms import AffineTransform
    from regpipe.warp import warp_array

    spec = pair.spec
    settings: dict[str, Any] = {"seed": seed, "threads": threads, **method.config()}
    with measure_resources() as usage:
        if method.kind == "identity":  # no registration: the warped image is made below
            forward: Any = AffineTransform.identity()
            warped, extra = None, {}
        elif method.kind == "ours":
            from regpipe.registration import register

            result = register(
                pair.fixed, pair.moving, fixed_modality=spec.fixed_modality,
                moving_modality=spec.moving_modality, weights=method.weights, affine="ours",
                io_iterations=method.io_iterations, io_method="fast", device=device,
                threads=threads, seed=seed, progress=False, evaluate=False,
                symmetric=method.symmetric, network_passes=method.network_passes,
                **method.condition(),
            )
            forward, warped, extra = result.forward, result.warped.data, result.metrics
            settings.update(weights_file=result.settings.get("weights"),
                            condition=result.settings.get("condition"),
                            symmetric=result.settings.get("symmetric"),
                            network_passes=result.settings.get("network_passes"),
                            grid_shape=result.settings.get("grid_shape"),
                            grid_mode=result.settings.get("grid_mode"),
                            device=result.settings.get("device"))
        elif method.kind == "ants":
            from regpipe.ants_methods import ants_register

            deterministic = ants_threads is None
            result = ants_register(
                pair.fixed, pair.moving, method=method.ants_method,  # type: ignore[arg-type]
                fixed_modality=spec.fixed_modality, moving_modality=spec.moving_modality,
                seed=seed if deterministic else None,
                threads=None if deterministic else ants_threads, evaluate=False,
            )
            forward, warped, extra = result.forward, result.warped.data, result.metrics
            settings.update(threads=result.settings.get("threads"),
                            deterministic=result.settings.get("deterministic"),
                            ants_version=result.settings.get("ants_version"))
        else:
            raise InputError(f"unknown method kind {method.kind!r}")
    row: dict[str, Any] = {
        "runtime_s": usage.runtime_s,
        "peak_memory_mb": max(usage.peak_memory_mb,
                              float(extra.get("ants_process_peak_memory_mb", 0.0))),
    }
    started = time.perf_counter()
    if warped is None:
        warped = warp_array(pair.moving.data.astype(np.float32), pair.moving.geometry,
                            forward, pair.fixed.geometry)
    row.update(evaluate_transform(
        forward, pair.fixed.geometry, region=pair.region,
        fixed_labels=None if pair.moving_labels is None or pair.fixed_labels is None
        else pair.fixed_labels.data,
        moving_labels=None if pair.moving_labels is None or pair.fixed_labels is None
        else (pair.moving_labels.data, pair.moving_labels.geometry),
        labels=spec.labels,
        fixed_points=None if pair.landmarks is None else pair.landmarks[0],
        moving_points=None if pair.landmarks is None else pair.landmarks[1],
        fixed_image=pair.fixed.data, warped_image=warped,
    ))
    row["evaluation_s"] = time.perf_counter() - started
    row["settings"] = settings
    return row


# --------------------------------------------------------------------------- the run


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["pair"]), str(row["method"])


def _config(pair: PairSpec, method: MethodSpec, seed: int | None,
            run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must match for a stored row to count as done (``resume``): the pair, the method's
    settings, the seed and how it ran (threads, device, ANTs threads: they change the times
    and, for ANTs, the result)."""
    return json.loads(json.dumps({"pair": pair.to_dict(), "method": method.config(),
                                  "seed": seed, **(run or {})}))


class BenchmarkInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_benchmark`: ``rows`` are this run's valid results so far (the
    kept ones and those computed), not stored rows of other settings about to be redone."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows = rows


def read_results(output: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``output/results.json`` (empty when there is none)."""
    path = Path(output) / RESULTS_JSON
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(
            f"{path} is not valid JSON ({error}); move it away to start anew"
        ) from error
    return list(data.get("rows", []) if isinstance(data, dict) else data)


def write_results(rows: Sequence[dict[str, Any]], output: str | os.PathLike,
                  current: Sequence[dict[str, Any]] | None = None) -> None:
    """Write ``results.json`` (every row) and ``results.csv`` (the ``current`` rows, default
    all: scalars, Dice and HD95 per label flattened to ``dice_<label>`` / ``hd95_<label>``),
    each atomically."""
    from regpipe import __version__
    from regpipe.bench_report import csv_text

    output = Path(output)
    text = json.dumps({"regpipe_version": __version__, "rows": list(rows)}, indent=1,
                      default=_json_default)
    atomic_write(output / RESULTS_JSON, lambda tmp: tmp.write_text(text + "\n"))
    table = csv_text(list(rows if current is None else current))
    atomic_write(output / RESULTS_CSV, lambda tmp: tmp.write_text(table))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def run_benchmark(
    pairs: Sequence[PairSpec],
    methods: Sequence[MethodSpec],
    output: str | os.PathLike,
    *,
    seed: int | None = 0,
    threads: int | None = None,
    ants_threads: int | None = None,
    device: str = "auto",
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run every method on every pair; returns all rows (also those kept from a previous
    run with ``resume``), written to ``output`` after each one.

    With ``resume``, a stored successful row of the same pair, method, settings and seed is
    kept and not recomputed; error rows are retried. ``ants_threads`` runs ANTs multithreaded
    and without a seed (faster, not reproducible); by default ANTs runs seeded on one thread.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    check_pair_names(pairs)
    stored = {_row_key(r): r for r in (read_results(output) if resume else [])}
    rows: dict[tuple[str, str], dict[str, Any]] = dict(stored)
    valid: set[tuple[str, str]] = set()  # rows of this run's settings: kept or computed
    run = {"threads": threads, "ants_threads": ants_threads, "device": device}
    try:
        _run_all(pairs, methods, output, rows, stored, valid, seed, run)
    except KeyboardInterrupt:
        raise BenchmarkInterrupted([rows[k] for k in _keys(pairs, methods) if k in valid]
                                   ) from None
    _write(rows, pairs, methods, output)
    return _ordered(rows, pairs, methods)


def _keys(pairs: Sequence[PairSpec], methods: Sequence[MethodSpec]) -> list[tuple[str, str]]:
    """This run's ``(pair, method)`` keys in pair x method order."""
    return [(p.name, m.name) for p in pairs for m in methods]


def _write(rows: dict[tuple[str, str], dict[str, Any]], pairs: Sequence[PairSpec],
           methods: Sequence[MethodSpec], output: Path) -> None:
    """``results.json`` with every row, ``results.csv`` with this run's."""
    write_results(_ordered(rows, pairs, methods), output,
                  [rows[k] for k in _keys(pairs, methods) if k in rows])


def _run_all(pairs: Sequence[PairSpec], methods: Sequence[MethodSpec], output: Path,
             rows: dict[tuple[str, str], dict[str, Any]],
             stored: dict[tuple[str, str], dict[str, Any]], valid: set[tuple[str, str]],
             seed: int | None, run: dict[str, Any]) -> None:
    """The loop of :func:`run_benchmark`: fills ``rows`` and ``valid``, writing the results
    after every row."""
    threads, ants_threads, device = run["threads"], run["ants_threads"], run["device"]
    total = len(pairs) * len(methods)
    done = 0
    for index, spec in enumerate(pairs, 1):
        pending = []
        for method in methods:
            old = stored.get((spec.name, method.name))
            if old and old.get("status") == "ok" and old.get("config") == _config(
                    spec, method, seed, run):
                valid.add((spec.name, method.name))
                done += 1
                LOGGER.info("[%d/%d] %s / %s: kept from the previous run", done, total,
                            spec.name, method.name)
            else:
                pending.append(method)
        if not pending:
            continue
        LOGGER.info("pair %d/%d: %s (%s)", index, len(pairs), spec.name, spec.subset)
        try:
            pair: LoadedPair | None = load_pair(spec)
            load_error: Exception | None = None
        except (RegpipeError, OSError, ValueError) as error:
            pair, load_error = None, error
        for note in pair.notes if pair else []:
            LOGGER.warning("%s: %s", spec.name, note)
        for method in pending:
            done += 1
            row: dict[str, Any] = {"pair": spec.name, "subset": spec.subset,
                                   "method": method.name, "status": "ok"}
            LOGGER.info("[%d/%d] %s / %s: running", done, total, spec.name, method.name)
            try:
                if pair is None:
                    raise load_error  # type: ignore[misc]
                row.update(run_method(method, pair, seed=seed, threads=threads,
                                      ants_threads=ants_threads, device=device))
            except Exception as error:  # one failure must not end a benchmark
                row.update(status="error", error=f"{type(error).__name__}: {error}")
                LOGGER.debug("%s", traceback.format_exc())
            row["config"] = _config(spec, method, seed, run)
            rows[_row_key(row)] = row
            valid.add(_row_key(row))
            LOGGER.info("[%d/%d] %s / %s: %s", done, total, spec.name, method.name,
                        _describe(row))
            _write(rows, pairs, methods, output)


def check_pair_names(pairs: Sequence[PairSpec]) -> None:
    """Refuse pairs whose names repeat (results are keyed by pair name and method)."""
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise InputError("pair names must be unique: " + ", ".join(
            sorted({n for n in names if names.count(n) > 1})))


def _ordered(rows: dict[tuple[str, str], dict[str, Any]], pairs: Sequence[PairSpec],
             methods: Sequence[MethodSpec]) -> list[dict[str, Any]]:
    """This run's rows in pair x method order, then rows kept from other runs."""
    order = _keys(pairs, methods)
    wanted = set(order)
    return [rows[k] for k in order if k in rows] + [
        row for key, row in rows.items() if key not in wanted]


def _describe(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"FAILED ({row.get('error')})"
    parts = [f"{row['runtime_s']:.1f} s, {row['peak_memory_mb']:.0f} MB"]
    for key, text in (("dice_mean", "Dice {:.3f}"), ("hd95_mean_mm", "HD95 {:.2f} mm"),
                      ("tre_mean_mm", "TRE {:.2f} mm"), ("folding_percent", "folding {:.4f} %"),
                      ("sd_log_jacobian", "SD log J {:.3f}")):
        value = row.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            parts.append(text.format(value))
    return ", ".join(parts)
