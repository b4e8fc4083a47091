"""Benchmark measures, pairs files and the ``regpipe-bench`` command (tiny synthetic volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from regpipe import bench
from regpipe.bench import MethodSpec, PairSpec, parse_methods, read_pairs
from regpipe.bench_pairs import load_pair
from regpipe.cli.bench import main
from regpipe.errors import InputError
from regpipe.evaluation import (
    Landmarks,
    evaluate_transform,
    hd95,
    jacobian_in_region,
    landmark_errors,
    match_landmarks,
    parse_label_list,
    read_fcsv,
    write_fcsv,
)
from regpipe.metrics import dice_per_label, jacobian_determinant
from regpipe.spaces import Geometry
from regpipe.transforms import AffineTransform, DisplacementField

SHAPE = (24, 24, 24)
SPACING = 1.5
SHIFT_MM = np.array([3.0, -1.5, 0.0])  # moving content = fixed content moved by this


def _geometry(spacing=(SPACING, SPACING, SPACING)) -> Geometry:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -17.0
    return Geometry(SHAPE, affine)


def _cube(lo: int, hi: int, shift: int = 0, axis: int = 0) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return np.roll(mask, shift, axis=axis)


def _translation(mm) -> AffineTransform:
    matrix = np.eye(4)
    matrix[:3, 3] = mm
    return AffineTransform(matrix)


# --------------------------------------------------------------------------- overlap, HD95


def test_dice_of_cubes_shifted_by_a_quarter_is_three_quarters():
    fixed = _cube(4, 12).astype(np.int16)
    moving = _cube(4, 12, shift=2).astype(np.int16)
    assert dice_per_label(fixed, moving) == {1: pytest.approx(0.75)}


def test_hd95_of_shifted_one_voxel_slabs_is_the_shift_in_mm():
    a = np.zeros(SHAPE, bool)
    a[4, 2:22, 2:22] = True
    b = np.roll(a, 3, axis=0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(1.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_hd95_of_identical_masks_is_zero_and_of_an_empty_mask_nan():
    cube = _cube(4, 12)
    assert hd95(cube, cube) == 0.0
    assert np.isnan(hd95(cube, np.zeros(SHAPE, bool)))


def test_hd95_matches_brute_force_surface_distances():
    a = _cube(5, 13)
    b = np.roll(_cube(4, 11), 2, axis=1)
    spacing = np.array([1.0, 0.7, 2.0])

    def surface(mask):
        inner = mask.copy()
        inner[1:-1, 1:-1, 1:-1] = (mask[1:-1, 1:-1, 1:-1] & mask[:-2, 1:-1, 1:-1]
                                   & mask[2:, 1:-1, 1:-1] & mask[1:-1, :-2, 1:-1]
                                   & mask[1:-1, 2:, 1:-1] & mask[1:-1, 1:-1, :-2]
                                   & mask[1:-1, 1:-1, 2:])
        return np.argwhere(mask & ~inner) * spacing

    distances = cdist(surface(a), surface(b))
    expected = max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))
    assert hd95(a, b, spacing) == pytest.approx(expected)


# --------------------------------------------------------------------------- landmarks


def test_tre_of_identity_is_the_displacement_magnitude():
    fixed = np.array([[0.0, 0.0, 0.0], [10.0, -4.0, 2.0], [-3.0, 7.0, 5.0]])
    errors = landmark_errors(AffineTransform.identity(), fixed, fixed + SHIFT_MM)
    np.testing.assert_allclose(errors, np.linalg.norm(SHIFT_MM))


def test_tre_maps_fixed_landmarks_through_the_pull_back():
    fixed = np.array([[1.0, 2.0, 3.0], [-5.0, 0.0, 8.0]])
    moving = fixed + SHIFT_MM
    # the transform maps fixed points to moving points: T(x) = x + shift is exact
    np.testing.assert_allclose(landmark_errors(_translation(SHIFT_MM), fixed, moving), 0.0,
                               atol=1e-12)
    # the other direction would be off by twice the shift
    np.testing.assert_allclose(landmark_errors(_translation(-SHIFT_MM), fixed, moving),
                               2 * np.linalg.norm(SHIFT_MM))


FCSV_BODY = (
    "vtkMRMLMarkupsFiducialNode_1,1.5,-2.0,3.0,0,0,0,1,1,1,0,AC,,vtkMRMLScalarVolumeNode1\n"
    "vtkMRMLMarkupsFiducialNode_2,-4.0,5.0,-6.5,0,0,0,1,1,1,0,PC,,vtkMRMLScalarVolumeNode1\n"
)
COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"


@pytest.mark.parametrize("header, lps", [
    ("# CoordinateSystem = 0\n", False),
    ("# CoordinateSystem = RAS\n", False),
    ("# CoordinateSystem = 1\n", True),
    ("# CoordinateSystem = LPS\n", True),
    ("", False),  # Slicer < 4.11 wrote no coordinate system line: RAS
])
def test_read_fcsv_handles_ras_and_lps_headers(tmp_path, header, lps):
    path = tmp_path / "points.fcsv"
    path.write_text("# Markups fiducial file version = 4.6\n" + header + COLUMNS + FCSV_BODY)
    landmarks = read_fcsv(path)
    expected = np.array([[1.5, -2.0, 3.0], [-4.0, 5.0, -6.5]])
    if lps:
        expected[:, :2] *= -1
    np.testing.assert_allclose(landmarks.points, expected)
    assert landmarks.labels == ("AC", "PC")


def test_read_fcsv_follows_the_columns_line(tmp_path):
    path = tmp_path / "points.fcsv"
    path.write_text("# CoordinateSystem = 0\n# columns = label,z,y,x\nAC,3,2,1\n")
    landmarks = read_fcsv(path)
    np.testing.assert_allclose(landmarks.points, [[1.0, 2.0, 3.0]])
    assert landmarks.labels == ("AC",)


def test_read_fcsv_refuses_ijk_and_empty_files(tmp_path):
    path = tmp_path / "ijk.fcsv"
    path.write_text("# CoordinateSystem = 2\n" + FCSV_BODY)
    with pytest.raises(InputError, match="not RAS"):
        read_fcsv(path)
    path.write_text("# CoordinateSystem = 0\n")
    with pytest.raises(InputError, match="no points"):
        read_fcsv(path)


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_write_fcsv_round_trips(tmp_path, system):
    points = np.array([[1.25, -2.5, 3.0], [4.0, 5.5, -6.0]])
    path = write_fcsv(tmp_path / "p.fcsv", points, ["a", "b"], system=system)
    assert f"CoordinateSystem = {system}" in path.read_text()
    landmarks = read_fcsv(path)
    np.testing.assert_allclose(landmarks.points, points)
    assert landmarks.labels == ("a", "b")


def test_landmarks_are_matched_by_label_when_labels_are_unique():
    fixed = Landmarks(np.array([[0.0, 0, 0], [1, 1, 1], [2, 2, 2]]), ("AC", "PC", "X"))
    moving = Landmarks(np.array([[11.0, 11, 11], [10, 10, 10]]), ("PC", "AC"))
    f, m, labels = match_landmarks(fixed, moving)
    assert labels == ("AC", "PC")
    np.testing.assert_allclose(m - f, 10.0)


def test_landmarks_without_labels_need_equal_counts():
    fixed = Landmarks(np.zeros((3, 3)), ("", "", ""))
    with pytest.raises(InputError, match="differ in size"):
        match_landmarks(fixed, Landmarks(np.zeros((2, 3)), ("", "")))


# --------------------------------------------------------------------------- Jacobian, all


def test_jacobian_in_region_equals_the_whole_grid_computation():
    geometry = _geometry((1.0, 1.2, 0.9))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    field = np.stack([np.sin(ijk[..., 1] / 4.0), 0.5 * np.cos(ijk[..., 2] / 3.0),
                      0.3 * np.sin(ijk[..., 0] / 5.0)], -1).astype(np.float32)
    transform = DisplacementField(geometry, field)
    region = _cube(6, 15)
    whole = jacobian_determinant(transform)[region]
    np.testing.assert_allclose(jacobian_in_region(transform, geometry, region), whole,
                               rtol=1e-5)


def test_evaluate_transform_on_a_known_shift():
    geometry = _geometry()
    fixed_labels = (_cube(6, 14).astype(np.int16) + _cube(9, 12)).astype(np.int16)
    shift_voxels = 2
    moving_labels = np.roll(fixed_labels, shift_voxels, axis=0)  # content moved +3 mm in x
    shift = np.array([shift_voxels * SPACING, 0.0, 0.0])
    points = np.array([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0]])
    common = {"region": fixed_labels > 0, "fixed_labels": fixed_labels,
              "moving_labels": (moving_labels, geometry), "fixed_points": points,
              "moving_points": points + shift}
    exact = evaluate_transform(_translation(shift), geometry, **common)
    assert exact["dice_mean"] == pytest.approx(1.0)
    assert exact["hd95_mean_mm"] == pytest.approx(0.0)
    assert exact["tre_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    assert exact["folding_percent"] == 0.0
    assert exact["sd_log_jacobian"] == pytest.approx(0.0, abs=1e-6)
    identity = evaluate_transform(AffineTransform.identity(), geometry, **common)
    assert identity["tre_max_mm"] == pytest.approx(3.0)
    assert identity["dice"]["1"] < 1.0 and identity["n_labels"] == 2
    assert identity["hd95"]["2"] == pytest.approx(3.0)  # a 3-voxel cube moved by 2 voxels


def test_parse_label_list_accepts_ranges():
    assert parse_label_list("2-4, 7;10") == (2, 3, 4, 7, 10)
    with pytest.raises(InputError):
        parse_label_list("a-b")


# --------------------------------------------------------------------------- specs and files


def test_parse_methods_builds_specs():
    methods = parse_methods("identity,affine,ours,ours+io,ants-syn", weights="none",
                            io_iterations=7)
    assert [m.name for m in methods] == ["identity", "affine", "ours", "ours+io", "ants-syn"]
    assert methods[1] == MethodSpec("affine", "ours")
    assert methods[3].io_iterations == 7 and methods[3].weights is None
    assert methods[4].ants_method == "syn"
    with pytest.raises(InputError, match="unknown method"):
        parse_methods("ants-elastix")


def test_parse_methods_gives_the_condition_to_the_network_methods_only():
    methods = parse_methods("affine,ours,ours+io,ants-syn", weights="w.pt",
                            condition={"region": "brain", "pair_type": None, "smoothness": 3.0})
    assert [m.condition() for m in methods] == [
        {}, {"region": "brain", "smoothness": 3.0}, {"region": "brain", "smoothness": 3.0}, {}]
    assert "region" not in methods[0].config() and methods[1].config()["smoothness"] == 3.0
    assert methods[0].config() == MethodSpec("affine", "ours").config()  # earlier results match
    assert "symmetric" not in methods[0].config() and methods[1].config()["symmetric"] is True
    single = parse_methods("ours", weights="w.pt", symmetric=False)[0]
    assert single.config()["symmetric"] is False  # a resumed run does not mix the two
    assert "network_passes" not in single.config()  # one pass: rows of earlier runs match
    twice = parse_methods("ours,affine", weights="w.pt", network_passes=2)
    with pytest.raises(InputError, match="need a network"):
        parse_methods("ours", weights="none", network_passes=2)
    assert twice[0].config()["network_passes"] == 2 and "network_passes" not in twice[1].config()


def test_cli_refuses_a_condition_for_unconditional_weights(pair_files, tmp_path, capsys):
    from regpipe.networks import NetworkConfig, build_network, save_weights

    weights = save_weights(build_network(NetworkConfig((17, 17, 17), 1, (4, 8), (4, 8))),
                           tmp_path / "plain.pt")
    code = main(["--pairs", str(pair_files / "pairs.json"), "--methods", "affine,ours",
                 "--weights", str(weights), "--smoothness", "3", "--output",
                 str(tmp_path / "o")])
    assert code == 1 and "ours has" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _write_pairs(tmp_path: Path, fmt: str) -> Path:
    if fmt == "json":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps([{"fixed": "f.nii.gz", "moving": "m.nii.gz",
                                     "modality": "CT", "labels": "1-3"}]))
    elif fmt == "yaml":
        path = tmp_path / "pairs.yaml"
        path.write_text("pairs:\n  - fixed: f.nii.gz\n    moving: m.nii.gz\n"
                        "    modality: ct\n    labels: [1, 2, 3]\n")
    else:
        path = tmp_path / "pairs.csv"
        path.write_text('fixed,moving,modality,labels,mask\nf.nii.gz,m.nii.gz,ct,"1,2,3",\n')
    return path


@pytest.mark.parametrize("fmt", ["json", "yaml", "csv"])
def test_read_pairs_from_json_yaml_and_csv(tmp_path, fmt):
    if fmt == "yaml":
        pytest.importorskip("yaml")
    (pair,) = read_pairs(_write_pairs(tmp_path, fmt))
    assert pair.fixed == tmp_path / "f.nii.gz" and pair.moving == tmp_path / "m.nii.gz"
    assert pair.fixed_modality == pair.moving_modality == "ct"
    assert pair.labels == (1, 2, 3) and pair.mask is None
    assert pair.name == "f__m"


def test_read_pairs_rejects_unknown_fields(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"fixed": "f.nii.gz", "moving": "m.nii.gz", "fixd_mask": "x"}]))
    with pytest.raises(InputError, match="fixd_mask"):
        read_pairs(path)


# --------------------------------------------------------------------------- the command


def _phantom(geometry: Geometry, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    xyz = geometry.voxel_to_world(ijk.astype(float)) - centre
    r = np.linalg.norm(xyz / [9.0, 7.0, 6.0], axis=-1)
    image = np.exp(-3 * r**2) + 0.5 * np.exp(-np.sum((xyz - [3.0, -2.0, 0.0]) ** 2, -1) / 6)
    labels = (r < 0.9).astype(np.int16) + ((r < 0.9) & (xyz[..., 0] > 0)).astype(np.int16)
    return image.astype(np.float32), labels


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> Path:
    """A good pair (moving = fixed moved by SHIFT_MM, labels and landmarks; the moving
    landmarks stored in LPS) and a broken one (0-byte moving image)."""
    folder = tmp_path_factory.mktemp("bench_pairs")
    geometry = _geometry()
    for name, centre in (("fixed", np.zeros(3)), ("moving", SHIFT_MM)):
        image, labels = _phantom(geometry, centre)
        nib.save(nib.Nifti1Image(image, geometry.affine), folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(labels, geometry.affine), folder / f"{name}_labels.nii.gz")
    points = np.array([[0.0, 0.0, 0.0], [4.0, 2.0, -1.0], [-3.0, 1.0, 2.0]])
    write_fcsv(folder / "fixed.fcsv", points, ["a", "b", "c"])
    write_fcsv(folder / "moving.fcsv", points + SHIFT_MM, ["a", "b", "c"], system="LPS")
    (folder / "empty.nii.gz").write_bytes(b"")
    good = {"name": "good", "fixed": "fixed.nii.gz", "moving": "moving.nii.gz",
            "fixed_labels": "fixed_labels.nii.gz", "moving_labels": "moving_labels.nii.gz",
            "fixed_landmarks": "fixed.fcsv", "moving_landmarks": "moving.fcsv"}
    broken = {"name": "broken", "fixed": "fixed.nii.gz", "moving": "empty.nii.gz"}
    (folder / "pairs.json").write_text(json.dumps({"pairs": [good, broken]}))
    return folder


METHODS = "identity,affine,ours+io"


def _run(pair_files: Path, output: Path, *extra: str, methods: str = METHODS) -> int:
    return main(["--pairs", str(pair_files / "pairs.json"), "--methods", methods,
                 "--weights", "none", "--io-iterations", "5", "--threads", "1",
                 "--output", str(output), "--quiet", *extra])


@pytest.fixture(scope="module")
def bench_run(pair_files, tmp_path_factory) -> tuple[Path, int]:
    output = tmp_path_factory.mktemp("bench_out")
    return output, _run(pair_files, output)


def _rows(output: Path) -> dict[tuple[str, str], dict]:
    data = json.loads((output / bench.RESULTS_JSON).read_text())
    return {(r["pair"], r["method"]): r for r in data["rows"]}


def test_cli_records_every_pair_and_method_and_fails_at_the_end(bench_run):
    output, code = bench_run
    assert code == 1  # the broken pair failed, the good one ran
    rows = _rows(output)
    assert len(rows) == 6
    for method in METHODS.split(","):
        assert rows["good", method]["status"] == "ok"
        assert rows["broken", method]["status"] == "error"
        assert "empty" in rows["broken", method]["error"]


def test_cli_measures_the_known_shift(bench_run):
    rows = _rows(bench_run[0])
    identity, affine = rows["good", "identity"], rows["good", "affine"]
    assert identity["tre_mean_mm"] == pytest.approx(np.linalg.norm(SHIFT_MM), abs=1e-6)
    assert identity["dice_mean"] < 0.8
    assert affine["dice_mean"] > 0.95 and affine["tre_max_mm"] < 0.5
    assert affine["folding_percent"] == 0.0
    assert rows["good", "ours+io"]["dice_mean"] > 0.9
    for row in (identity, affine):
        assert row["runtime_s"] >= 0 and row["peak_memory_mb"] > 0
        assert set(row["dice"]) == {"1", "2"}


def test_cli_writes_csv_markdown_and_plots(bench_run):
    output, _ = bench_run
    header = (output / bench.RESULTS_CSV).read_text().splitlines()[0].split(",")
    assert header[:4] == ["pair", "subset", "method", "status"]
    assert {"dice_1", "hd95_2", "tre_mean_mm", "runtime_s"} <= set(header)
    markdown = (output / "results.md").read_text()
    assert "| affine | 1/2 |" in markdown and "## Failures" in markdown
    assert "mean ± SD" in markdown
    for name in ("dice_boxplot.png", "runtime_vs_dice.png", "tre_boxplot.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_pairs(output / "pairs.json")) == 2


def test_cli_refuses_to_overwrite_results_without_resume(bench_run, pair_files, capsys):
    output, _ = bench_run
    assert _run(pair_files, output) == 1
    assert "--resume" in capsys.readouterr().err


def _watch_runs(monkeypatch, interrupt_at: int | None = None) -> list[tuple[str, str]]:
    """Record every ``(pair, method)`` that reaches ``bench.run_method``; with
    ``interrupt_at``, that call raises KeyboardInterrupt (Ctrl-C) instead of running."""
    calls: list[tuple[str, str]] = []
    original = bench.run_method

    def watched(method, pair, **kwargs):
        calls.append((pair.spec.name, method.name))
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(method, pair, **kwargs)

    monkeypatch.setattr(bench, "run_method", watched)
    return calls


def test_resume_reruns_only_failures_and_changed_settings(pair_files, tmp_path, monkeypatch):
    output = tmp_path / "out"
    assert _run(pair_files, output, methods="identity,affine") == 1
    calls = _watch_runs(monkeypatch)
    assert _run(pair_files, output, "--resume", methods="identity,affine,ours") == 1
    # the good pair's identity and affine rows are kept; ours is new. The broken pair never
    # loads, so no method of it reaches run_method.
    assert calls == [("good", "ours")]
    rows = _rows(output)
    assert rows["good", "affine"]["status"] == "ok" and len(rows) == 6
    assert _run(pair_files, output, "--resume", "--seed", "3", methods="affine") == 1
    assert calls[-1] == ("good", "affine")  # another seed is another result
    # the report covers this run's pairs x methods only; the other rows stay in results.json
    markdown = (output / "results.md").read_text()
    assert "| affine | 1/2 |" in markdown and "identity" not in markdown
    assert len(_rows(output)) == 6


def test_interrupted_run_leaves_a_partial_report(pair_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    _watch_runs(monkeypatch, interrupt_at=2)
    assert _run(pair_files, output, methods="identity,affine") == 130
    assert "interrupted after 1 of 4 result(s)" in capsys.readouterr().err
    assert "| identity | 1/1 |" in (output / "results.md").read_text()


def test_overwrite_with_bad_pairs_keeps_the_previous_results(pair_files, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(pair_files, output, methods="identity") == 1
    before = (output / bench.RESULTS_JSON).read_text()
    code = main(["--pairs", str(tmp_path / "missing.json"), "--methods", "identity",
                 "--weights", "none", "--output", str(output), "--overwrite", "--quiet"])
    assert code == 1 and "missing.json" in capsys.readouterr().err
    assert (output / bench.RESULTS_JSON).read_text() == before


def test_labels_asked_for_but_absent_are_named_and_not_scored(pair_files):
    present = sorted(int(v) for v in np.unique(nib.load(pair_files / "fixed_labels.nii.gz")
                                               .get_fdata()) if v)
    spec = PairSpec("p", pair_files / "fixed.nii.gz", pair_files / "moving.nii.gz",
                    fixed_labels=pair_files / "fixed_labels.nii.gz",
                    moving_labels=pair_files / "moving_labels.nii.gz",
                    labels=(*present, 90, 91))
    pair = load_pair(spec)
    assert any("2 of the" in note and "(90, 91)" in note for note in pair.notes), pair.notes
    metrics = evaluate_transform(
        AffineTransform.identity(), pair.fixed.geometry,
        fixed_labels=pair.fixed_labels.data,
        moving_labels=(pair.moving_labels.data, pair.moving_labels.geometry), labels=spec.labels)
    assert metrics["n_labels"] == len(present) and set(metrics["dice"]) == set(map(str, present))


def test_run_benchmark_rejects_duplicate_pair_names(tmp_path):
    pair = PairSpec("same", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")
    with pytest.raises(InputError, match="unique"):
        bench.run_benchmark([pair, pair], parse_methods("identity"), tmp_path)


def test_cli_fails_early_on_missing_weights(pair_files, tmp_path, capsys):
    code = main(["--pairs", str(pair_files / "pairs.json"), "--methods", "ours",
                 "--weights", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "o")])
    assert code == 1
    assert "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_runs_ants_affine_on_the_same_pair(pair_files, tmp_path):
    pytest.importorskip("ants")
    good = json.loads((pair_files / "pairs.json").read_text())["pairs"][0]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{**good, **{k: str(pair_files / v) for k, v in good.items()
                                             if k != "name"}}]))
    code = main(["--pairs", str(pairs), "--methods", "ants-affine", "--output",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 0
    (row,) = _rows(tmp_path / "out").values()
    assert row["status"] == "ok" and row["settings"]["deterministic"] is True
    assert row["runtime_s"] > 0 and row["peak_memory_mb"] > 0
    assert np.isfinite(row["dice_mean"]) and row["n_landmarks"] == 3


# --------------------------------------------------------------------------- development set


def _fake_shared(root: Path) -> Path:
    """A miniature shared data folder: four label maps, two templates, AFIDs-like files."""
    from regpipe.devset import BRAIN_MAX_LABEL

    geometry = _geometry()
    rng = np.random.default_rng(0)
    folder = root / "brain/synthseg_label_maps"
    folder.mkdir(parents=True)
    for index in range(1, 5):
        labels = np.zeros(SHAPE, np.int16)
        labels[1:23, 1:23, 1:23] = BRAIN_MAX_LABEL + 65  # extra-cerebral (not brain)
        lo = 3 + int(rng.integers(0, 2))
        labels[lo:21, 3:21, 3:21] = 2
        labels[lo + 4:20, 6:18, 6:18] = 4
        labels[lo:lo + 14, 3:21, 3:7] = 24  # CSF: 1008 voxels, but never scored
        nib.save(nib.Nifti1Image(labels, geometry.affine),
                 folder / f"training_seg_{index:02d}.nii.gz")
    image, _ = _phantom(geometry, np.zeros(3))
    for relative in ("brain/colin27/ch2bet.nii.gz", "brain/mni152_fsl6/MNI152_T1_1mm_brain.nii.gz",
                     "brain/mni_icbm152_2009/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, geometry.affine), root / relative)
    (root / "landmarks_afids").mkdir()
    for name in ("Colin27", "MNI152NLin6Asym", "MNI152NLin2009cAsym"):
        write_fcsv(root / f"landmarks_afids/tpl-{name}_afids.fcsv", np.eye(3), ["AC", "PC", "X"])
    return root


def test_dev_set_builds_synthetic_and_brain_pairs_into_a_reused_cache(tmp_path):
    from regpipe.devset import build_dev_set, synthetic_t1

    shared = _fake_shared(tmp_path / "shared")
    cache = tmp_path / "cache"
    pairs = build_dev_set(shared, cache, subset="synth", n_pairs=1)
    (pair,) = pairs
    assert pair.name == "training_seg_02_to_training_seg_01" and pair.subset == "synth"
    assert pair.labels == (2, 4)  # brain labels with >= 1000 voxels in both, not CSF
    assert pair.fixed.parent == cache / "v1" / "synth" and pair.fixed_labels.parent.name == (
        "synthseg_label_maps")
    mask = np.asarray(nib.load(pair.mask).dataobj)
    labels = np.asarray(nib.load(pair.fixed_labels).dataobj)
    np.testing.assert_array_equal(mask > 0, (labels > 0) & (labels < 100))
    stamp = pair.fixed.stat().st_mtime_ns
    assert build_dev_set(shared, cache, subset="synth", n_pairs=1) == pairs
    assert pair.fixed.stat().st_mtime_ns == stamp  # reused, not rewritten
    image = np.asarray(nib.load(pair.fixed).dataobj)
    np.testing.assert_array_equal(image, synthetic_t1(labels, seed=1))
    brain = build_dev_set(shared, cache, subset="brain")
    assert [p.name for p in brain] == ["colin27_to_MNI152NLin6Asym",
                                       "colin27_to_MNI152NLin2009cAsym"]
    assert all(p.fixed_landmarks and p.moving_landmarks and p.mask for p in brain)


def test_dev_set_names_missing_data(tmp_path):
    from regpipe.devset import build_dev_set

    with pytest.raises(InputError, match="knee"):
        build_dev_set(_fake_shared(tmp_path), tmp_path / "cache", subset="ood")
    with pytest.raises(InputError, match="subset"):
        build_dev_set(tmp_path, tmp_path / "cache", subset="lungs")


def test_written_pairs_read_back_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    pair = PairSpec("p", Path("f.nii.gz"), Path("m.nii.gz"), labels=(1, 2))
    bench.write_pairs([pair], tmp_path / "sub" / "pairs.json")
    (back,) = read_pairs(tmp_path / "sub" / "pairs.json")
    assert back.fixed == tmp_path / "f.nii.gz" and back.labels == (1, 2)


def test_overlap_per_label_matches_whole_volume_computations():
    from regpipe.evaluation import overlap_per_label

    rng = np.random.default_rng(4)
    fixed = np.zeros(SHAPE, np.int16)
    fixed[3:15, 4:18, 5:20] = 3
    fixed[10:20, 2:9, 8:14] = 7
    warped = np.roll(fixed, (1, -2, 1), axis=(0, 1, 2))
    warped[rng.random(SHAPE) < 0.01] = 3  # scattered false positives far from the object
    spacing = (1.0, 0.8, 1.3)
    dice, distance = overlap_per_label(fixed, warped, [3, 7, 9], spacing)
    reference = dice_per_label(fixed, warped, [3, 7, 9])
    for label in (3, 7):
        assert dice[label] == pytest.approx(reference[label])
        assert distance[label] == pytest.approx(hd95(fixed == label, warped == label, spacing))
    assert np.isnan(dice[9]) and np.isnan(distance[9])


def test_summary_table_takes_rows_without_status():
    from regpipe.bench_report import summary_table

    rows = [{"method": "network", "dice_mean": 0.7, "runtime_s": 10.0},
            {"method": "network", "dice_mean": 0.8, "runtime_s": 12.0},
            {"method": "ants-syn", "dice_mean": 0.75}]
    table = summary_table(rows).splitlines()
    assert table[0] == "| method | pairs ok | Dice | runtime (s) |"
    assert table[2] == "| network | 2/2 | 0.750 ± 0.071 | 11.0 ± 1.4 |"
    assert table[3] == "| ants-syn | 1/1 | 0.750 | - |"


def test_report_shows_lost_labels_conditions_and_survives_odd_text():
    from regpipe.bench_report import csv_text, markdown_report

    condition = {"region": "thorax", "pair_type": "inter", "lam": 20.0, "lam_requested": 50.0}
    rows = [
        # lost a label: a better-looking HD95 mean over fewer labels
        {"pair": "a|b", "method": "ours", "status": "ok", "dice_mean": 0.5, "hd95_mean_mm": 1.0,
         "hd95_missing": 1, "settings": {"smoothness": 50.0, "condition": condition}},
        {"pair": "a|b", "method": "syn", "status": "ok", "dice_mean": 0.7, "hd95_mean_mm": 2.0,
         "hd95_missing": 0, "settings": {}},
        {"pair": "c", "method": "syn", "status": "error",
         "error": "ITK ERROR:\n  line two | with a bar"},
    ]
    text = markdown_report(rows)
    assert "| ours | 1/1 | 0.500 | 1.00 | 1.0 |" in text  # labels lost beside HD95
    assert "| a\\|b | ours | ok | 0.500 | 1.00 | 1.0 |" in text  # the pair's bar escaped
    assert "| c | syn | failed |  |  |  |" in text  # a failed row keeps its columns
    assert "- `c` / `syn`: ITK ERROR: line two \\| with a bar" in text  # one line
    assert "- `ours`: region thorax, pair type inter, lam 20.0 (asked 50.0)" in text
    header, first = csv_text(rows).splitlines()[:2]
    values = dict(zip(header.split(","), first.split(","), strict=True))
    assert values["setting_condition_lam"] == "20" and values["setting_smoothness"] == "50"
    assert values["setting_condition_region"] == "thorax" and values["hd95_missing"] == "1"


def _good_pair_file(pair_files: Path, tmp_path: Path) -> Path:
    """A pairs file holding only the fixture's readable pair, with absolute paths."""
    good = json.loads((pair_files / "pairs.json").read_text())["pairs"][0]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{k: (v if k == "name" else str(pair_files / v))
                                  for k, v in good.items()}]))
    return pairs


