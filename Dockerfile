# regpipe container (CPU). The BIDS App entry point and the CUDA variant arrive with the
# containers issue; for now the image runs the pairwise tools.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="regpipe" \
      org.opencontainers.image.description="Foundation-network image registration compared with ANTs" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REGPIPE_HOME=/opt/regpipe \
    MPLCONFIGDIR=/tmp/matplotlib \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /src
COPY setup.py README.md constraints.txt ./
COPY regpipe ./regpipe
COPY workflows ./workflows
COPY bids_app ./bids_app
RUN pip install -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install -c constraints.txt . \
    && mkdir -p /opt/regpipe && chmod -R a+rX /opt/regpipe

RUN useradd --create-home --uid 1000 regpipe
USER regpipe
WORKDIR /work
ENTRYPOINT ["regpipe-register"]
