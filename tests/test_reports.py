"""QC figures and HTML reports: files, relative links, escaping, missing data, and a real browser.

The reports are written once per module (tiny 24^3 volumes, 3 slices per view); the browser
tests open them in headless Chromium and read back which figures loaded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nibabel as nib
import numpy as np
import pytest

from regpipe.errors import InputError
from regpipe.figures import cut_coordinates, plot_group_metric
from regpipe.imageio import Image
from regpipe.reports import write_group_report, write_subject_report
from regpipe.spaces import Geometry
from tests.conftest import blob_image, make_affine

SHAPE = (24, 24, 24)
HOSTILE = 'uniGradICON <script>alert("x")</script> & co'


class _Links(HTMLParser):
    """Collects figure links (img src, object data, any href) and the attributes of figures."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.figures: list[dict[str, str | None]] = []
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "data", "href") and v]
        if "fig" in (attributes.get("class") or "").split():
            self.figures.append(attributes)
        if tag == "body":
            self.body = attributes


def _parse(page: str) -> _Links:
    parser = _Links()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("volumes")
    geometry = Geometry(SHAPE, make_affine("LPS", SHAPE))
    fixed = blob_image(geometry, seed=0)
    jacobian = 1.0 + 0.3 * np.sin(np.arange(SHAPE[0]) / 3.0)[:, None, None] * np.ones(SHAPE)
    jacobian[10:14, 10:14, 10:14] = -0.2  # folding in the middle, where the middle cuts go
    arrays = {
        "fixed": fixed,
        "warped": np.roll(fixed, 1, axis=0),
        "moving": np.roll(fixed, 3, axis=1),
        "jacobian": jacobian,
    }
    paths = {}
    for name, data in arrays.items():
        paths[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), geometry.affine), paths[name])
    return paths


