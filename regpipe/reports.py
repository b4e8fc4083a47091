"""HTML quality-control reports of registrations, per subject and per group.

The figures (:mod:`regpipe.figures`) are SVG files written beside a report and linked from it,
never inlined, so a page stays small and opens offline from ``file://`` (no CDN, no server).
The pages are small escaped HTML written here: nireports' report assembler indexes a BIDS
``figures/`` folder with pybids from a YAML spec and has no block for metric tables, and
``regpipe/`` does not use BIDS (niworkflows' ``*RPT`` interfaces would add a Nipype dependency).

Example::

    from regpipe.reports import write_subject_report
    write_subject_report(
        subject="01", session=None, output_dir=out, out_html=out / "sub-01.html",
        sections=[{"method": "unigradicon", "label": "uniGradICON",
                   "space": "MNI152NLin2009cAsym", "fixed": "tpl.nii.gz",
                   "warped": "warped.nii.gz", "moving_preproc": None,
                   "jacobian": "jacobian.nii.gz", "metrics": {"runtime_s": 41.0}}],
    )
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np

from regpipe import __version__
from regpipe.atomic import atomic_write
from regpipe.errors import InputError
from regpipe.figures import (
    cut_coordinates,
    finite_values,
    methods_in_order,
    plot_contours,
    plot_flicker,
    plot_group_metric,
    plot_jacobian,
    to_float,
)

__all__ = ["COMPARED_METRICS", "GROUP_METRICS", "write_group_report", "write_subject_report"]

LOGGER = logging.getLogger("regpipe")

_T = TypeVar("_T")
_CONTOURS = "outline in red, median intensity (grey/white matter boundary on T1w) in yellow."

# (key, column title, number format, better value): the metrics compared across methods.
COMPARED_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("runtime_s", "Runtime (s)", "{:.1f}", "min"),
    ("peak_memory_mb", "Peak memory (MB)", "{:.0f}", "min"),
    ("ncc_before", "NCC before", "{:.3f}", ""),
    ("ncc_after", "NCC after", "{:.3f}", "max"),
    ("folding_percent", "Folding (%)", "{:.3f}", "min"),
    # smoothness is a trade-off, not a score (an affine's SD log J is 0): never bold
    ("sd_log_jacobian", "SD log J", "{:.3f}", ""),
    ("dice_mean", "Mean Dice", "{:.3f}", "max"),
)
#: Titles of the other metrics a method reports (the per-method table shows every metric).
OTHER_METRIC_TITLES: dict[str, str] = {
    "ncc_affine": "NCC after the affine",
    "min_jacobian": "Smallest J",
    "max_jacobian": "Largest J",
    "inverse_consistency_voxels": "Inverse consistency (grid voxels, largest)",
    "inverse_consistency_mm_mean": "Inverse consistency (mm, mean)",
    "inverse_consistency_mm_p95": "Inverse consistency (mm, 95th percentile)",
    "peak_memory_scope": "Memory measured over",
    "peak_gpu_memory_mb": "Peak GPU memory (MB)",
}
GROUP_METRICS: tuple[tuple[str, str], ...] = (
    ("dice_mean", "Mean Dice"),
    ("folding_percent", "Folding (% of voxels with J ≤ 0)"),
    ("sd_log_jacobian", "SD of log Jacobian"),
    ("ncc_after", "NCC after registration"),
    ("runtime_s", "Runtime (s)"),
    ("peak_memory_mb", "Peak memory (MB)"),
)


# ------------------------------------------------------------------------------------ values


def _dice_mean(metrics: Mapping[str, Any]) -> float:
    """``metrics["dice_mean"]``, else the mean of a ``metrics["dice"]`` {label: value} dict."""
    value = to_float(metrics.get("dice_mean"))
    dice = metrics.get("dice")
    if math.isnan(value) and isinstance(dice, Mapping):
        per_label = [v for v in map(to_float, dice.values()) if not math.isnan(v)]
        value = float(np.mean(per_label)) if per_label else math.nan
    return value


def _format(value: Any, template: str = "{:.4g}") -> str:
    if isinstance(value, str):
        return value
    number = to_float(value)
    return "n/a" if math.isnan(number) else template.format(number)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# -------------------------------------------------------------------------------------- HTML

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;padding-top:.6em}h3{margin-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#e6f4e6}figure{margin:.8em 0}
figure img,figure object{width:100%;max-width:1000px;display:block;background:#000}
.plots{display:flex;flex-wrap:wrap;gap:1em}
.plots figure img{width:auto;max-width:100%;background:none}
.scroll{overflow-x:auto}figcaption{color:#555;font-size:.9em}.error{color:#a00}
nav a{margin-right:1em}
[data-loaded="0"]{outline:3px solid #a00}
"""
# Marks every figure data-loaded="1" (shown) or "0" (missing, broken: outlined in red) and counts
# them on <body> once the page has loaded; the browser test reads these marks.
_SCRIPT = """
function mark(e,ok){var t=e.target;if(t&&t.classList&&t.classList.contains('fig')){
t.setAttribute('data-loaded',ok?'1':'0');}}
document.addEventListener('load',function(e){mark(e,true);},true);
document.addEventListener('error',function(e){mark(e,false);},true);
window.addEventListener('load',function(){var f=document.querySelectorAll('.fig'),n=0,b=0;
for(var i=0;i<f.length;i++){var t=f[i];
if(t.tagName==='IMG'&&!(t.complete&&t.naturalWidth>0)){t.setAttribute('data-loaded','0');}
if(t.getAttribute('data-loaded')==='1'){n++;}else{b++;}}
document.body.setAttribute('data-figures-loaded',n);
document.body.setAttribute('data-figures-broken',b);});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(target: Path, page: Path) -> str:
    """Relative, URL-quoted, HTML-escaped link from ``page`` to ``target``."""
    relative = os.path.relpath(Path(target).resolve(), Path(page).parent.resolve())
    return _e(quote(Path(relative).as_posix()))


def _page(title: str, body: list[str]) -> str:
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        f"<script>{_SCRIPT}</script>",
        "</head>",
        "<body>",
    ]
    footer = f"<footer><p>Generated by regpipe {_e(__version__)}.</p></footer></body></html>\n"
    return "\n".join([*head, *body, footer])


def _figure_html(figure: Path | str, page: Path, caption: str, animated: bool = False) -> str:
    """A ``<figure>`` linking an SVG (``<object>`` if animated), or why there is none."""
    if not isinstance(figure, Path):
        return f'<p class="error">{_e(caption)} Figure not available: {_e(figure)}</p>'
    href = _href(figure, page)
    if animated:  # <object>, not <img>: the SVG's own :hover animation must receive the pointer
        element = f'<object class="fig" type="image/svg+xml" data="{href}">{href}</object>'
    else:
        element = f'<img class="fig" src="{href}" alt="{_e(caption)}">'
    return f"<figure>{element}<figcaption>{_e(caption)}</figcaption></figure>"


def _td(text: str, numeric: bool = False, best: bool = False) -> str:
    classes = " ".join(name for name, on in (("num", numeric), ("best", best)) if on)
    return f'<td class="{classes}">{_e(text)}</td>' if classes else f"<td>{_e(text)}</td>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table: ``header`` is escaped here, ``rows`` hold ready-made ``_td`` cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _attempt(what: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | str:
    """``function(*args, **kwargs)``, or the reason it failed (logged) for the page to show.

    A broken input (unreadable warped image, say) costs one figure, not the whole report.
    """
    try:
        return function(*args, **kwargs)
    except Exception as error:
        LOGGER.warning("report: %s failed: %s", what, error)
        LOGGER.debug("report: %s failed", what, exc_info=True)
        return f"{type(error).__name__}: {error}"


def _label(value: str | None, prefix: str, what: str) -> str | None:
    """A BIDS label without its ``sub-``/``ses-`` prefix; only letters and digits are allowed."""
    if value is None:
        return None
    label = value.removeprefix(prefix)
    if not re.fullmatch(r"[A-Za-z0-9]+", label):
        raise InputError(f"{what} label {value!r} is not a BIDS label (letters and digits only)")
    return label


# ---------------------------------------------------------------------------- subject report


def _method_html(
    section: Mapping[str, Any], stem: str, figures: Path, page: Path, cuts_per_view: int,
    drawn: dict[tuple[str, str], Path | str] | None = None,
) -> list[str]:
    """Figures and metrics of one method (one entry of ``write_subject_report``'s sections);
    ``drawn`` keeps the "before" figures already drawn for a (moving, fixed) pair, which every
    method of one image shares."""
    method = str(section.get("method"))
    label, space = str(section.get("label") or method), str(section.get("space"))
    fixed, warped = section.get("fixed"), section.get("warped")
    moving, jacobian = section.get("moving_preproc"), section.get("jacobian")
    cuts = _attempt(f"{label}: slice positions", cut_coordinates, fixed, cuts_per_view)
    failed = cuts if isinstance(cuts, str) else None

    def figure(kind: str, function: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | str:
        if failed is not None:
            return failed
        out = figures / f"{stem}{kind}_reg.svg"
        return _attempt(f"{label}: {kind} figure", function, *args, out, cuts=cuts, **kwargs)

    flicker = figure(
        "Flicker",
        plot_flicker,
        fixed,
        warped,
        fixed_label=f"{space} (fixed)",
        warped_label=f"{label} (warped)",
    )
    contours = figure("Contours", plot_contours, warped, fixed, title=f"{label}: warped image")
    parts = [
        "<h3>Before / after</h3>",
        _figure_html(
            flicker,
            page,
            f"{space} (fixed, background) and the image warped by {label} (foreground): "
            "hover over the figure to flicker between them.",
            animated=True,
        ),
        "<h3>Contours</h3>",
        _figure_html(contours, page, f"Image warped by {label}; contours of {space}: {_CONTOURS}"),
    ]
    if moving is not None:
        key = (str(moving), str(fixed))
        if drawn is not None and key in drawn:
            before = drawn[key]
        else:
            before = figure("Before", plot_contours, moving, fixed, title="before registration")
            if isinstance(before, str) and failed is None:
                # the images do not overlap in world space (a CT in scanner coordinates and an
                # MNI template): cut through the moving image itself instead
                own = _attempt(f"{label}: slice positions", cut_coordinates, moving,
                               cuts_per_view)
                if not isinstance(own, str):
                    before = _attempt(f"{label}: Before figure", plot_contours, moving, fixed,
                                      figures / f"{stem}Before_reg.svg", cuts=own,
                                      title=f"before registration: no overlap with {space}",
                                      draw_contours=False)
            if drawn is not None:
                drawn[key] = before
        parts.append(
            _figure_html(
                before,
                page,
                f"Before registration: the preprocessed moving image in its own world "
                f"coordinates; contours of {space} where it overlaps them: {_CONTOURS}",
            )
        )
    parts.append("<h3>Jacobian determinant</h3>")
    if jacobian is None:
        parts.append("<p>No Jacobian map for this method.</p>")
    else:
        jac = figure("Jacobian", plot_jacobian, jacobian, title=f"{label}: Jacobian determinant")
        caption = "Blue: compression (J < 1); red: expansion (J > 1); lime: folding (J ≤ 0)."
        parts.append(_figure_html(jac, page, caption))
    metric_rows = _metric_rows(dict(section.get("metrics") or {}))
    parts.append("<h3>Metrics</h3>")
    parts.append(_table(["Metric", "Value"], metric_rows) if metric_rows else "<p>No metrics.</p>")
    settings = dict(section.get("settings") or {})
    if settings:  # what made these results: a page must not be mistaken for another run's
        parts.append("<h3>Settings</h3>")
        parts.append(_table(["Setting", "Value"], _settings_rows(settings)))
    return parts


def _settings_rows(settings: Mapping[str, Any]) -> list[list[str]]:
    """The registration's settings as table rows (weights by file name, ``None`` as n/a)."""
    rows = []
    for key in sorted(settings):
        value = settings[key]
        if key == "weights":
            text = Path(str(value)).name if value else "none (no network: optimisation only)"
        elif isinstance(value, Mapping):
            text = ", ".join(f"{k} {_format(v)}" for k, v in value.items()) or "n/a"
        elif isinstance(value, list | tuple):
            text = " x ".join(_format(v) for v in value)
        elif value is None:
            text = "n/a"
        else:
            text = _format(value) if isinstance(value, float) else str(value)
        rows.append([_td(key), _td(text)])
    return rows


def _metric_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    """All metrics of one method: the compared ones first, then the others, dicts flattened."""
    known = {key: (title, template) for key, title, template, _ in COMPARED_METRICS}
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update({f"{key} [{sub}]": v for sub, v in value.items()})
        elif isinstance(value, list | tuple):
            flat[key] = ", ".join(_format(v) for v in value)
        else:
            flat[key] = value
    if "dice_mean" not in flat and not math.isnan(_dice_mean(metrics)):
        flat["dice_mean"] = _dice_mean(metrics)
    ordered = [key for key, *_ in COMPARED_METRICS if key in flat]
    ordered += [key for key in flat if key not in known]
    rows = []
    for key in ordered:
        title, template = known.get(key, (OTHER_METRIC_TITLES.get(key, key), "{:.4g}"))
        rows.append([_td(title), _td(_format(flat[key], template), numeric=True)])
    return rows


def _registration_key(section: Mapping[str, Any]) -> tuple[str, str]:
    """What a section registered: its warped file's entities but the description (one image
    to one target: res and cohort included) and its space; methods of one key are compared."""
    entities = _file_entities(section.get("warped"))
    return "_".join(f"{k}-{v}" for k, v in entities.items() if k != "desc"), \
        str(section.get("space"))


def _comparison_table(sections: Sequence[Mapping[str, Any]]) -> str:
    """One row per method, one column per compared metric; the best value of a column among
    the methods of one registration (image and target) bold."""
    metrics = [dict(section.get("metrics") or {}) for section in sections]
    values = {
        key: [_dice_mean(m) if key == "dice_mean" else to_float(m.get(key)) for m in metrics]
        for key, *_ in COMPARED_METRICS
    }
    groups = [_registration_key(section) for section in sections]
    best: dict[tuple[str, tuple[str, str]], float] = {}
    for key, _, _, better in COMPARED_METRICS:
        for group in set(groups):
            finite = [v for v, g in zip(values[key], groups, strict=True)
                      if g == group and not math.isnan(v)]
            if better and len(finite) > 1:
                best[key, group] = min(finite) if better == "min" else max(finite)
    rows = []
    for index, section in enumerate(sections):
        method = str(section.get("method"))
        cells = [
            _td(str(section.get("label") or method)),
            _td(method),
            _td(str(section.get("space"))),
        ]
        for key, _, template, _ in COMPARED_METRICS:
            value = values[key][index]
            is_best = value == best.get((key, groups[index]))
            cells.append(_td(_format(value, template), numeric=True, best=is_best))
        rows.append(cells)
    header = ["Method", "Id", "Space"] + [title for _, title, _, _ in COMPARED_METRICS]
    return _table(header, rows)


#: BIDS entities that tell one subject's images apart, in BIDS order
_IMAGE_ENTITIES = ("ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "flip", "inv", "mt",
                   "part", "chunk")


def _file_entities(image: Any) -> dict[str, str]:
    """``{"sub": "01", "ses": "2", ...}``: the entities of ``image``'s file name (a path;
    none for an image in memory)."""
    if not isinstance(image, (str, Path)):
        return {}
    return dict(re.findall(r"(?:^|_)([a-z]+)-([A-Za-z0-9]+)(?=_)", Path(image).name))


#: Entities of the target (a template's cohort and resolution) in an output's file name
_TARGET_ENTITIES = ("cohort", "res")


def _image_entities(image: Any, page_entities: str,
                    keys: Sequence[str] = _IMAGE_ENTITIES) -> str:
    """``_ses-2_run-1``: the entities of ``image``'s file name (a path; nothing for an image
    in memory) among ``keys`` that ``page_entities`` does not already hold."""
    pairs = _file_entities(image)
    return "".join(f"_{key}-{pairs[key]}" for key in keys
                   if key in pairs and f"{key}-{pairs[key]}" not in page_entities.split("_"))


def write_subject_report(
    *,
    subject: str,
    session: str | None,
    output_dir: Path,
    sections: list[dict],
    out_html: Path,
    cuts_per_view: int = 7,
    missing: Sequence[str] = (),
) -> Path:
    """Write one standalone HTML QC page for a subject, comparing registration methods.

    Parameters
    ----------
    subject, session
        BIDS labels, with or without their ``sub-``/``ses-`` prefix (letters and digits only).
    output_dir
        Root of the output dataset; figures go to ``output_dir/sub-<label>/figures/``.
    sections
        One dict per method: ``method`` (identifier, e.g. ``"ants-syn"``), ``label`` (display
        name), ``space`` (name of the fixed space), ``fixed``, ``warped`` (the moving image
        resampled onto the fixed grid), ``moving_preproc`` (the moving image before
        registration, or ``None``) and ``jacobian`` (Jacobian determinant map on the fixed grid,
        or ``None``), each a NIfTI path or an :class:`~regpipe.imageio.Image`; and ``metrics``
        (a dict: missing keys show as ``n/a``; ``dice`` may be a ``{label: value}`` dict);
        optionally ``settings`` (the registration's settings, shown in a table).
    out_html
        The page to write; its figure links are relative to its folder.
    cuts_per_view
        Slices per view (axial, sagittal, coronal) in every figure.
    missing
        Registrations not on the page because their outputs are missing (a method that
        failed, deleted files), one line each: listed at the top of the page.

    Returns
    -------
    Path
        ``out_html``. A figure that cannot be drawn (unreadable image...) is logged and its
        reason shown on the page instead of failing the report.
    """
    subject_label = _label(subject, "sub-", "subject")
    session_label = _label(session, "ses-", "session")
    if not sections:
        raise InputError(f"no registration to report for sub-{subject_label}")
    out_html = Path(out_html)
    figures = Path(output_dir) / f"sub-{subject_label}" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    entities = f"sub-{subject_label}" + (f"_ses-{session_label}" if session_label else "")
    title = entities.replace("_", " ")

    nav, parts, stems = [], [], set()
    drawn: dict[tuple[str, str], Path | str] = {}
    for index, section in enumerate(sections):
        method = str(section.get("method"))
        label = str(section.get("label") or method)
        method_id = re.sub(r"[^A-Za-z0-9]", "", method) or f"method{index}"
        space_id = re.sub(r"[^A-Za-z0-9]", "", str(section.get("space"))) or "fixed"
        # the image's own entities (session, acquisition, run...) from its file name, so that
        # figures of one subject's several images keep their names whatever the order
        own = _image_entities(section.get("warped"), entities)
        target = _image_entities(section.get("warped"), entities, _TARGET_ENTITIES)
        stem = f"{entities}{own}_space-{space_id}{target}_desc-{method_id}"
        stem = f"{stem}{index}" if stem in stems else stem  # same method, image and space
        stems.add(stem)
        anchor = f"method-{index}-{method_id}"
        nav.append(f'<a href="#{_e(anchor)}">{_e(label)}</a>')
        parts.append(
            f'<section id="{_e(anchor)}"><h2>{_e(label)} '
            f"<small>({_e(method)}, to {_e(section.get('space'))})</small></h2>"
        )
        parts += _method_html(section, stem, figures, out_html, cuts_per_view, drawn)
        parts.append("</section>")
    notice = []
    if missing:
        items = "".join(f"<li>{_e(line)}</li>" for line in missing)
        notice = [(f'<section id="missing"><h2 class="error">Not on this page: outputs missing'
                  f"</h2><p>These registrations have no complete outputs (the method failed "
                  f"in the latest run, or files were removed); see the crash files in "
                  f"<code>logs/</code> and the group report.</p><ul>{items}</ul></section>")]
    body = [
        f"<h1>regpipe registration report: {_e(title)}</h1>",
        *notice,
        f"<nav>{''.join(nav)}</nav>",
        '<section id="comparison"><h2>Methods side by side</h2>',
        _comparison_table(sections),
        ("<p>The best value of each column among the methods of one registration (image and "
        "target) is in bold; SD log J never is (smoothness is a trade-off, and an affine's is "
        "0).</p></section>"),
        *parts,
    ]
    page = _page(f"regpipe: {title}", body)
    written = atomic_write(out_html, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    _remove_stale_figures(figures, page)
    return written


#: Figures of a subject that no page links and that are older than this are left over from
#: sections that are gone; younger ones may belong to a concurrent run's page being drawn.
STALE_FIGURE_SECONDS = 3600


def _remove_stale_figures(figures: Path, page: str) -> None:
    now = time.time()
    for figure in figures.glob("*_reg.svg"):
        try:
            if figure.name not in page and now - figure.stat().st_mtime > STALE_FIGURE_SECONDS:
                figure.unlink()
        except OSError:  # removed by another run, or a read-only folder: harmless
            pass


# ------------------------------------------------------------------------------ group report


def _summary_table(rows: Sequence[Mapping[str, Any]], methods: list[str]) -> str:
    """Median [first quartile, third quartile] of each group metric, one row per method."""
    table_rows = []
    for method in methods:
        count = sum(str(row.get("method", "?")) == method for row in rows)
        cells = [_td(method), _td(str(count), numeric=True)]
        for key, _ in GROUP_METRICS:
            values = finite_values(rows, key, method)
            text = "n/a"
            if values.size:
                q1, median, q3 = np.percentile(values, [25, 50, 75])
                text = f"{median:.4g} [{q1:.4g}, {q3:.4g}]"
            cells.append(_td(text, numeric=True))
        table_rows.append(cells)
    return _table(["Method", "Registrations"] + [t for _, t in GROUP_METRICS], table_rows)


#: Row columns that tell two models apart, and how a method label shows them
_MODEL_COLUMNS = (("weights_sha256", lambda v: f"weights {str(v)[:12]}"),
                  ("network_passes", lambda v: f"{_format(v)} pass(es)"),
                  ("condition_region", lambda v: f"region {v}"),
                  ("condition_pair_type", lambda v: str(v)),
                  ("condition_lam", lambda v: f"lam {_format(v)}"))


def _split_by_model(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows of one method made with different network weights (``weights_sha256``), number
    of network passes (``network_passes``) or condition of a conditional network
    (``condition_region``, ``condition_pair_type``, ``condition_lam``) get them in their
    method label, so the summary and plots never pool two models or settings."""
    def given(value: Any) -> bool:
        return value not in (None, "", "n/a")

    seen: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        for column, _ in _MODEL_COLUMNS:
            if given(row.get(column)):
                seen.setdefault((str(row.get("method")), column), set()).add(
                    _format(row[column]))
    out = []
    for row in rows:
        method = str(row.get("method"))
        parts = [show(row[column]) for column, show in _MODEL_COLUMNS
                 if given(row.get(column)) and len(seen.get((method, column), ())) > 1]
        out.append({**row, "method": f"{method} [{', '.join(parts)}]"} if parts else dict(row))
    return out


def write_group_report(
    rows: list[dict],
    failures: list[dict],
    out_html: Path,
    *,
    figures_dir: Path | None = None,
) -> Path:
    """Write the HTML page comparing methods across subjects, with the list of failures.

    Parameters
    ----------
    rows
        One dict per registration: ``subject``, ``session``, ``method``, ``runtime_s``,
        ``peak_memory_mb``, ``folding_percent``, ``sd_log_jacobian``, ``ncc_after`` and
        optionally ``dice_mean``, ``target`` (what it was registered to: rows of several
        targets are summarised per method and target, never pooled), ``weights_sha256``,
        ``network_passes`` and ``condition_*`` (rows of one method made with different
        weights, passes or conditions are summarised separately); ``None``, ``"n/a"`` and
        missing values are left out of the statistics.
    failures
        One dict per failure: ``subject`` and ``reason`` (``session`` and ``method`` are shown
        when present).
    out_html
        The page to write.
    figures_dir
        Folder of the distribution plots (``group_<metric>.svg``); default ``figures/`` beside
        the page.
    """
    out_html = Path(out_html)
    figures_dir = Path(figures_dir) if figures_dir else out_html.parent / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    targets = {r.get("target") for r in rows if r.get("target")}
    if len(targets) > 1:  # never pool registrations made against different targets
        rows = [{**r, "method": f"{r.get('method')} / {r.get('target')}"} for r in rows]
    rows = _split_by_model(rows)
    methods = methods_in_order(rows)
    subjects = {_text(r.get("subject")) for r in rows} | {
        _text(f.get("subject")) for f in failures
    }
    counts = (
        f"{len(subjects)} subject(s), {len(methods)} method(s), {len(rows)} registration(s), "
        f"{len(failures)} failure(s)."
    )
    body = [
        "<h1>regpipe group report</h1>",
        f"<p>{counts}</p>",
        '<section id="summary"><h2>Summary</h2>',
        "<p>Median [first quartile, third quartile] over subjects and sessions.</p>",
        _summary_table(rows, methods),
        "</section>",
        '<section id="distributions"><h2>Distributions</h2><div class="plots">',
    ]
    for old in figures_dir.glob("group_*.svg"):  # names before 2026-11-22 ("..._jacobian")
        if not old.name.endswith("_plot.svg"):
            old.unlink()
    for key, title in GROUP_METRICS:
        # one word, then "_plot": pybids reads the last part of a name as its suffix, and
        # "group_sd_log_jacobian.svg" turned up among the Jacobian maps
        out = figures_dir / f"group_{key.replace('_', '')}_plot.svg"
        plot = _attempt(f"{key} plot", plot_group_metric, rows, key, out, title=title)
        if plot is None:
            body.append(f"<p>{_e(title)}: no values.</p>")
            out.unlink(missing_ok=True)  # an earlier run's plot would show other data
        else:
            caption = f"{title} per method; each point is one registration."
            body.append(_figure_html(plot, out_html, caption))
    body.append("</div></section>")
    failure_columns = ("subject", "session", "method", "reason", "crash_file")
    failure_rows = [[_td(_text(f.get(c))) for c in failure_columns] for f in failures]
    body.append('<section id="failures"><h2>Failures</h2>')
    body.append(
        _table([c.capitalize() for c in failure_columns], failure_rows)
        if failures
        else "<p>None.</p>"
    )
    body.append("</section>")
    # which image and target each row is: the entities that tell a subject's rows apart
    ids = ["subject", "session", "method"] + [
        c for c in ("acquisition", "reconstruction", "run", "target")
        if any(r.get(c) not in (None, "") for r in rows)]
    columns = ids + [key for key, _ in GROUP_METRICS]
    all_rows = [
        [_td(_text(r.get(c))) for c in ids]
        + [_td(_format(r.get(c)), numeric=True) for c in columns[len(ids):]]
        for r in rows
    ]
    body.append('<section id="registrations"><h2>All registrations</h2><details>')
    body.append(f"<summary>Show the table</summary>{_table(columns, all_rows)}</details>")
    body.append("</section>")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    page = _page("regpipe: group report", body)
    return atomic_write(out_html, lambda tmp: tmp.write_text(page, encoding="utf-8"))
