"""Template entry point: ``import executor`` is ``molecule_codex.executor`` (the same module object, not a copy).

The Molecule template contract names this file at the repository root; the code lives in the
package so a pip install adds only ``molecule_codex`` to site-packages.
"""

import sys

from molecule_codex import executor

sys.modules[__name__] = executor
