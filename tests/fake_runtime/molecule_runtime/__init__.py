"""Stand-in for the Molecule workspace runtime package, for tests only.

Shaped like the real ``molecule_runtime`` (same module paths and public names) but with no
platform behind it. Every module carries ``FAKE_RUNTIME = True`` so a test can prove which
implementation ``runtime_seam`` picked, and the stand-ins record their calls in module lists.
"""

from molecule_runtime.adapters.base import AdapterConfig, BaseAdapter, RuntimeCapabilities, SetupResult

__version__ = "0.0.0+fake"
FAKE_RUNTIME = True

__all__ = ["AdapterConfig", "BaseAdapter", "RuntimeCapabilities", "SetupResult"]
