"""Template entry point: ``import adapter`` is ``molecule_codex.adapter`` (the same module object, not a copy).

The Molecule template contract names this file at the repository root; the code lives in the
package so a pip install adds only ``molecule_codex`` to site-packages.
"""

import sys

from molecule_codex import adapter

sys.modules[__name__] = adapter