@pytest.fixture(scope="module")
def subject_report(volumes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("derivatives")
    affine = nib.load(volumes["fixed"]).affine
    constant = Image(np.ones(SHAPE, np.float32), Geometry(SHAPE, affine))  # affine's Jacobian
    sections = [
        {
            "method": "unigradicon",
            "label": HOSTILE,
            "space": "MNI152NLin2009cAsym",
            "fixed": volumes["fixed"],
            "warped": volumes["warped"],
            "moving_preproc": volumes["moving"],
            "jacobian": volumes["jacobian"],
            "metrics": {
                "runtime_s": 41.25,
                "peak_memory_mb": 2100.0,
                "ncc_before": 0.5,
                "ncc_after": 0.93,
                "folding_percent": 0.46,
                "sd_log_jacobian": 0.21,
                "dice": {"17": 0.8, "53": 0.7},
            },
            "settings": {"weights": "/models/Step_2_final.trch", "io_iterations": 50,
                         "grid_shape": [175, 175, 175], "seed": None},
        },
        {
            "method": "ants-syn",
            "label": "ANTs SyN",
            "space": "MNI152NLin2009cAsym",
            "fixed": volumes["fixed"],
            "warped": volumes["warped"],
            "moving_preproc": volumes["moving"],  # the same image: its "before" figure is shared
            "jacobian": constant,
            "metrics": {"runtime_s": 12.5},
        },
        {
            "method": "ants-affine",
            "label": "ANTs affine",
            "space": "MNI152NLin2009cAsym",
            "fixed": volumes["fixed"],
            "warped": volumes["fixed"].parent / "not-there.nii.gz",
            "moving_preproc": None,
            "jacobian": None,
            "metrics": {},
        },
    ]
    return write_subject_report(
        subject="sub-01",
        session="1",
        output_dir=output_dir,
        sections=sections,
        out_html=output_dir / "sub-01.html",
        cuts_per_view=1,
        missing=["T1w -> MNI152NLin2009cAsym (ants-synquick): missing <warped> & co"],
    )


@pytest.fixture(scope="module")
def group_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [
        {
            "subject": f"0{s}",
            "session": None,
            "method": method,
            "runtime_s": 10.0 * (m + 1) + s,
            "peak_memory_mb": 500.0 * (m + 1) + s,
            "folding_percent": 0.1 * s * m,
            "sd_log_jacobian": 0.1 + 0.01 * s,
            "ncc_after": 0.9 - 0.01 * s,
            "dice_mean": 0.7 + 0.02 * s if m == 0 else "n/a",
        }
        for s in range(1, 4)
        for m, method in enumerate(["unigradicon", "ants-syn"])
    ]
    failures = [{"subject": "04", "reason": "corrupt <NIfTI> & truncated"}]
    out_html = tmp_path_factory.mktemp("group") / "group.html"
    return write_group_report(rows, failures, out_html)


# ------------------------------------------------------------------------------ subject report


def test_subject_figures_are_linked_by_relative_paths_that_exist(subject_report: Path) -> None:
    links = [link for link in _parse(subject_report.read_text()).links if not link.startswith("#")]
    figures = subject_report.parent / "sub-01" / "figures"
    assert links
    for link in links:
        assert not urlsplit(link).scheme and not link.startswith("/"), link
        target = (subject_report.parent / unquote(link)).resolve()
        assert target.is_file() and target.parent == figures.resolve(), link


def test_subject_figures_are_named_by_subject_session_space_and_method(
    subject_report: Path,
) -> None:
    names = sorted(p.name for p in (subject_report.parent / "sub-01" / "figures").iterdir())
    stem = "sub-01_ses-1_space-MNI152NLin2009cAsym_desc-"
    assert names == [
        f"{stem}antssynContours_reg.svg",
        f"{stem}antssynFlicker_reg.svg",
        f"{stem}antssynJacobian_reg.svg",
        f"{stem}unigradiconBefore_reg.svg",
        f"{stem}unigradiconContours_reg.svg",
        f"{stem}unigradiconFlicker_reg.svg",
        f"{stem}unigradiconJacobian_reg.svg",
    ]  # one "before" figure for the two methods that registered the same moving image
    assert subject_report.read_text().count(f"{stem}unigradiconBefore_reg.svg") == 2


def test_before_figure_of_images_that_do_not_overlap_cuts_through_the_moving_one(
        volumes, tmp_path) -> None:
    """A CT in scanner coordinates and an MNI template: the template's slice positions miss
    the moving image, so its own are used (the figure was "not available")."""
    moving = nib.load(volumes["moving"])
    far = moving.affine.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(np.asarray(moving.dataobj), far), tmp_path / "far.nii.gz")
    section = {"method": "network", "label": "CT -> X (network)", "space": "X",
               "fixed": volumes["fixed"], "warped": volumes["warped"],
               "moving_preproc": tmp_path / "far.nii.gz", "jacobian": None, "metrics": {}}
    page = write_subject_report(subject="01", session=None, output_dir=tmp_path,
                                sections=[section], out_html=tmp_path / "sub-01.html")
    text = Path(page).read_text()
    assert "Figure not available" not in text
    assert any((tmp_path / "sub-01" / "figures").glob("*Before_reg.svg"))


def test_figures_no_page_links_any_more_are_removed_when_old(volumes, tmp_path) -> None:
    import os
    import time

    figures = tmp_path / "sub-01" / "figures"
    figures.mkdir(parents=True)
    old, fresh = figures / "gone_old_reg.svg", figures / "concurrent_reg.svg"
    old.write_text("<svg/>")
    fresh.write_text("<svg/>")  # maybe a concurrent run's, about to be linked: kept
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    section = {"method": "network", "label": "T1w -> X (network)", "space": "X",
               "fixed": volumes["fixed"], "warped": volumes["warped"],
               "moving_preproc": None, "jacobian": None, "metrics": {}}
    write_subject_report(subject="01", session=None, output_dir=tmp_path, sections=[section],
                         out_html=tmp_path / "sub-01.html")
    assert not old.exists() and fresh.exists()
    assert any(figures.glob("*Flicker_reg.svg"))  # the page's own figures stay


def test_subject_page_says_how_each_result_was_made(subject_report: Path) -> None:
    page = subject_report.read_text()
    assert "<h3>Settings</h3>" in page and "<td>Step_2_final.trch</td>" in page
    assert "<td>175 x 175 x 175</td>" in page and "/models/" not in page
    assert page.count("<h3>Settings</h3>") == 1  # the ANTs sections gave none


def test_subject_page_inlines_no_image_data(subject_report: Path) -> None:
    page = subject_report.read_text()
    assert "base64" not in page and "data:image" not in page
    assert len(page.encode()) < 50_000


