# The user-code image for Kubernetes (deploy/helm/values.yaml): the project and its pinned dependencies, served by
# Dagster's gRPC code server. The same image runs every launched run (K8sRunLauncher), so it holds all the
# pipeline needs and nothing of the development tools (no dev extra, no tests).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/upstack

# What the package needs at run time (README.md: pyproject.toml names it as the package's readme).
COPY pyproject.toml README.md ./
COPY sql ./sql
COPY schemas ./schemas
COPY upstack_pipeline ./upstack_pipeline
COPY dagster_project ./dagster_project
COPY workspace.yaml ./

# Editable (-e): the code reads sql/ and schemas/ beside its packages (upstack_pipeline/warehouse.py, events.py),
# which a plain `pip install .` leaves out of site-packages, so the image would fail at import. dagster-k8s: the
# run pods read the instance's K8sRunLauncher config; pinned in lockstep with dagster 1.13.27 like the others.
RUN pip install -e . "dagster-k8s==0.29.27"

# An unprivileged user: the code is read-only to it, and it writes only to the mounted shop volumes (values.yaml
# gives it fsGroup 10001 on them) and its home (caches such as matplotlib's).
RUN groupadd --gid 10001 upstack && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin upstack
USER 10001:10001

EXPOSE 3030

# The code server for our one code location. Exec form, no ENTRYPOINT: the Helm chart replaces these arguments with
# its own `dagster api grpc -h 0.0.0.0 -p <port> <dagsterApiGrpcArgs>` (equal to this line, tests/test_deploy.py).
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "dagster_project.definitions"]
