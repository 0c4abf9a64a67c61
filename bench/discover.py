"""Discovery benchmark: vmferry's discover function over N VMs (4 disks, 2 NICs each) on vcsim-ferry,
next to (a) one raw RetrievePropertiesEx of the same VM properties and (b) a naive per-VM read in the
style of the reference kit's playbook (find each VM by name, then read config, summary and guest).

Every measurement runs in a fresh child process, so its peak RSS is its own; variants are interleaved
round by round in rotating order and medians reported with the ratios. The simulator runs on
loopback in a temporary directory and is stopped at the end.

Run: ``python -m bench.discover --vms 1000 --runs 3`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import psutil
from pyVmomi import vim, vmodl

from vmferry.adapters.vsphere.aio import VsphereClients
from vmferry.adapters.vsphere.client import VsphereClient
from vmferry.adapters.vsphere.inventory import VM_PROPERTIES
from vmferry.adapters.vsphere.settings import VsphereSettings
from vmferry.bus.cloudevents import CloudEvent
from vmferry.functions.discover import Discover
from vmferry.schemas.base import request_key_for
from vmferry.schemas.events import MigrationAccepted, VmDiscovered
from vmferry.schemas.request import MigrationRequest

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
RAW, VMFERRY, NAIVE = "raw", "vmferry", "per-vm"
VARIANTS = (RAW, VMFERRY, NAIVE)
LABELS = {
    RAW: "raw RetrievePropertiesEx (same VM properties)",
    VMFERRY: "vmferry discover function",
    NAIVE: "naive per-VM reads (find by name, config, summary, guest)",
}
FOLDER = "bench"
USER = "bench"
PC = vmodl.query.PropertyCollector
MIB = 1024 * 1024


@dataclass(frozen=True)
class Endpoint:
    """How children reach the simulator (the password stays in its 0600 file)."""

    host: str
    port: int
    password_file: str
    ca_file: str
    names_file: str

    def settings(self) -> VsphereSettings:
        return VsphereSettings(
            host=self.host,
            port=self.port,
            user=USER,
            password_file=Path(self.password_file),
            ca_file=Path(self.ca_file),
            keepalive=0,
            label="bench",
        )


@dataclass
class Measurement:
    variant: str
    wall_s: float
    cpu_s: float
    vms: int
    measured_vms: int
    peak_rss_mib: float
    rss_before_mib: float


# ---------------------------------------------------------------------------------------------
# The simulator and its inventory


def vcsim_binary() -> Path:
    override = os.environ.get("VMFERRY_VCSIM")
    if override:
        return Path(override)
    result = subprocess.run(
        [str(REPO / "scripts" / "build-vcsim")], capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        sys.exit(f"scripts/build-vcsim failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@contextmanager
def simulator(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Endpoint]]:
    password_file, ca_file = workdir / "password", workdir / "cert.pem"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24))
    command = [
        str(vcsim_binary()), "-l", "127.0.0.1:0", "-vm", "0", "-ds", "0",
        "-datastore", f"ferry={workdir / 'datastore'}", "-username", USER,
        "-password-file", str(password_file), "-cert-out", str(ca_file),
    ]  # fmt: skip
    with (workdir / "vcsim.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(30):
                sys.exit("vcsim-ferry did not start within 30 s")
        ready = json.loads(process.stdout.readline())
        port = int(str(ready["url"]).rsplit(":", 1)[1].split("/")[0])
        yield (
            process,
            Endpoint("127.0.0.1", port, str(password_file), str(ca_file), str(workdir / "names.json")),
        )
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def vm_spec(index: int, disks: int, nics: int, network: str, dvpg: Any) -> Any:
    devices: list[Any] = [
        vim.vm.device.VirtualDeviceSpec(
            operation="add",
            device=vim.vm.device.ParaVirtualSCSIController(key=1000, busNumber=0, sharedBus="noSharing"),
        )
    ]
    for unit in range(disks):
        disk = vim.vm.device.VirtualDisk(
            key=-(unit + 1),
            controllerKey=1000,
            unitNumber=unit,
            capacityInKB=(unit + 1) * 1024,
            capacityInBytes=(unit + 1) * MIB,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName="[ferry]", diskMode="persistent", thinProvisioned=True
            ),
        )
        devices.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
    for n in range(nics):
        mac = f"00:50:56:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}:{n:02x}"
        if n % 2:
            backing: Any = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(
                    portgroupKey=dvpg.key, switchUuid=dvpg.config.distributedVirtualSwitch.uuid
                )
            )
        else:
            backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network)
        nic = vim.vm.device.VirtualVmxnet3(
            key=-(100 + n), addressType="manual", macAddress=mac, backing=backing
        )
        devices.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=nic))
    return vim.vm.ConfigSpec(
        name=f"bench-{index:05d}",
        guestId="rhel8_64Guest",
        numCPUs=2,
        memoryMB=2048,
        changeTrackingEnabled=True,
        files=vim.vm.FileInfo(vmPathName="[ferry]"),
        deviceChange=devices,
    )


def populate(endpoint: Endpoint, vms: int, disks: int, nics: int) -> list[str]:
    """Create the VMs (in parallel: setup is not measured); returns their names."""
    with VsphereClient(endpoint.settings()) as client:
        content = client.content
        root = content.rootFolder
        assert root is not None
        datacenter = root.childEntity[0]
        folder = datacenter.vmFolder.CreateFolder(FOLDER)
        view = content.viewManager.CreateContainerView(root, [vim.HostSystem], True)
        hosts = [h for h in view.view if isinstance(h.parent, vim.ClusterComputeResource)]
        view.DestroyView()
        pool = hosts[0].parent.resourcePool
        dvpg = next(
            n
            for n in datacenter.network
            if isinstance(n, vim.dvs.DistributedVirtualPortgroup) and "Uplinks" not in n.name
        )

        def create(index: int) -> str:
            spec = vm_spec(index, disks, nics, "VM Network", dvpg)
            host = hosts[index % len(hosts)]
            client.run_task("creating a VM", lambda: folder.CreateVM_Task(spec, pool, host), 120)
            return str(spec.name)

        with ThreadPoolExecutor(8) as workers:
            return list(workers.map(create, range(vms)))


# ---------------------------------------------------------------------------------------------
# The measured variants (each runs in a child process)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


Variant = tuple[Callable[[], None], Callable[[], None], Callable[[], int]]


def run_raw(endpoint: Endpoint) -> Variant:
    """One RetrievePropertiesEx of VM_PROPERTIES over a ContainerView of all VMs (no paging needed)."""
    client = VsphereClient(endpoint.settings()).connect()
    content = client.content
    found: list[int] = []

    def measured() -> None:
        assert content.viewManager is not None and content.propertyCollector is not None
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        traverse = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=VM_PROPERTIES)],
        )
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        objects = list(result.objects) if result else []
        while result is not None and result.token:
            result = collector.ContinueRetrievePropertiesEx(result.token)
            objects += result.objects
        view.DestroyView()
        found.append(len(objects))

    return measured, client.close, lambda: found[0]


def run_naive(endpoint: Endpoint, limit: int) -> Variant:
    """The reference kit's way, per VM: its ``vmware.vmware.guest_info`` task finds the VM by name by
    listing the names of all VMs (``get_objs_by_name_or_moid``), then reads config, summary and guest.
    Conservative: no new process and login per VM, which an Ansible task also costs."""
    names: list[str] = json.loads(Path(endpoint.names_file).read_text())[:limit]
    client = VsphereClient(endpoint.settings()).connect()
    content = client.content
    assert content.viewManager is not None and content.propertyCollector is not None
    views, collector = content.viewManager, content.propertyCollector
    found: list[int] = []

    def find_by_name(name: str) -> vim.VirtualMachine:
        view = views.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        traverse = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
            propSet=[PC.PropertySpec(type=vim.VirtualMachine, pathSet=["name"])],
        )
        try:
            return next(o.obj for o in collector.RetrieveContents([spec]) if o.propSet[0].val == name)
        finally:
            view.DestroyView()

    def measured() -> None:
        count = 0
        for name in names:
            vm = find_by_name(name)
            config, summary, guest = vm.config, vm.summary, vm.guest
            disks = [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
            count += bool(disks) and summary is not None and guest is not None
        found.append(count)

    return measured, client.close, lambda: found[0]


def run_vmferry(endpoint: Endpoint) -> Variant:
    """The discover function, as the runner calls it: folder selector, validation, privilege check."""
    loop = asyncio.new_event_loop()
    clients = VsphereClients({"bench": endpoint.settings()})
    loop.run_until_complete(clients("bench"))  # connected before the clock starts
    request = msgspec.convert(
        {
            "request_id": "bench",
            "source": {"name": "bench"},
            "destination": {"cloud": "bench"},
            "vms": [{"folder": f"/DC0/vm/{FOLDER}"}],
            "mode": "warm",
        },
        MigrationRequest,
    )
    event = CloudEvent(
        id="bench",
        type=MigrationAccepted.spec.ce_type,
        source="bench",
        subject=request_key_for("bench"),
        data=MigrationAccepted(request=request),
    )
    found: list[int] = []

    class Step:
        delivery, function = 1, "discover"

        async def heartbeat(self) -> None:
            return None

    def measured() -> None:
        emits = loop.run_until_complete(Discover(clients)(event, Step()))
        assert all(isinstance(e.data, VmDiscovered) and len(e.data.disks) >= 1 for e in emits)
        found.append(len(emits))

    def after() -> None:
        loop.run_until_complete(clients.close())
        loop.close()

    return measured, after, lambda: found[0]


def child(variant: str, endpoint: Endpoint, naive_limit: int) -> None:
    """Run one variant and print its measurement as JSON."""
    if variant == RAW:
        measured, after, count = run_raw(endpoint)
    elif variant == NAIVE:
        measured, after, count = run_naive(endpoint, naive_limit)
    else:
        measured, after, count = run_vmferry(endpoint)
    before = rss_mib()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    measured()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    after()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = len(json.loads(Path(endpoint.names_file).read_text()))
    print(json.dumps(asdict(Measurement(variant, wall, cpu, total, count(), peak, before))))


# ---------------------------------------------------------------------------------------------
# The parent: set up, interleave, report


def spawn(variant: str, endpoint: Endpoint, naive_limit: int) -> Measurement:
    args = [
        sys.executable,
        "-m",
        "bench.discover",
        "--child",
        variant,
        "--endpoint",
        json.dumps(asdict(endpoint)),
        "--naive-vms",
        str(naive_limit),
    ]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, check=False, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr}")
    return Measurement(**json.loads(result.stdout.strip().splitlines()[-1]))


def per_vm_rate(m: Measurement) -> float:
    """Wall time for all VMs (the naive variant may measure a sample and is extrapolated)."""
    return m.wall_s * m.vms / max(m.measured_vms, 1)


def report(
    results: dict[str, list[Measurement]], args: argparse.Namespace, setup_s: float, server_rss: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant, runs in results.items():
        summary[variant] = {
            "wall_s": statistics.median(per_vm_rate(m) for m in runs),
            "cpu_s": statistics.median(m.cpu_s * m.vms / max(m.measured_vms, 1) for m in runs),
            "peak_rss_mib": max(m.peak_rss_mib for m in runs),
            "rss_before_mib": statistics.median(m.rss_before_mib for m in runs),
            "measured_vms": runs[0].measured_vms,
            "runs": [asdict(m) for m in runs],
        }
    raw, ours, naive = (summary[v]["wall_s"] for v in VARIANTS)
    paired = [results[VMFERRY][i].wall_s / results[RAW][i].wall_s for i in range(len(results[RAW]))]
    return {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "pyvmomi": metadata.version("pyvmomi"),
        "vms": args.vms,
        "disks": args.disks,
        "nics": args.nics,
        "setup_s": setup_s,
        "server_rss_mib": server_rss,
        "variants": summary,
        "vmferry_vs_raw": ours / raw,
        "vmferry_vs_raw_paired": paired,
        "vmferry_vs_raw_cpu": summary[VMFERRY]["cpu_s"] / summary[RAW]["cpu_s"],
        "per_vm_vs_vmferry": naive / ours,
        "targets": {
            "vmferry <= 1.5x raw": ours / raw <= 1.5,
            "per-VM >= 10x vmferry": naive / ours >= 10,
            "vmferry RSS < 500 MiB": summary[VMFERRY]["peak_rss_mib"] < 500,
        },
    }


def print_table(doc: dict[str, Any]) -> None:
    print(
        f"\n{doc['vms']} VMs x {doc['disks']} disks x {doc['nics']} NICs on vcsim-ferry "
        f"(setup {doc['setup_s']:.1f} s, simulator RSS {doc['server_rss_mib']:.0f} MiB)"
    )
    print(f"{'variant':<62} {'wall s':>8} {'CPU s':>7} {'peak RSS MiB':>13}")
    for variant in VARIANTS:
        v = doc["variants"][variant]
        sample = ""
        if v["measured_vms"] != doc["vms"]:
            sample = f" (extrapolated from {v['measured_vms']} VMs)"
        print(
            f"{LABELS[variant]:<62} {v['wall_s']:>8.2f} {v['cpu_s']:>7.2f} {v['peak_rss_mib']:>13.0f}{sample}"
        )
    paired = ", ".join(f"{r:.2f}" for r in doc["vmferry_vs_raw_paired"])
    print(
        f"\nvmferry / raw: {doc['vmferry_vs_raw']:.2f}x wall (per round: {paired}),"
        f" {doc['vmferry_vs_raw_cpu']:.2f}x client CPU"
    )
    print(f"per-VM / vmferry: {doc['per_vm_vs_vmferry']:.1f}x")
    for target, ok in doc["targets"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--nics", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--naive-vms", type=int, default=100, help="VMs the per-VM variant reads (extrapolated; 0: all)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Endpoint(**json.loads(args.endpoint)), args.naive_vms or 10**9)
        return
    with (
        tempfile.TemporaryDirectory(prefix="vmferry-bench-") as tmp,
        simulator(Path(tmp)) as (process, endpoint),
    ):
        started = time.perf_counter()
        names = populate(endpoint, args.vms, args.disks, args.nics)
        Path(endpoint.names_file).write_text(json.dumps(names))
        setup_s = time.perf_counter() - started
        naive_limit = args.naive_vms or args.vms
        results: dict[str, list[Measurement]] = {v: [] for v in VARIANTS}
        for round_no in range(args.runs):
            order = VARIANTS[round_no % 3 :] + VARIANTS[: round_no % 3]
            for variant in order:
                results[variant].append(spawn(variant, endpoint, naive_limit))
                print(f"round {round_no + 1}: {variant} {results[variant][-1].wall_s:.2f} s", file=sys.stderr)
        server_rss = psutil.Process(process.pid).memory_info().rss / MIB
        doc = report(results, args, setup_s, server_rss)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"discover-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)
        print(f"\nJSON: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
