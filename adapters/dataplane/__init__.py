"""The disk data plane: serve a VMware disk as an NBD export with nbdkit and copy it onto an OpenStack
volume (or a file, or another NBD export) with a resumable, verifying libnbd copy engine.

Sources (``sources``): ``VddkSource``, ``HttpsSource``, ``LocalSource``, ``SshSource``, each run by an
``NbdkitServer`` on a private unix socket. Destinations (``destinations``): ``BlockDeviceDestination``,
``FileDestination``, ``NbdDestination``, each stating whether it reads as zeroes. The engine
(``engine.CopyEngine``) does full copies and CBT passes, with retries, reconnects, durable checkpoints
(``checkpoints``), verification and progress reports. Needs Debian's nbdkit, libnbd and python3-libnbd:
run ``scripts/setup-dataplane``.
"""

from vmferry.adapters.dataplane.checkpoints import (
    Checkpoint,
    CheckpointSink,
    JsonFileCheckpointSink,
    MemoryCheckpointSink,
)
from vmferry.adapters.dataplane.destinations import (
    BlockDeviceDestination,
    Destination,
    FileDestination,
    NbdDestination,
)
from vmferry.adapters.dataplane.engine import (
    CopyEngine,
    EngineConfig,
    Progress,
    TransferResult,
    Verification,
    full_compare,
)
from vmferry.adapters.dataplane.errors import (
    CheckpointMismatchError,
    DestinationError,
    ExtentError,
    LibnbdUnavailableError,
    SourceStartError,
    TransferCancelledError,
    TransferError,
    VerificationError,
)
from vmferry.adapters.dataplane.extents import Extent, RangeSet, validate_changed_extents
from vmferry.adapters.dataplane.nbdkit import NbdkitCommand, NbdkitFilter, NbdkitServer, SecretPassing
from vmferry.adapters.dataplane.sources import (
    DiskSource,
    HttpsSource,
    LocalSource,
    SourceConfigError,
    SshSource,
    VddkSource,
    datastore_folder_url,
)

__all__ = [
    "BlockDeviceDestination",
    "Checkpoint",
    "CheckpointMismatchError",
    "CheckpointSink",
    "CopyEngine",
    "Destination",
    "DestinationError",
    "DiskSource",
    "EngineConfig",
    "Extent",
    "ExtentError",
    "FileDestination",
    "HttpsSource",
    "JsonFileCheckpointSink",
    "LibnbdUnavailableError",
    "LocalSource",
    "MemoryCheckpointSink",
    "NbdDestination",
    "NbdkitCommand",
    "NbdkitFilter",
    "NbdkitServer",
    "Progress",
    "RangeSet",
    "SecretPassing",
    "SourceConfigError",
    "SourceStartError",
    "SshSource",
    "TransferCancelledError",
    "TransferError",
    "TransferResult",
    "VddkSource",
    "Verification",
    "VerificationError",
    "datastore_folder_url",
    "full_compare",
    "validate_changed_extents",
]
