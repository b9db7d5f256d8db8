"""Kubernetes, ready to use (issue 15, item 5): what can be checked on a machine without a cluster or Docker daemon.

- deploy/helm/values.yaml names only keys that the Dagster chart's own schema knows (the schema is kept in
  deploy/helm/dagster-chart/, with its source), with values of the types it allows;
- the Docker build context, after .dockerignore as Docker reads it, holds what the Dockerfile copies and none of the
  environments, data, run history or warehouses;
- the Dockerfile's CMD, parsed from the Dockerfile, runs from the repository with the venv's binaries and serves the
  code location on 127.0.0.1 until stopped;
- the values and the image agree: the chart's code server command is the image's CMD, the shop and Klaviyo account
  run limits, the volumes, the shops file's path, the user.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

from postgres import free_port
from test_daemon_end_to_end import Service

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
VALUES = PROJECT_ROOT / "deploy" / "helm" / "values.yaml"
CHART_SCHEMA = PROJECT_ROOT / "deploy" / "helm" / "dagster-chart" / "values.schema.json"
MANIFEST = PROJECT_ROOT / "deploy" / "k8s" / "upstack.yaml"
SHOPS_CONFIGMAP = "upstack-shops"


# --- The Dockerfile, as Docker reads it ------------------------------------------------------------------------------

def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments and blank lines dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def dockerfile_command() -> list[str]:
    """The image's command: its one CMD, in exec (JSON) form, so no shell stands between it and SIGTERM."""
    commands = [arguments for keyword, arguments in dockerfile_instructions() if keyword == "CMD"]
    assert len(commands) == 1, f"the Dockerfile should have one CMD, it has {len(commands)}"
    command = json.loads(commands[0])
    assert isinstance(command, list) and all(isinstance(part, str) for part in command), commands[0]
    return command


def copy_sources() -> list[str]:
    """Every path the Dockerfile's COPY lines read from the build context (the last argument is the destination)."""
    sources = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "COPY":
            parts = [part for part in shlex.split(arguments) if not part.startswith("--")]
            sources += parts[:-1]
    return sources


def option_value(command: list[str], *names: str) -> str:
    index = next(i for i, part in enumerate(command) if part in names)
    return command[index + 1]


def with_option(command: list[str], names: tuple[str, ...], value: str) -> list[str]:
    index = next(i for i, part in enumerate(command) if part in names)
    return command[:index + 1] + [value] + command[index + 2:]


# --- .dockerignore, as Docker matches it -----------------------------------------------------------------------------

