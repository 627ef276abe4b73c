"""Which device changes Azure IoT Hub's identity registry is to learn (``[iothub]``).

The hub checks no CRL: a device it should refuse must be disabled there. So each
status change of a device names the status its hub identity is to have, and, with
``create_identities``, registering or provisioning a device names a new identity.
The store writes the change into its outbox in the transaction of the device change
(``store/outbox.py``); a sender takes it to the hub (``server/hubsync.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from estkit.store import DeviceStatus
from estkit.store.outbox import HubChange, HubStatus


@dataclass(frozen=True, slots=True)
class HubSync:
    create_identities: bool = False

    def status_change(self, device_id: str, status: DeviceStatus, *, cause: str) -> HubChange:
        """Enabled for an active device; disabled for a disabled or decommissioned one."""
        hub = HubStatus.ENABLED if status is DeviceStatus.ACTIVE else HubStatus.DISABLED
        return HubChange(device_id, hub, cause)

    def new_identity(self, device_id: str, *, cause: str) -> HubChange | None:
        """An enabled identity for a device registered or provisioned, if they are made."""
        return HubChange(device_id, HubStatus.ENABLED, cause) if self.create_identities else None