def test_cli_runs_a_network_from_a_weights_file(pair_files, tmp_path):
    import torch

    from regpipe.networks import NetworkConfig, build_network, save_weights

    torch.manual_seed(0)
    network = build_network(NetworkConfig(grid_shape=(24, 24, 24), n_steps=1,
                                          down_channels=(4, 8, 8, 8, 8),
                                          up_channels=(4, 8, 8, 8, 8)))
    weights = save_weights(network, tmp_path / "tiny.pt", {"grid_mode": "isotropic"})
    pairs = _good_pair_file(pair_files, tmp_path)
    code = main(["--pairs", str(pairs), "--methods", "ours,ours+io", "--weights", str(weights),
                 "--io-iterations", "3", "--threads", "1", "--output", str(tmp_path / "out"),
                 "--quiet"])
    assert code == 0
    rows = _rows(tmp_path / "out")
    for method, steps in (("ours", 0), ("ours+io", 3)):
        settings = rows["good", method]["settings"]
        assert settings["weights"] == str(weights) and settings["io_iterations"] == steps
        assert settings["grid_mode"] == "isotropic" and settings["symmetric"] is True
        assert np.isfinite(rows["good", method]["dice_mean"])


def test_cli_passes_the_condition_to_a_conditional_network(pair_files, tmp_path):
    from regpipe.networks import (
        ConditionalRegistrationNetwork,
        ConditioningConfig,
        NetworkConfig,
        build_network,
        save_weights,
    )

    base = build_network(NetworkConfig((24, 24, 24), 1, (4, 8, 8, 8, 8), (4, 8, 8, 8, 8)))
    network = ConditionalRegistrationNetwork.from_base(base, ConditioningConfig("film"))
    weights = save_weights(network, tmp_path / "cond.pt", {"grid_mode": "isotropic"})
    pairs = _good_pair_file(pair_files, tmp_path)
    code = main(["--pairs", str(pairs), "--methods", "ours", "--weights", str(weights),
                 "--region", "knee", "--pair-type", "Intra", "--smoothness", "3",
                 "--no-symmetric", "--network-passes", "2", "--threads", "1",
                 "--output", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    settings = _rows(tmp_path / "out")["good", "ours"]["settings"]
    assert settings["condition"] == {"region": "knee", "pair_type": "intra", "lam": 3.0}
    assert settings["symmetric"] is False and settings["network_passes"] == 2


# --------------------------------------------------------------------------- review mends


def test_landmark_labels_used_twice_are_an_error_and_partial_overlap_is_noted(pair_files):
    fixed = Landmarks(np.zeros((4, 3)), ("A", "B", "C", "C"))
    with pytest.raises(InputError, match="name C more than once"):
        match_landmarks(fixed, Landmarks(np.zeros((4, 3)), ("C", "C", "B", "A")))
    spec = PairSpec.from_dict({"fixed": "fixed.nii.gz", "moving": "moving.nii.gz",
                               "fixed_landmarks": "fixed.fcsv", "moving_landmarks": "few.fcsv"},
                              base=pair_files)
    write_fcsv(pair_files / "few.fcsv", np.zeros((2, 3)), ["a", "x"])
    pair = load_pair(spec)
    assert len(pair.landmarks[0]) == 1  # "a" only
    assert any("3 point(s) named in one file only" in note for note in pair.notes)
    write_fcsv(pair_files / "few.fcsv", np.zeros((2, 3)), ["", ""])  # unnamed, other count
    pair = load_pair(spec)  # no TRE, but the pair still loads (its Dice and the rest count)
    assert pair.landmarks is None and any(note.startswith("no TRE") for note in pair.notes)


def test_a_label_the_warp_loses_is_counted_beside_the_hd95_mean():
    geometry = Geometry((20, 20, 20), np.eye(4))
    labels = np.zeros(geometry.shape, np.int16)
    labels[2:6, 2:6, 2:6], labels[12:18, 12:18, 12:18] = 1, 2
    shift = np.eye(4)
    shift[:3, 3] = [-10.0, -10.0, -10.0]  # label 2 lands on label 1; label 1 leaves the grid
    metrics = evaluate_transform(AffineTransform(shift), geometry, fixed_labels=labels,
                                 moving_labels=(labels, geometry))
    assert metrics["dice"]["2"] == 0.0 and metrics["hd95_missing"] >= 1


def test_pairs_files_bad_rows_bom_and_label_ranges(tmp_path):
    (tmp_path / "p.csv").write_text("fixed,moving,labels\nf.nii.gz,m.nii.gz,2-5,7\n")
    with pytest.raises(InputError, match="row 2 has more cells than the header"):
        read_pairs(tmp_path / "p.csv")
    (tmp_path / "p.csv").write_bytes("\ufefffixed,moving,labels\nf.nii.gz,m.nii.gz,\"2-4,7\"\n"
                                     .encode("utf-8"))  # a spreadsheet's byte-order mark
    (spec,) = read_pairs(tmp_path / "p.csv")
    assert spec.labels == (2, 3, 4, 7) and spec.fixed == tmp_path.resolve() / "f.nii.gz"
    (tmp_path / "p.json").write_text(json.dumps([{"fixed": "f", "moving": "m",
                                                  "labels": [1, "5-6"]}]))
    assert read_pairs(tmp_path / "p.json")[0].labels == (1, 5, 6)
    (tmp_path / "p.json").write_text(json.dumps([{"fixed": "f", "moving": "m",
                                                  "labels": ["x"]}]))
    with pytest.raises(InputError, match="pair 1"):
        read_pairs(tmp_path / "p.json")


def test_missing_files_fail_before_overwrite_removes_results(pair_files, tmp_path, capsys):
    output = tmp_path / "out"
    assert _run(pair_files, output, methods="identity") == 1
    before = (output / bench.RESULTS_JSON).read_text()
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{"fixed": str(pair_files / "fixed.nii.gz"),
                                 "moving": str(pair_files / "movign.nii.gz")}]))
    assert main(["--pairs", str(typo), "--methods", "identity", "--output", str(output),
                 "--overwrite", "--quiet"]) == 1
    assert "missing file(s)" in capsys.readouterr().err
    assert (output / bench.RESULTS_JSON).read_text() == before


def test_resume_redoes_rows_of_other_threads_and_the_csv_holds_this_run(
        pair_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    assert _run(pair_files, output, methods="identity,affine") == 1
    calls = _watch_runs(monkeypatch, interrupt_at=2)
    argv = ["--pairs", str(pair_files / "pairs.json"), "--methods", "identity,affine",
            "--threads", "2", "--output", str(output), "--resume", "--quiet"]
    assert main(argv) == 130  # other threads: nothing kept; stopped in the second row
    assert calls == [("good", "identity"), ("good", "affine")]
    # the partial report has the one row this run finished, not the stored rows it redid
    assert "interrupted after 1 of 4 result(s)" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*argv[:-1], "--methods", "identity", "--quiet"]) in (0, 1)
    csv_rows = (output / bench.RESULTS_CSV).read_text().strip().splitlines()[1:]
    assert len(csv_rows) == 2 and all(",identity," in row for row in csv_rows)