def test_flicker_figure_has_background_and_foreground_layers(subject_report: Path) -> None:
    figures = subject_report.parent / "sub-01" / "figures"
    svg = next(figures.glob("*unigradiconFlicker_reg.svg")).read_text()
    assert 'class="background-svg"' in svg and 'class="foreground-svg"' in svg
    assert "@keyframes" in svg


def test_registrations_without_outputs_are_named_at_the_top(subject_report: Path) -> None:
    page = subject_report.read_text()
    notice = page.split('<section id="missing">')[1].split("</section>")[0]
    assert "(ants-synquick): missing &lt;warped&gt; &amp; co</li>" in notice
    assert page.index('id="missing"') < page.index("<nav>")


def test_best_values_are_compared_within_one_registration_only() -> None:
    from regpipe.reports import _comparison_table

    def section(method: str, session: str, runtime: float, sd: float) -> dict:
        warped = f"/o/sub-01_ses-{session}_space-MNI_desc-preproc_T1w.nii.gz"
        return {"method": method, "space": "MNI", "warped": warped,
                "metrics": {"runtime_s": runtime, "sd_log_jacobian": sd}}

    table = _comparison_table([section("network", "1", 10.6, 0.3),
                               section("ants-affine", "1", 15.4, 0.0),
                               section("network", "2", 3.4, 0.3)])
    rows = table.split("<tr>")[2:]  # after the header
    # session 1: the network's 10.6 s is the best of its image (session 2's 3.4 s is alone)
    assert '<td class="num best">10.6</td>' in rows[0]
    assert "best" not in rows[1] and "best" not in rows[2]  # SD log J 0.000 is no score


def test_labels_are_html_escaped(subject_report: Path) -> None:
    page = subject_report.read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page


def test_missing_metrics_show_as_not_available(subject_report: Path) -> None:
    page = subject_report.read_text()
    syn_row = re.search(r"<tr><td>ANTs SyN</td>.*?</tr>", page)
    assert syn_row is not None
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", syn_row.group(0))
    assert cells[3] == "12.5" and cells[4:] == ["n/a"] * 6
    assert "<p>No metrics.</p>" in page  # ants-affine has an empty metrics dict


def test_mean_dice_comes_from_per_label_dice(subject_report: Path) -> None:
    assert '<td class="num">0.750</td>' in subject_report.read_text()


def test_unreadable_image_costs_its_figures_not_the_report(subject_report: Path) -> None:
    page = subject_report.read_text()
    assert page.count("Figure not available: InputError") == 2  # flicker and contours
    assert "not-there.nii.gz does not exist" in page
    assert "No Jacobian map for this method." in page


