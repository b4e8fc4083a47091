"""Tables and plots of benchmark rows (:mod:`regpipe.bench`): CSV, markdown, PNG figures.

A row is a mapping with ``pair``, ``subset``, ``method``, ``status`` (``"ok"`` or
``"error"``, with ``error``; a row without ``status`` counts as ``"ok"``) and the measures of
:func:`regpipe.evaluation.evaluate_transform` plus ``runtime_s`` and ``peak_memory_mb``. The
functions need nothing else, so any table of such rows (for example the BIDS App's group
metrics, which use the same measure names) can be summarised the same way
(:func:`summary_table`).

Figures use matplotlib's object interface with the Agg canvas (no pyplot, no display, no
global backend change).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regpipe.atomic import atomic_write

__all__ = ["csv_text", "markdown_report", "summary_table", "write_plots", "write_report"]

REPORT_MD = "results.md"
DICE_PLOT = "dice_boxplot.png"
RUNTIME_PLOT = "runtime_vs_dice.png"
TRE_PLOT = "tre_boxplot.png"

#: Scalar measures in table order: key -> (column title, decimals).
MEASURES: dict[str, tuple[str, int]] = {
    "dice_mean": ("Dice", 3),
    "hd95_mean_mm": ("HD95 (mm)", 2),
    "hd95_missing": ("labels lost", 1),
    "tre_mean_mm": ("TRE mean (mm)", 2),
    "tre_max_mm": ("TRE max (mm)", 2),
    "folding_percent": ("folding (%)", 4),
    "sd_log_jacobian": ("SD log J", 3),
    "ncc_after": ("NCC", 3),
    "runtime_s": ("runtime (s)", 1),
    "peak_memory_mb": ("peak memory (MB)", 0),
}
_FIRST_COLUMNS = ("pair", "subset", "method", "status", "error", "runtime_s", "peak_memory_mb",
                  "dice_mean", "hd95_mean_mm", "hd95_missing", "tre_mean_mm", "tre_median_mm",
                  "tre_max_mm", "folding_percent", "sd_log_jacobian", "min_jacobian",
                  "max_jacobian", "ncc_after", "n_labels", "n_landmarks", "evaluation_s")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _label_key(text: str) -> tuple[int, Any]:
    return (0, int(text)) if text.lstrip("-").isdigit() else (1, text)


# --------------------------------------------------------------------------- CSV


def _flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    flat = {key: value for key, value in row.items()
            if not isinstance(value, Mapping) and not isinstance(value, (list, tuple))}
    for key, value in (row.get("settings") or {}).items():
        if isinstance(value, Mapping):  # the condition a conditional network used, say
            flat.update({f"setting_{key}_{k}": v for k, v in value.items()
                         if not isinstance(v, (Mapping, list, tuple))})
        elif not isinstance(value, (list, tuple)):
            flat[f"setting_{key}"] = value
    for name in ("dice", "hd95"):
        for label, value in (row.get(name) or {}).items():
            flat[f"{name}_{label}"] = value
    return flat


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV of the rows: one line per pair and method, scalars only, per-label Dice and HD95
    as ``dice_<label>`` and ``hd95_<label>`` columns; empty cells for missing values."""
    flat = [_flat_row(r) for r in rows]
    keys: dict[str, None] = {}
    for row in flat:
        keys.update(dict.fromkeys(row))
    first = [k for k in _FIRST_COLUMNS if k in keys]
    settings = sorted(k for k in keys if k.startswith("setting_"))
    labels = sorted((k for k in keys if k.startswith(("dice_", "hd95_")) and k not in first),
                    key=lambda k: (k.split("_", 1)[0], _label_key(k.split("_", 1)[1])))
    rest = sorted(k for k in keys if k not in set(first) | set(settings) | set(labels))
    columns = first + rest + settings + labels
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in flat:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# --------------------------------------------------------------------------- markdown


def _mean_sd(values: Sequence[float], decimals: int) -> str:
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {float(np.std(values, ddof=1)):.{decimals}f}"


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r["method"]) for r in rows))