class DockerIgnore:
    """Docker's .dockerignore rules (moby/patternmatcher, which the Docker CLI uses to build the context).

    A pattern is cleaned and matched against the whole path relative to the context: `*` and `?` within one path
    element, `**` across any number of them, `[...]` a class, `\\` an escape. A path is excluded when the last
    pattern matching it or one of its parent folders is not a `!` exception.
    """

    def __init__(self, text: str):
        self.patterns: list[tuple[bool, re.Pattern]] = []
        for line in text.splitlines():
            pattern = line.strip()
            if not pattern or pattern.startswith("#"):
                continue
            exception = pattern.startswith("!")
            pattern = os.path.normpath(pattern[1:].strip() if exception else pattern).lstrip("/")
            self.patterns.append((exception, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        regex, i = "^", 0
        while i < len(pattern):
            char = pattern[i]
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    regex += "(.*/)?"
                    i += 1
                else:
                    regex += ".*"
                continue
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif char == "\\" and i + 1 < len(pattern):
                i += 1
                regex += re.escape(pattern[i])
            elif char == "[":
                end = pattern.index("]", i + 1)
                body = pattern[i + 1:end]
                regex += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
                i = end
            else:
                regex += re.escape(char)
            i += 1
        return regex + "$"

    @property
    def has_exceptions(self) -> bool:
        return any(exception for exception, _ in self.patterns)

    def excludes(self, path: str) -> bool:
        parents = str(PurePosixPath(path).parent).split("/")
        candidates = [path] + (["/".join(parents[:i + 1]) for i in range(len(parents))] if parents != ["."] else [])
        excluded = False
        for exception, regex in self.patterns:
            if exception != excluded:  # an inclusion already matched, or an exception with nothing to undo
                continue
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not exception
        return excluded


def build_context(root: Path = PROJECT_ROOT) -> set[str]:
    """The files `docker build` would send from `root`: every file that .dockerignore does not exclude. Like
    Docker, a whole excluded folder is skipped unread when no `!` exception could bring part of it back."""
    ignore = DockerIgnore((root / ".dockerignore").read_text())
    files = set()
    for folder, subfolders, names in os.walk(root):
        relative = Path(folder).relative_to(root)
        if not ignore.has_exceptions:
            subfolders[:] = [name for name in subfolders if not ignore.excludes((relative / name).as_posix())]
        files |= {(relative / name).as_posix() for name in names if not ignore.excludes((relative / name).as_posix())}
    return files


@pytest.mark.parametrize("patterns, path, excluded", [
    # The examples of Docker's .dockerignore documentation.
    ("*/temp*", "somedir/temporary.txt", True),
    ("*/temp*", "temporary.txt", False),
    ("*/temp*", "somedir/subdir/temporary.txt", False),
    ("*/*/temp*", "somedir/subdir/temporary.txt", True),
    ("temp?", "tempa", True),
    ("temp?", "tempab", False),
    ("**/*.go", "a/b/c.go", True),
    ("**/*.go", "c.go", True),
    ("*.md\n!README*.md", "README.md", False),
    ("*.md\n!README*.md", "NOTES.md", True),
    ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", True),
    ("*.md\nREADME-secret.md\n!README*.md", "README-secret.md", False),
    # A folder excludes what is inside it; a leading / is the context's root.
    ("/data", "data/landing/day.jsonl", True),
    ("data", "sql/data.sql", False),
    ("[a-c]b", "bb", True),
    ("[!a-c]b", "bb", False),
])
def test_dockerignore_matching_follows_dockers_rules(patterns, path, excluded):
    assert DockerIgnore(patterns).excludes(path) is excluded


def test_the_build_context_holds_what_the_image_copies_and_no_environment_data_or_history():
    context = build_context()

    for source in copy_sources():
        assert source in context or any(path.startswith(source.rstrip("/") + "/") for path in context), (
            f"the Dockerfile copies {source}, which the build context does not hold (.dockerignore?)")
    for required in ("pyproject.toml", "workspace.yaml", "upstack_pipeline/warehouse.py",
                     "dagster_project/definitions.py", "sql/warehouse.sql", "schemas/raw-event.schema.json"):
        assert required in context
    for folder in ("upstack_pipeline", "dagster_project", "sql", "schemas"):
        on_disk = {path.relative_to(PROJECT_ROOT).as_posix() for path in (PROJECT_ROOT / folder).rglob("*")
                   if path.is_file() and "__pycache__" not in path.parts}
        assert on_disk <= context, f"left out of the build context: {sorted(on_disk - context)}"

    unwanted = [path for path in context
                if path.split("/")[0] in {".venv", ".git", "data", "dagster_home", "tests", "bench"}
                or path.endswith((".duckdb", ".duckdb.wal", ".pyc"))]
    assert not unwanted, unwanted[:10]
    # The same rules on paths a developer's machine may or may not have today, so this holds wherever it runs.
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for path in (".venv/bin/python", ".git/HEAD", "data/landing/2026-01-01.jsonl.gz", "dagster_home/storage/runs.db",
                 "warehouse.duckdb", "data.duckdb.wal", "sql/scratch/copy.duckdb", "tests/test_deploy.py",
                 "upstack_pipeline/__pycache__/warehouse.cpython-311.pyc", ".tmp_dagster_home_x1/dagster.yaml",
                 "bench/out/scale.json", "upstack_flows.egg-info/PKG-INFO"):
        assert ignore.excludes(path), f"{path} would be sent to the Docker daemon"


# --- The image's command, run for real -------------------------------------------------------------------------------

@pytest.mark.slow  # a code server process: loading the definitions takes seconds
def test_the_images_command_serves_the_code_location_and_stops_on_sigterm(tmp_path):
    """The Dockerfile's CMD from the repository (the image's WORKDIR holds the same files), with the venv's
    `dagster` first on PATH, on a free 127.0.0.1 port instead of the pod's 0.0.0.0. Ready is what the chart's
    readiness probe asks: `dagster api grpc-health-check`. The server loads the definitions before it answers
    (no --lazy-load-user-code), so an answer means our code location loaded."""
    port = free_port()
    command = with_option(with_option(dockerfile_command(), ("-h", "--host"), "127.0.0.1"),
                          ("-p", "--port"), str(port))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DAGSTER_HOME": str(home)}
    server = Service("code-server", command, env, tmp_path)
    try:
        deadline, answered = time.monotonic() + 120, False
        while not answered and time.monotonic() < deadline and server.process.poll() is None:
            probe = subprocess.run([str(BIN / "dagster"), "api", "grpc-health-check", "-h", "127.0.0.1", "-p",
                                    str(port)], env=env, capture_output=True, text=True, timeout=60)
            answered = probe.returncode == 0
            if not answered:
                time.sleep(0.5)
        assert answered, f"the code server did not answer on 127.0.0.1:{port}:\n{server.output()[-3000:]}"
        assert "dagster_project.definitions" in server.output()
    finally:
        server.stop(grace=30)
    assert server.process.returncode != -9, "the code server ignored SIGTERM (Kubernetes would have to kill it)"


# --- The Helm values against the chart's schema ----------------------------------------------------------------------

def load_values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def schema_for_our_values(chart_schema: dict) -> dict:
    """The chart's schema as it applies to our file, which Helm merges over the chart's defaults.

    - Every object the schema describes refuses keys it does not name (`additionalProperties: false`): the chart
      itself lets unknown keys through at the top level, and Helm then silently ignores a misspelt one.
    - `required` is dropped where Helm's merge fills it from the chart's defaults (maps), and kept inside lists,
      which Helm replaces whole (a code location entry must be complete).
    - Kubernetes objects (env, volumes, resources, ...) point at an external Kubernetes schema this machine cannot
      fetch: they are checked as the objects or lists the chart's schema says, not field by field.
    The chart's definitions are inlined, since a shared definition is merged in one place and replaced in another.
    """
    section = "$defs" if "$defs" in chart_schema else "definitions"  # pydantic 2 or 1 generated it
    definitions, prefix = chart_schema[section], f"#/{section}/"

    def adapt(node, inside_list: bool):
        if isinstance(node, list):
            return [adapt(item, inside_list) for item in node]
        if not isinstance(node, dict):
            return node
        node = dict(node)
        reference = node.pop("$ref", None)
        if reference is not None and reference.startswith(prefix):
            return adapt({**definitions[reference.removeprefix(prefix)], **node}, inside_list)
        external = reference is not None
        adapted = {}
        for key, value in node.items():
            if key == "properties":
                adapted[key] = {name: adapt(child, inside_list) for name, child in value.items()}
            elif key == "items":
                adapted[key] = adapt(value, True)
            elif key == "required" and not inside_list:
                continue
            else:
                adapted[key] = adapt(value, inside_list)
        if adapted.get("type") == "object" and "properties" in adapted and not external:
            adapted.setdefault("additionalProperties", False)
        return adapted

    return adapt({key: value for key, value in chart_schema.items() if key != section}, False)


def schema_errors(values: dict) -> list[str]:
    schema = schema_for_our_values(json.loads(CHART_SCHEMA.read_text()))
    validator = jsonschema.Draft7Validator(schema)  # the draft Helm validates values.schema.json with

    def messages(error):  # a value under `anyOf` (a value or null) fails in one of the alternatives: say which
        yield f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for alternative in error.context or ():
            yield from messages(alternative)

    return [message for error in validator.iter_errors(values) for message in messages(error)]


def test_the_values_name_only_keys_of_the_charts_schema_with_the_types_it_allows():
    assert schema_errors(load_values()) == []


@pytest.mark.parametrize("change, refused", [
    # A misspelt key, which Helm would ignore without a word (here: the run limits would silently not apply).
    (lambda v: v["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"].update(
        tagConcurrencyLimit=[]), "'tagConcurrencyLimit' was unexpected"),
    (lambda v: v.update(dagsterDeamon={}), "'dagsterDeamon' was unexpected"),
    # A key of a newer chart than the schema kept here.
    (lambda v: v.update(concurrency={"enabled": True}), "'concurrency' was unexpected"),
    # A wrong type.
    (lambda v: v["dagster-user-deployments"]["deployments"][0].update(port="3030"), "'3030' is not of type"),
    # A list replaces the chart's default whole, so a code location entry must be complete.
    (lambda v: v["dagster-user-deployments"]["deployments"][0].pop("port"), "'port' is a required property"),
    (lambda v: v["runLauncher"].update(type="K8sLauncher"), "'K8sLauncher' is not one of"),
])
def test_the_schema_check_refuses_what_the_chart_does_not_know(change, refused):
    values = copy.deepcopy(load_values())
    change(values)
    assert any(refused in error for error in schema_errors(values)), schema_errors(values)


# --- The values and the image agree ----------------------------------------------------------------------------------

def code_location() -> dict:
    deployments = load_values()["dagster-user-deployments"]["deployments"]
    assert len(deployments) == 1, "one code location: the project's"
    return deployments[0]


def test_the_charts_code_server_command_is_the_images_command():
    """The chart does not run the image's CMD: it passes `dagster api grpc -h 0.0.0.0 -p <port>` and the
    deployment's dagsterApiGrpcArgs as the container's arguments. Both must serve the same module on one port."""
    location = code_location()
    chart_command = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(location["port"]),
                     *location["dagsterApiGrpcArgs"]]
    assert chart_command == dockerfile_command()
    assert not [keyword for keyword, _ in dockerfile_instructions() if keyword == "ENTRYPOINT"], (
        "an ENTRYPOINT would be prepended to the chart's arguments")
    assert str(location["port"]) in dict(dockerfile_instructions())["EXPOSE"].split()


def test_one_run_per_shop_and_per_klaviyo_account_at_a_time_within_a_global_cap():
    values = load_values()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] is True and coordinator["type"] == "QueuedRunCoordinator"
    queue = coordinator["config"]["queuedRunCoordinator"]
    assert isinstance(queue["maxConcurrentRuns"], int) and queue["maxConcurrentRuns"] >= 1
    limits = {limit["key"]: limit for limit in queue["tagConcurrencyLimits"]}
    for key in ("upstack/shop", "upstack/klaviyo-account"):
        assert limits[key]["limit"] == 1
        assert limits[key]["value"] == {"applyLimitPerUniqueValue": True}, f"{key}: one per value, not one in all"


