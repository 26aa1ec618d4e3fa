# The GPU worker image that the `finestyle-pipeline-gpu` deployment (prefect.yaml) runs in:
#   docker build -t finestyle:0.1.0-gpu .
# CUDA 12 runtime with cuDNN 9 (what onnxruntime-gpu 1.31 and TensorRT 10 need; torch's wheel brings
# its own CUDA libraries), the project with its `gpu` extra, and a non-root user.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FINESTYLE_CHECKOUT=/opt/finestyle \
    HF_HOME=/data/hf

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 finestyle \
    && mkdir -p /data && chown finestyle /data

WORKDIR /opt/finestyle
COPY pyproject.toml README.md ./
COPY finestyle ./finestyle
COPY flows ./flows
RUN pip install ".[gpu]"
COPY configs ./configs
COPY data/examples ./data/examples
COPY prefect.yaml ./

USER finestyle
CMD ["finestyle", "--help"]
