"""The offline demo and its scripted model: a Responses-API server on loopback that plays the LLM.

The tests and ``molecule-codex demo`` share the scripted model; it is product code only in the
sense that the demo ships with the CLI, never on the production message path.
"""
