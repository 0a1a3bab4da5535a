"""Stand-in adapter registry: re-exports the base classes as the real package does."""

from molecule_runtime.adapters.base import (
    AdapterConfig,
    BaseAdapter,
    PrivilegedPluginInstallError,
    RuntimeCapabilities,
    SetupResult,
)

FAKE_RUNTIME = True

__all__ = [
    "AdapterConfig",
    "BaseAdapter",
    "PrivilegedPluginInstallError",
    "RuntimeCapabilities",
    "SetupResult",
]
