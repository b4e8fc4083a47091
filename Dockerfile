# regpipe, the BIDS App, in a container: CPU by default, CUDA through a build argument.
#
#   docker build -t regpipe/regpipe:0.1.0 .                                          # CPU
#   docker build --build-arg TORCH_VARIANT=cu128 -t regpipe/regpipe:0.1.0-cu128 .    # CUDA
#   docker build --build-arg PREFETCH=0 -t regpipe/regpipe:0.1.0-slim .   # no templates/weights
#
# The build needs the network (PyPI, the PyTorch wheel index, TemplateFlow, GitHub releases);
# the image then runs offline: the default TemplateFlow templates and the official uniGradICON
# and multiGradICON weights are inside it, readable by every user, and REGPIPE_OFFLINE=1 makes a
# missing resource fail at once with the command that fetches it. It runs under any UID
# (Singularity/Apptainer keeps the caller's) and writes nothing to $HOME.
# containers/regpipe.def is the same recipe for Apptainer; tests/test_containers.py keeps the
# two in sync, lints this file with hadolint and checks what it copies and installs.
FROM python:3.11-slim-bookworm

# VERSION must equal setup.py's version (tested); VCS_REF: the git commit built.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
# PyTorch wheel index: cpu, or a CUDA build such as cu126 or cu128 (the host needs the driver).
ARG TORCH_VARIANT=cpu
# 1: bake the templates and weights below into the image; 0: skip them.
ARG PREFETCH=1
# Comma-separated lists: TemplateFlow identifiers, their resolutions, registry weights names.
ARG TEMPLATES=MNI152NLin2009cAsym
ARG TEMPLATE_RESOLUTIONS=1,2
ARG WEIGHTS=unigradicon,multigradicon

LABEL org.opencontainers.image.title="regpipe" \
      org.opencontainers.image.description="Foundation-network registration compared with ANTs (BIDS App)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/regpipe/regpipe" \
      org.opencontainers.image.licenses="Apache-2.0"

# Every cache lives inside the image or under /tmp, never in $HOME; and packages in the
# host's ~/.local (Apptainer mounts $HOME) never shadow the image's own.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONNOUSERSITE=1 \
    REGPIPE_HOME=/opt/regpipe \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    MPLCONFIGDIR=/tmp/matplotlib \
    NIPYPE_NO_ET=1 \
    OMP_WAIT_POLICY=PASSIVE \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    REGPIPE_CONTAINER=docker:regpipe/regpipe:${VERSION}

WORKDIR /src
COPY setup.py README.md constraints.txt ./
COPY regpipe ./regpipe
COPY workflows ./workflows
COPY bids_app ./bids_app

# torch first, from the chosen wheel index and at the version constraints.txt pins; then the
# package with setup.py's own requirements under the same constraints.
RUN pip install -c constraints.txt \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" torch \
    && pip install -c constraints.txt . \
    && rm -rf /src
WORKDIR /tmp

RUN mkdir -p "${REGPIPE_HOME}" "${TEMPLATEFLOW_HOME}" \
    && if [ "${PREFETCH}" = 1 ]; then ( \
           IFS=, ; \
           for template in ${TEMPLATES}; do \
               for resolution in ${TEMPLATE_RESOLUTIONS}; do \
                   regpipe-templates fetch "${template}" --resolution "${resolution}" \
                       --suffix T1w T2w \
                       || exit 1; \
               done; \
           done; \
           for name in ${WEIGHTS}; do \
               regpipe-weights fetch "${name}" --quiet && regpipe-weights verify "${name}" \
                   || exit 1; \
           done ); \
       fi \
    && chmod -R a+rX "${REGPIPE_HOME}" "${TEMPLATEFLOW_HOME}"

RUN useradd --no-log-init --create-home --uid 1000 --user-group regpipe

ENV REGPIPE_OFFLINE=1
USER 1000:1000
ENTRYPOINT ["regpipe"]
CMD ["--help"]