def test_the_volumes_settings_and_user_the_values_name_exist():
    location = code_location()
    manifest = [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]
    claims = {doc["metadata"]["name"] for doc in manifest if doc["kind"] == "PersistentVolumeClaim"}
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in manifest if doc["kind"] == "ConfigMap"}

    volumes = {volume["name"]: volume for volume in location["volumes"]}
    mounts = {mount["name"]: mount for mount in location["volumeMounts"]}
    assert set(mounts) == set(volumes), "every volume mounted, every mount backed by a volume"
    used_claims = {volume["persistentVolumeClaim"]["claimName"] for volume in volumes.values()
                   if "persistentVolumeClaim" in volume}
    assert used_claims and used_claims == claims, "one claim per shop group, each in deploy/k8s/upstack.yaml"

    settings = {name: data for name, data in config_maps.items()
                if {"name": name} in location["envConfigMaps"]}
    assert settings, "the settings ConfigMap the values name is in deploy/k8s/upstack.yaml"
    shops_file = PurePosixPath(next(data["UPSTACK_SHOPS_FILE"] for data in settings.values()))
    shops_volume = next(name for name, volume in volumes.items()
                        if volume.get("configMap", {}).get("name") == SHOPS_CONFIGMAP)
    assert str(shops_file.parent) == mounts[shops_volume]["mountPath"], "UPSTACK_SHOPS_FILE is in the mounted file"

    user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert user != "0" and str(location["podSecurityContext"]["runAsUser"]) == user
