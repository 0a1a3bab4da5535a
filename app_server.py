"""Template entry point: ``import app_server`` is ``molecule_codex.app_server`` (the same module object, not a copy).

The Molecule template contract names this file at the repository root; the code lives in the
package so a pip install adds only ``molecule_codex`` to site-packages.
"""

import sys

from molecule_codex import app_server

sys.modules[__name__] = app_server