@pytest.mark.parametrize("subject", ["../x", "01_ses-1", ""])
def test_subject_label_that_is_not_bids_is_refused(subject: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a BIDS label"):
        write_subject_report(
            subject=subject, session=None, output_dir=tmp_path, sections=[{}],
            out_html=tmp_path / "x.html",
        )  # fmt: skip


def test_subject_without_sections_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no registration"):
        write_subject_report(
            subject="01", session=None, output_dir=tmp_path, sections=[],
            out_html=tmp_path / "x.html",
        )  # fmt: skip


def test_cuts_lie_inside_the_image(volumes: dict[str, Path]) -> None:
    image = nib.load(volumes["fixed"])
    cuts = cut_coordinates(volumes["fixed"], cuts_per_view=4)
    corners = np.array([[i, j, k, 1] for i in (0, 23) for j in (0, 23) for k in (0, 23)])
    world = (image.affine @ corners.T)[:3]
    for axis, view in enumerate("xyz"):
        assert len(cuts[view]) == 4
        assert world[axis].min() <= min(cuts[view]) <= max(cuts[view]) <= world[axis].max()


# -------------------------------------------------------------------------------- group report


def test_group_page_links_its_plots_by_relative_paths(group_report: Path) -> None:
    links = [link for link in _parse(group_report.read_text()).links if not link.startswith("#")]
    assert sorted(links) == sorted(
        f"figures/group_{key}_plot.svg"
        for key in (
            "dicemean",
            "foldingpercent",
            "sdlogjacobian",
            "nccafter",
            "runtimes",
            "peakmemorymb",
        )
    )
    assert all((group_report.parent / link).is_file() for link in links)
    # pybids reads the last part of a name as the suffix: never a metric's word
    assert all(link.endswith("_plot.svg") for link in links)


def test_group_summary_gives_median_and_quartiles(group_report: Path) -> None:
    page = group_report.read_text()
    # unigradicon runtimes 11, 12, 13: median 12, quartiles 11.5 and 12.5
    assert "12 [11.5, 12.5]" in page
    assert re.search(r"<td>ants-syn</td><td class=\"num\">3</td><td class=\"num\">n/a</td>", page)


def test_group_failures_are_listed_escaped(group_report: Path) -> None:
    page = group_report.read_text()
    assert "corrupt &lt;NIfTI&gt; &amp; truncated" in page
    assert "<td>04</td>" in page


def test_group_summary_never_pools_targets(tmp_path: Path) -> None:
    rows = [{"subject": "01", "method": "network", "target": "MNI", "runtime_s": 10.0},
            {"subject": "01", "method": "network", "target": "MNI res-2", "runtime_s": 2.0},
            {"subject": "02", "method": "network", "target": "MNI", "runtime_s": 12.0}]
    page = write_group_report(rows, [], tmp_path / "g.html").read_text()
    assert re.search(r"<td>network / MNI</td><td class=\"num\">2</td>", page)
    assert re.search(r"<td>network / MNI res-2</td><td class=\"num\">1</td>", page)
    assert "<th>target</th>" in page  # and the table of all registrations names it


def test_group_summary_never_pools_weights(tmp_path: Path) -> None:
    # sub-02 run again with new weights: two models, two summary rows; ANTs has no weights
    rows = [{"subject": "01", "method": "network", "weights_sha256": "a" * 64, "runtime_s": 10.0},
            {"subject": "02", "method": "network", "weights_sha256": "b" * 64, "runtime_s": 2.0},
            {"subject": "03", "method": "network", "weights_sha256": "a" * 64, "runtime_s": 12.0},
            {"subject": "01", "method": "ants-syn", "weights_sha256": None, "runtime_s": 40.0}]
    page = write_group_report(rows, [], tmp_path / "group.html").read_text()
    summary = page.split('id="summary"')[1].split("</section>")[0]
    assert "network [weights aaaaaaaaaaaa]</td><td class=\"num\">2<" in summary
    assert "network [weights bbbbbbbbbbbb]</td><td class=\"num\">1<" in summary
    assert "ants-syn</td>" in summary and "ants-syn [weights" not in summary
    one_model = [dict(row, weights_sha256="a" * 64) for row in rows[:3]]
    page = write_group_report(one_model, [], tmp_path / "one.html").read_text()
    assert "[weights" not in page
    # the same weights applied once and twice (read back from a TSV: strings) are two models
    passes = [dict(row, network_passes=n)
              for row, n in zip(one_model, ("1", "2", "1"), strict=True)]
    summary = write_group_report(passes, [], tmp_path / "passes.html").read_text().split(
        'id="summary"')[1].split("</section>")[0]
    assert "network [1 pass(es)]</td><td class=\"num\">2<" in summary
    assert "network [2 pass(es)]</td><td class=\"num\">1<" in summary
    # a conditional network at two smoothness settings: two summary rows too
    lams = [dict(row, condition_region="brain", condition_lam=lam)
            for row, lam in zip(one_model, ("1.5", "20", "1.5"), strict=True)]
    summary = write_group_report(lams, [], tmp_path / "lams.html").read_text().split(
        'id="summary"')[1].split("</section>")[0]
    assert "network [lam 1.5]</td><td class=\"num\">2<" in summary
    assert "network [lam 20]</td><td class=\"num\">1<" in summary


def test_group_metric_without_values_draws_nothing(tmp_path: Path) -> None:
    rows = [{"method": "a", "dice_mean": "n/a"}, {"method": "b"}]
    assert plot_group_metric(rows, "dice_mean", tmp_path / "dice.svg") is None
    assert not (tmp_path / "dice.svg").exists()
    # an earlier group report's Dice plot is removed, not left beside a page without Dice
    figures = tmp_path / "figures"
    with_dice = [{"method": "a", "dice_mean": 0.7}, {"method": "a", "dice_mean": 0.8}]
    write_group_report(with_dice, [], tmp_path / "group.html", figures_dir=figures)
    assert (figures / "group_dicemean_plot.svg").exists()
    write_group_report(rows, [], tmp_path / "group.html", figures_dir=figures)
    assert not (figures / "group_dicemean_plot.svg").exists()


# ------------------------------------------------------------------------------------- browser

CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-browser", "google-chrome")
        if shutil.which(n)
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium)",
)


