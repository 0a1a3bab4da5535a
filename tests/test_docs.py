"""The README's configuration table, the config schema and config.yaml cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from molecule_codex.settings import CONFIG_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _readme_config_keys() -> set[str]:
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_readme_documents_exactly_the_schema_keys():
    documented = _readme_config_keys()
    assert documented == set(CONFIG_SCHEMA["properties"]), (
        f"README lacks {set(CONFIG_SCHEMA['properties']) - documented}, "
        f"documents unknown {documented - set(CONFIG_SCHEMA['properties'])}"
    )


def test_config_yaml_keys_are_in_the_schema():
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    ours = set(data["runtime_config"]) - {"required_env"}
    assert ours <= set(CONFIG_SCHEMA["properties"]), ours - set(CONFIG_SCHEMA["properties"])


def test_readme_names_the_two_setup_commands_and_ci_runs_the_test_one():
    assert "`make demo`" in README and "`make test`" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
