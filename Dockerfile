# One image for the API and the workers. Build stage: a virtual environment with the project and PyTorch;
# runtime stage: that environment on a slim base, run as a non-root user. PyTorch comes from TORCH_INDEX_URL:
# the CPU build by default; docker-compose.yml builds the GPU workers with a CUDA build (the NVIDIA container
# runtime provides the driver).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/attrib
ENV PATH=/opt/attrib/bin:$PATH
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY attrib ./attrib
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install .

FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 ATTRIB_DATA_DIR=/data PATH=/opt/attrib/bin:$PATH
COPY --from=build /opt/attrib /opt/attrib
WORKDIR /app
RUN useradd --create-home --uid 10001 attrib && mkdir -p /data && chown attrib /data
USER attrib
VOLUME /data
EXPOSE 8000
CMD ["attrib", "serve", "--host", "0.0.0.0", "--port", "8000"]
