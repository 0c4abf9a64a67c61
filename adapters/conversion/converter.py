"""Convert a VMware guest to boot on KVM with virt-v2v-in-place, over all of its disks at once.

Order of work: early checks (tools, virtio-win, options the installed version lacks) -> the ledger (a
converted disk is never converted again) -> optional pre-flight (virt-v2v-inspector, which rehearses
the conversion in overlays and leaves the disks alone) -> clones of the replica (unless converting in
place) -> a virt-customize pass for what the installed virt-v2v-in-place cannot run itself (stable
fstab, NIC names, user scripts; it runs first so virt-v2v's initramfs rebuild picks up the NIC names; the
fstab step gets the filesystem UUIDs of each disk, read on the host beforehand) -> virt-v2v-in-place ->
the inspection it printed, recorded in the ledger.

Blocking; meant to run on a worker thread. Every tool run leaves its full log in ``work_dir/logs``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from . import commands, fsuuids, guestscripts
from .accel import choose_accelerator, guestfs_environment
from .capabilities import Capabilities, customize_reverses_disks, detect_capabilities
from .errors import ConversionError, FailureKind, classify
from .inspection import inspection_from_inspector_xml, inspection_from_log
from .model import (
    BlockDriver,
    ConversionOptions,
    ConversionResult,
    GuestSpec,
    HostConfig,
    Inspection,
    ToolRun,
)
from .runner import ProgressCallback, ProgressTracker, run_tool
from .storage import ConversionLedger, clone_disk, new_record


@dataclass(frozen=True)
class _Layout:
    """Where one conversion keeps its files."""

    root: Path

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    @property
    def scripts(self) -> Path:
        return self.root / "scripts"

    def create(self) -> None:
        for folder in (self.disks, self.logs, self.scratch, self.scripts):
            folder.mkdir(parents=True, exist_ok=True)

    def clone_path(self, index: int, source: Path) -> Path:
        return self.disks / f"{index}-{source.name}"


def _is_windows(guest: GuestSpec) -> bool:
    return (guest.os_hint or "").lower().startswith("win")


def _early_checks(guest: GuestSpec, options: ConversionOptions, host: HostConfig, caps: Capabilities) -> None:
    if options.root == "ask":
        raise ValueError("--root ask would wait for an answer nobody gives; use first, single or a device")
    for disk in guest.disks:
        if not disk.path.exists():
            raise ConversionError(FailureKind.NO_ROOT_DEVICE, f"disk {disk.path} does not exist")
    if options.static_ips and not caps.supports_mac_ip:
        raise ConversionError(
            FailureKind.UNSUPPORTED_GUEST,
            f"{caps.tool} {caps.version_text} cannot assign static IPs (no mac-ip-option)",
            hint="upgrade virt-v2v or configure the addresses after first boot",
        )
    if _is_windows(guest):
        if options.run_scripts:
            raise ConversionError(
                FailureKind.UNSUPPORTED_GUEST,
                "--run scripts run inside Linux guests only",
                hint="use firstboot scripts (.bat/.ps1) for Windows guests",
            )
        if host.virtio_win is None or not host.virtio_win.exists():
            raise ConversionError(
                FailureKind.MISSING_VIRTIO_WIN,
                f"Windows guest {guest.name!r} needs virtio-win drivers; none at {host.virtio_win}",
                hint="install virtio-win on the conversion host and set its virtio_win path",
            )
        if options.block_driver is BlockDriver.VIRTIO_SCSI and not caps.supports_block_driver:
            raise _no_virtio_scsi_for_windows(caps)


def _no_virtio_scsi_for_windows(caps: Capabilities) -> ConversionError:
    return ConversionError(
        FailureKind.UNSUPPORTED_BLOCK_DRIVER,
        f"{caps.tool} {caps.version_text} installs only the virtio-blk boot driver in Windows guests",
        hint="use virtio-blk on the destination (hw_disk_bus=virtio) or a virt-v2v with --block-driver",
    )


def _phases(preflight: bool, customize: bool) -> dict[str, tuple[float, float]]:
    """Share of the overall progress each run gets."""
    weights = {
        "preflight": 0.8 if preflight else 0.0,
        "customize": 0.15 if customize else 0.0,
        "convert": 1.0,
    }
    total = sum(weights.values())
    spans: dict[str, tuple[float, float]] = {}
    start = 0.0
    for name, weight in weights.items():
        end = start + weight / total
        spans[name] = (start, end)
        start = end
    return spans


def _failure(run: ToolRun, machine_readable: Path | None) -> ConversionError:
    log_text = run.log_path.read_text(errors="replace")
    mr_text = (
        machine_readable.read_text(errors="replace") if machine_readable and machine_readable.exists() else ""
    )
    diagnosis = classify(log_text, mr_text)
    first = diagnosis.decisive_lines[0] if diagnosis.decisive_lines else f"exit code {run.returncode}"
    return ConversionError(
        diagnosis.kind,
        f"{run.tool} failed ({diagnosis.kind.value}): {first}",
        hint=diagnosis.hint,
        retryable=diagnosis.retryable,
        decisive_lines=diagnosis.decisive_lines,
        log_path=run.log_path,
    )


class Converter:
    """Converts guests on this host; one instance may serve many worker threads."""

    def __init__(self, host: HostConfig, ledger: ConversionLedger) -> None:
        self.host = host
        self.ledger = ledger

    def _environment(self, layout: _Layout) -> dict[str, str]:
        self.host.appliance_cache.mkdir(parents=True, exist_ok=True)
        accelerator = choose_accelerator(self.host.accelerator)
        extra = commands.windows_environment(self.host.virtio_win)
        return guestfs_environment(accelerator, self.host.appliance_cache, layout.scratch, extra)

    def preflight(
        self,
        guest: GuestSpec,
        options: ConversionOptions,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        span: tuple[float, float] = (0.0, 1.0),
    ) -> tuple[Inspection, ToolRun]:
        """Rehearse the conversion with virt-v2v-inspector (overlays only: the disks are not written) and
        return its inspection; a guest that cannot be converted fails here with a classified error."""
        caps = detect_capabilities(self.host.inspector_tool)
        layout = _Layout(options.work_dir)
        layout.create()
        domain_xml = layout.root / "preflight-domain.xml"
        domain_xml.write_text(commands.libvirt_xml(guest))
        output_xml = layout.root / "preflight-inspection.xml"
        machine_readable = layout.logs / "preflight.jsonl"
        argv = commands.inspector_args(caps, options, domain_xml, output_xml, machine_readable)
        run = run_tool(
            argv,
            self._environment(layout),
            layout.logs / "preflight.log",
            machine_readable=machine_readable,
            progress=ProgressTracker(on_progress, *span),
            timeout_s=options.timeout_s,
            cancel=cancel,
        )
        if run.returncode != 0 or not output_xml.exists():
            raise _failure(run, machine_readable)
        # The -v log has the complete block (root device, firmware); 2.2's XML lacks both.
        found = inspection_from_log(run.log_path.read_text(errors="replace"))
        return found or inspection_from_inspector_xml(output_xml, guest.firmware), run

    def convert(
        self,
        guest: GuestSpec,
        options: ConversionOptions,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> ConversionResult:
        """Convert ``guest`` (all disks together) and return the inspection, or the recorded result when
        the target disks were converted before."""
        caps = detect_capabilities(self.host.in_place_tool)
        _early_checks(guest, options, self.host, caps)
        layout = _Layout(options.work_dir)
        targets = (
            [disk.path for disk in guest.disks]
            if options.in_place
            else [layout.clone_path(index, disk.path) for index, disk in enumerate(guest.disks)]
        )
        keys = (
            [disk.key for disk in guest.disks]
            if options.in_place
            else [str(path.resolve()) for path in targets]
        )
        done = self._recorded(keys)
        if done is not None:
            return done

        layout.create()
        runs: list[ToolRun] = []
        user_scripts = bool(options.run_scripts or options.firstboot_scripts)
        in_tool = caps.supports_run and caps.supports_firstboot
        vmferry_scripts = bool(guest.nics) or commands.needs_stable_fstab(caps, options)
        customize_expected = (vmferry_scripts or user_scripts) and not in_tool
        spans = _phases(options.preflight, customize_expected)
        if options.preflight:
            found, run = self.preflight(guest, options, on_progress, cancel, spans["preflight"])
            runs.append(run)
            if found.os_type == "windows" and not _is_windows(guest):
                # vSphere's guestId said otherwise (or nothing): apply the Windows checks now, before cloning
                guest = replace(guest, os_hint="windows")
                _early_checks(guest, options, self.host, caps)
        linux_scripts = self._linux_scripts(guest, options, caps, layout, cancel)
        customize = bool(linux_scripts or user_scripts) and not in_tool
        if not options.in_place:
            for disk, target in zip(guest.disks, targets, strict=True):
                clone_disk(disk.path, target)
        env = self._environment(layout)
        formats = [disk.format for disk in guest.disks]

        if customize:
            disks = list(zip(targets, formats, strict=True))
            if customize_reverses_disks(self.host.customize_tool):
                # libguestfs mounts the guest's /dev/sdb1 from the second disk *added*: add them in the
                # guest's order, or this pass mounts /var's disk as /. (The fstab step checks the mounts.)
                disks.reverse()
            argv = commands.customize_args(
                self.host.customize_tool,
                disks,
                options,
                [*linux_scripts, *options.run_scripts],
                options.firstboot_scripts,
            )
            run = run_tool(
                argv,
                env,
                layout.logs / "customize.log",
                progress=ProgressTracker(on_progress, *spans["customize"]),
                timeout_s=options.timeout_s,
                cancel=cancel,
            )
            runs.append(run)
            if run.returncode != 0:
                raise _failure(run, None)

        domain_xml = layout.root / "domain.xml"
        domain_xml.write_text(commands.libvirt_xml(guest, targets))
        machine_readable = layout.logs / "convert.jsonl"
        argv = commands.in_place_args(
            caps, options, domain_xml, machine_readable, scripts_in_tool=in_tool, extra_run=linux_scripts
        )
        run = run_tool(
            argv,
            env,
            layout.logs / "convert.log",
            machine_readable=machine_readable,
            progress=ProgressTracker(on_progress, *spans["convert"]),
            timeout_s=options.timeout_s,
            cancel=cancel,
        )
        runs.append(run)
        if run.returncode != 0:
            raise _failure(run, machine_readable)
        return self._finish(guest, options, caps, keys, targets, runs, machine_readable)

    def _recorded(self, keys: list[str]) -> ConversionResult | None:
        records = [self.ledger.get(key) for key in keys]
        if all(record is None for record in records):
            return None
        if any(record is None for record in records):
            converted = [key for key, record in zip(keys, records, strict=True) if record is not None]
            raise ConversionError(
                FailureKind.ALREADY_CONVERTED,
                f"some of the disks were converted before ({', '.join(converted)}), others not",
                hint="convert fresh clones of all the VM's disks together",
            )
        record = records[0]
        assert record is not None  # noqa: S101 -- narrowed by the checks above
        return ConversionResult(
            inspection=record.inspection.to_inspection(),
            disks=tuple(Path(path) for path in record.paths),
            block_driver=BlockDriver(record.block_driver),
            already_converted=True,
        )

    def _linux_scripts(
        self,
        guest: GuestSpec,
        options: ConversionOptions,
        caps: Capabilities,
        layout: _Layout,
        cancel: threading.Event | None,
    ) -> list[Path]:
        """vmferry's own in-guest scripts. The fstab one goes first: it checks that the pass mounted the
        guest's filesystems where its fstab says, before anything writes into them."""
        if _is_windows(guest):
            return []
        scripts: list[Path] = []
        if commands.needs_stable_fstab(caps, options):
            appliance = fsuuids.ApplianceAccess(  # only for disks that are not raw
                env=self._environment(layout),
                log_dir=layout.logs,
                tool=self.host.filesystems_tool,
                timeout_s=options.timeout_s,
                cancel=cancel,
            )
            uuids = fsuuids.guest_filesystem_uuids(guest.disks, appliance)
            path = layout.scripts / "vmferry-stable-fstab.sh"
            path.write_text(guestscripts.stable_fstab_script(uuids))
            scripts.append(path)
        if options.keep_interface_names and guest.nics:
            path = layout.scripts / "vmferry-keep-nic-names.sh"
            path.write_text(guestscripts.keep_interface_names_script(guest.nics))
            scripts.append(path)
        return scripts

    def _finish(
        self,
        guest: GuestSpec,
        options: ConversionOptions,
        caps: Capabilities,
        keys: list[str],
        targets: list[Path],
        runs: list[ToolRun],
        machine_readable: Path,
    ) -> ConversionResult:
        convert_run = runs[-1]
        inspection = inspection_from_log(convert_run.log_path.read_text(errors="replace"))
        if inspection is None:
            raise ConversionError(
                FailureKind.UNKNOWN,
                f"{convert_run.tool} succeeded but printed no inspection",
                log_path=convert_run.log_path,
            )
        warnings = tuple(
            message for kind, message in _machine_readable_messages(machine_readable) if kind == "warning"
        )
        self.ledger.put(
            new_record(
                keys[0] if len(keys) == 1 else "+".join(keys),
                keys,
                inspection,
                options.block_driver.value,
                caps.version_text,
                [str(run.log_path) for run in runs],
                [str(path) for path in targets],
            )
        )
        if inspection.os_type == "windows":
            _check_windows_drivers(caps, options, warnings, convert_run)
        return ConversionResult(
            inspection=inspection,
            disks=tuple(targets),
            runs=tuple(runs),
            block_driver=options.block_driver,
            warnings=warnings,
        )


def _check_windows_drivers(
    caps: Capabilities, options: ConversionOptions, warnings: tuple[str, ...], run: ToolRun
) -> None:
    """virt-v2v only *warns* when it finds no virtio drivers for a Windows version and leaves the guest
    on emulated devices, which do not boot from a virtio disk: treat that as the failure it is."""
    missing = [warning for warning in warnings if "no virtio drivers available" in warning]
    if missing:
        raise ConversionError(
            FailureKind.MISSING_VIRTIO_WIN,
            f"{run.tool} found no virtio drivers for this Windows version",
            hint="install a virtio-win release that supports this Windows version and point the "
            "conversion host's virtio_win setting at it",
            decisive_lines=tuple(missing),
            log_path=run.log_path,
        )
    if options.block_driver is BlockDriver.VIRTIO_SCSI and not caps.supports_block_driver:
        raise _no_virtio_scsi_for_windows(caps)


def _machine_readable_messages(path: Path) -> list[tuple[str, str]]:
    import json  # noqa: PLC0415 -- only needed here

    messages: list[tuple[str, str]] = []
    if not path.exists():
        return messages
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            messages.append((str(record.get("type", "")), str(record.get("message", "")).strip()))
    return messages
