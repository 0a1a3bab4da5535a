"""molecule-codex: the OpenAI Codex CLI as a Molecule AI workspace runtime, served over A2A.

Everything the project ships lives in this package, so a pip install adds exactly one top-level
name to site-packages. The repository root keeps ``adapter.py``, ``executor.py`` and
``app_server.py`` only as aliases for the template contract (``ADAPTER_MODULE=adapter``).
"""
