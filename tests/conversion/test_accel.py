"""Accelerator choice and the libguestfs environment built from it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmferry.adapters.conversion import Accelerator, choose_accelerator, guestfs_environment
from vmferry.adapters.conversion.accel import PROBE_TIMEOUT_S


def test_configuration_and_environment_override_skip_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_accelerator(Accelerator.KVM) is Accelerator.KVM
    monkeypatch.setenv("VMFERRY_ACCEL", "tcg")
    started = time.monotonic()
    assert choose_accelerator() is Accelerator.TCG
    assert time.monotonic() - started < 1


def test_probe_answers_in_bounded_time(monkeypatch: pytest.MonkeyPatch, conversion_tools: None) -> None:
    monkeypatch.delenv("VMFERRY_ACCEL", raising=False)
    started = time.monotonic()
    chosen = choose_accelerator()
    assert chosen in (Accelerator.KVM, Accelerator.TCG)
    assert time.monotonic() - started < PROBE_TIMEOUT_S + 15
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert chosen is Accelerator.TCG


def test_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "something-stale")
    tcg = guestfs_environment(Accelerator.TCG, tmp_path / "cache", tmp_path / "tmp", {"VIRTIO_WIN": "/x.iso"})
    assert tcg["LIBGUESTFS_BACKEND"] == "direct"
    assert tcg["LIBGUESTFS_BACKEND_SETTINGS"] == "force_tcg"
    assert tcg["LIBGUESTFS_CACHEDIR"] == str(tmp_path / "cache")
    assert tcg["TMPDIR"] == str(tmp_path / "tmp")
    assert tcg["VIRTIO_WIN"] == "/x.iso"
    assert tcg["LC_ALL"] == "C.UTF-8"
    kvm = guestfs_environment(Accelerator.KVM, tmp_path / "cache", tmp_path / "tmp")
    assert "LIBGUESTFS_BACKEND_SETTINGS" not in kvm  # the stale outer value is not inherited
    assert "PATH" in kvm
