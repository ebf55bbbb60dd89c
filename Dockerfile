# One image for the API and the workers (CPU build of PyTorch; use a CUDA base and torch build for GPU workers).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 ATTRIB_DATA_DIR=/data
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" && pip install .

RUN useradd --create-home attrib && mkdir -p /data && chown attrib /data
USER attrib
VOLUME /data
EXPOSE 8000
CMD ["attrib", "serve", "--host", "0.0.0.0", "--port", "8000"]