def _render(page: Path, folder: Path) -> tuple[_Links, np.ndarray]:
    """Open ``page`` from file:// in headless Chromium: the DOM after load, and a screenshot."""
    from matplotlib.image import imread

    screenshot = folder / "screenshot.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={folder / 'profile'}",
        "--window-size=1000,1400",
        "--virtual-time-budget=15000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return _parse(done.stdout), imread(screenshot)


def _assert_all_figures_loaded(page: Path, folder: Path) -> None:
    expected = len(_parse(page.read_text()).figures)
    dom, pixels = _render(page, folder)
    assert expected > 0
    assert dom.body.get("data-figures-broken") == "0", dom.figures
    assert dom.body.get("data-figures-loaded") == str(expected)
    assert all(figure.get("data-loaded") == "1" for figure in dom.figures)
    grey = pixels[..., :3].mean(axis=-1)
    assert grey.std() > 0.05  # not blank: text, tables and figures
    assert (grey < 0.2).mean() > 0.01 and (grey > 0.8).mean() > 0.1


@needs_chromium
def test_browser_loads_every_subject_figure(subject_report: Path, tmp_path: Path) -> None:
    _assert_all_figures_loaded(subject_report, tmp_path)


@needs_chromium
def test_browser_loads_every_group_figure(group_report: Path, tmp_path: Path) -> None:
    _assert_all_figures_loaded(group_report, tmp_path)


@needs_chromium
def test_browser_check_detects_a_missing_figure(subject_report: Path, tmp_path: Path) -> None:
    page = subject_report.read_text()
    broken = subject_report.parent / "broken.html"
    broken.write_text(re.sub(r'src="[^"]+"', 'src="sub-01/figures/missing.svg"', page, count=1))
    dom, _ = _render(broken, tmp_path)
    assert dom.body.get("data-figures-broken") == "1"
    assert [f.get("data-loaded") for f in dom.figures].count("0") == 1


def test_figures_of_several_images_are_named_by_their_entities(volumes, tmp_path) -> None:
    """Two sessions on one page: each image's figures are named after its session, whatever
    the order of the sections (an index would rename them when a session is added)."""
    import shutil

    sections = []
    for session in ("2", "1"):
        warped = tmp_path / f"sub-01_ses-{session}_run-1_space-X_desc-network_T1w.nii.gz"
        shutil.copy(volumes["warped"], warped)
        sections.append({"method": "network", "space": "X", "fixed": volumes["fixed"],
                         "warped": warped, "moving_preproc": None, "jacobian": None,
                         "metrics": {}})
    for order in (sections, sections[::-1]):
        write_subject_report(subject="01", session=None, output_dir=tmp_path,
                             sections=order, out_html=tmp_path / "sub-01.html")
    names = sorted(p.name for p in (tmp_path / "sub-01" / "figures").glob("*Flicker_reg.svg"))
    assert names == ["sub-01_ses-1_run-1_space-X_desc-networkFlicker_reg.svg",
                     "sub-01_ses-2_run-1_space-X_desc-networkFlicker_reg.svg"]
    # a page of one session already names it: not repeated
    write_subject_report(subject="01", session="1", output_dir=tmp_path,
                         sections=sections[1:], out_html=tmp_path / "one.html")
    assert "sub-01_ses-1_run-1_space-X_desc-networkFlicker_reg.svg" in (
        tmp_path / "one.html").read_text()
    # one image to a template at two resolutions: named by res, not by position
    for section, res in zip(sections, ("2", "1"), strict=True):
        target = tmp_path / f"sub-01_ses-1_space-X_res-{res}_desc-network_T1w.nii.gz"
        shutil.copy(section["warped"], target)
        section["warped"] = target
    write_subject_report(subject="01", session="1", output_dir=tmp_path, sections=sections,
                         out_html=tmp_path / "res.html")
    page = (tmp_path / "res.html").read_text()
    for res in ("1", "2"):
        assert f"sub-01_ses-1_space-X_res-{res}_desc-networkFlicker_reg.svg" in page