def _present(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [key for key in MEASURES if any(_number(r.get(key)) is not None for r in rows)]


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, one line per method: pairs done / attempted and mean ± SD over the
    successful pairs of each measure (``(n=k)`` when fewer pairs have that measure)."""
    keys = _present(rows)
    head = ["method", "pairs ok"] + [MEASURES[k][0] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in _methods(rows):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r.get("status", "ok") == "ok"]
        cells = [_text(method), f"{len(ok)}/{len(mine)}"]
        for key in keys:
            values = [v for v in (_number(r.get(key)) for r in ok) if v is not None]
            text = _mean_sd(values, MEASURES[key][1])
            if values and len(values) < len(ok):
                text += f" (n={len(values)})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _text(value: Any) -> str:
    """``value`` as one markdown table cell or list item: one line, ``|`` escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _pair_table(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = _present(rows)
    head = ["pair", "method", "status"] + [MEASURES[k][0] for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ok = row.get("status", "ok") == "ok"
        cells = [_text(row["pair"]), _text(row["method"]), "ok" if ok else "failed"]
        for key in keys:
            value = _number(row.get(key)) if ok else None
            cells.append("" if not ok else "-" if value is None
                         else f"{value:.{MEASURES[key][1]}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(rows: Sequence[Mapping[str, Any]], *, title: str = "regpipe-bench results",
                    figures: Sequence[str] = ()) -> str:
    """The whole markdown page: summary per method (overall and per subset when there are
    several), the figures, every pair, the failures, and what each measure means."""
    from regpipe import __version__

    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    pairs = list(dict.fromkeys(str(r["pair"]) for r in rows))
    counts = (f"regpipe {__version__}: {len(pairs)} pair(s), {len(_methods(rows))} method(s), "
              f"{len(rows) - len(failed)} result(s), {len(failed)} failure(s).")
    parts = [f"# {title}", "", counts, "",
             "## Summary per method (mean ± SD over pairs)", "", summary_table(rows), ""]
    subsets = list(dict.fromkeys(str(r.get("subset", "")) for r in rows))
    if len(subsets) > 1:
        for subset in subsets:
            mine = [r for r in rows if str(r.get("subset", "")) == subset]
            parts += [f"### Subset `{subset}`", "", summary_table(mine), ""]
    conditions = _conditions(rows)
    if conditions:
        parts += ["## Conditions of conditional weights (as used)", "", *conditions, ""]
    if figures:
        parts += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    parts += ["## Per pair", "", _pair_table(rows), ""]
    if failed:
        parts += ["## Failures", ""]
        parts += [f"- `{_text(r['pair'])}` / `{_text(r['method'])}`: "
                  f"{_text(r.get('error', 'unknown error'))}" for r in failed]
        parts.append("")
    parts += ["## Measures", "", _LEGEND]
    return "\n".join(parts) + "\n"


def _conditions(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per method run with conditional weights: the condition registration used
    (lam after clamping to the trained range, with the value asked for)."""
    lines = []
    for method in _methods(rows):
        used: dict[str, None] = {}
        for row in rows:
            condition = (row.get("settings") or {}).get("condition")
            if row["method"] == method and isinstance(condition, Mapping):
                text = (f"region {condition.get('region')}, pair type "
                        f"{condition.get('pair_type')}, lam {condition.get('lam')}")
                if condition.get("lam_requested") is not None:
                    text += f" (asked {condition['lam_requested']})"
                used[text] = None
        if used:
            lines.append(f"- `{_text(method)}`: {'; '.join(used)}")
    return lines


_LEGEND = """\
- Dice: overlap of each label between the fixed label map and the moving label map resampled
  onto the fixed grid (nearest neighbour), averaged over the labels scored.
- HD95: per label, the larger of the two 95th percentiles of surface-to-surface distances (mm,
  voxel spacing aware), averaged over the labels present in both maps; labels lost: labels
  of the fixed map that the warped moving map no longer contains (no HD95, so a mean over
  fewer labels: compare HD95 only together with it).
- TRE: distance (mm) between each fixed landmark mapped through the transform into moving space
  and its moving landmark; mean and maximum over the landmarks.
- folding: share of region voxels whose Jacobian determinant is <= 0 (%); SD log J: standard
  deviation of log J over the region (J > 0). The region is the pair's mask, else the fixed
  labels > 0, else the fixed image's foreground.
- NCC: global normalised cross-correlation of the fixed image and the warped moving image in
  the region.
- runtime: wall-clock seconds of the registration call on images already in memory
  (evaluation excluded); peak memory: peak resident memory (MB) of the process during the call
  (for seeded ANTs, which runs in its own process, the larger of the two).
"""


# --------------------------------------------------------------------------- figures


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _boxplot(rows: Sequence[Mapping[str, Any]], key: str, ylabel: str, path: Path) -> bool:
    data = {}
    for method in _methods(rows):
        values = [v for v in (_number(r.get(key)) for r in rows
                              if r["method"] == method and r.get("status", "ok") == "ok")
                  if v is not None]
        if values:
            data[method] = values
    if not data:
        return False
    figure = _figure(max(4.0, 1.1 * len(data) + 2.0))
    axes = figure.add_subplot()
    axes.boxplot(list(data.values()), showmeans=True)
    axes.set_xticks(range(1, len(data) + 1), list(data), rotation=20)
    for i, values in enumerate(data.values(), 1):
        axes.plot(np.full(len(values), i), values, "o", alpha=0.4, markersize=3, color="k")
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp))
    return True


def _scatter(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    ok = [r for r in rows if r.get("status", "ok") == "ok"
          and _number(r.get("dice_mean")) is not None and _number(r.get("runtime_s"))]
    if not ok:
        return False
    figure = _figure()
    axes = figure.add_subplot()
    for method in _methods(ok):
        mine = [r for r in ok if r["method"] == method]
        axes.scatter([max(float(r["runtime_s"]), 1e-3) for r in mine],
                     [float(r["dice_mean"]) for r in mine], label=method, alpha=0.75)
    axes.set_xscale("log")
    axes.set_xlabel("runtime (s, log scale)")
    axes.set_ylabel("mean Dice per pair")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp))
    return True


def write_plots(rows: Sequence[Mapping[str, Any]], output: str | os.PathLike) -> list[str]:
    """Write the figures the data allow (Dice box plot per method, runtime vs Dice scatter,
    TRE box plot); returns their file names (in ``output``)."""
    output = Path(output)
    written = []
    if _boxplot(rows, "dice_mean", "mean Dice per pair", output / DICE_PLOT):
        written.append(DICE_PLOT)
    if _scatter(rows, output / RUNTIME_PLOT):
        written.append(RUNTIME_PLOT)
    if _boxplot(rows, "tre_mean_mm", "mean TRE per pair (mm)", output / TRE_PLOT):
        written.append(TRE_PLOT)
    for name in (DICE_PLOT, RUNTIME_PLOT, TRE_PLOT):
        if name not in written:  # an earlier run's figure would describe other results
            (output / name).unlink(missing_ok=True)
    return written


def write_report(rows: Sequence[Mapping[str, Any]], output: str | os.PathLike) -> Path:
    """Write the figures and ``results.md`` into ``output``; returns the markdown path."""
    figures = write_plots(rows, output)
    text = markdown_report(rows, figures=figures)
    return atomic_write(Path(output) / REPORT_MD, lambda tmp: tmp.write_text(text))
