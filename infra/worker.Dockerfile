# Prefect process worker for infra/docker-compose.yml: the edgeopt project installed at /opt/edgeopt,
# which is also the working directory of the deployments created from inside it (`edgeopt deploy`).
# Build context: the repository root (see worker.Dockerfile.dockerignore).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgeopt
COPY . .
# torch from the CPU index: PyPI's Linux wheel pulls several GB of CUDA libraries.
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
    && bash infra/setup.sh \
    && .venv/bin/pip install --no-cache-dir "dvc-s3==3.*"
ENV PATH=/opt/edgeopt/.venv/bin:$PATH
CMD ["prefect", "worker", "start", "--pool", "edgeopt", "--type", "process", "--limit", "1"]
