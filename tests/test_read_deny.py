"""How secret locations become permission-profile entries (what bubblewrap needs, measured in read_deny's docstring).

The end-to-end proof that these entries deny reads is in test_secrets_reach.py; here: directories
by exact path, files as one-match globs (so a file created later is denied and a missing one leaves
nothing behind), nothing nested inside a denied directory, unprotectable paths reported.
"""

from __future__ import annotations

from pathlib import Path

from molecule_codex.read_deny import (
    Location,
    build_read_deny,
    secret_locations,
    workspace_conflict,
)


def _tree(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    state = tmp_path / "state"
    codex_home = state / "codex-home"
    codex_home.mkdir(parents=True)
    configs = tmp_path / "configs"
    configs.mkdir()
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return state, codex_home, configs, workspace


def test_platform_locations_become_dirs_and_one_match_globs(tmp_path):
    state, codex_home, configs, workspace = _tree(tmp_path)
    (configs / ".platform_inbound_secret").write_text("x")
    creds = tmp_path / "gcp.json"
    creds.write_text("{}")
    env = {"HOME": str(tmp_path / "nohome"), "GOOGLE_APPLICATION_CREDENTIALS": str(creds), "SOME_TOKEN_DIR": "/etc"}
    locations = secret_locations(state_dir=state, codex_home=codex_home, env=env, configs_dir=configs)
    deny = build_read_deny(locations, workspace)
    assert deny.entries == (
        str(state),  # codex_home sits inside it: no nested entry
        str(configs / ".auth_toke[n]"),  # absent until the runtime registers: still denied then
        str(configs / ".platform_inbound_secre[t]"),
        str(configs / ".agent_snapshot.jso[n]"),
        str(tmp_path / "gcp.jso[n]"),  # a credential file named by env; a directory (/etc) is not
    )
    assert not (configs / ".auth_token").exists()
    assert (Path("/var/log/molecule/audit.jsonl"), "its directory does not exist at start") in deny.unprotected
    assert "NOT denied: /var/log/molecule/audit.jsonl" in deny.describe()


def test_standalone_has_no_platform_entries_and_denies_an_existing_home_codex(tmp_path):
    state, codex_home, _, workspace = _tree(tmp_path)
    (tmp_path / "home" / ".codex").mkdir(parents=True)
    env = {"HOME": str(tmp_path / "home")}
    deny = build_read_deny(secret_locations(state_dir=state, codex_home=codex_home, env=env, configs_dir=None),
                           workspace)
    assert deny.entries == (str(state), str(tmp_path / "home" / ".codex"))
    assert deny.unprotected == ()


def test_unprotectable_paths_are_reported_not_rendered(tmp_path):
    _, _, _, workspace = _tree(tmp_path)
    weird = tmp_path / "we[ird"
    weird.mkdir()
    deny = build_read_deny([Location(weird, True), Location(tmp_path / "absent" / "token")], workspace)
    assert deny.entries == ()
    assert {path for path, _ in deny.unprotected} == {weird, tmp_path / "absent" / "token"}


def test_a_workspace_inside_a_secret_location_is_a_conflict(tmp_path):
    state, codex_home, _, _ = _tree(tmp_path)
    workspace = state / "ws"
    workspace.mkdir()
    locations = [Location(state, True), Location(codex_home, True)]
    assert workspace_conflict(locations, workspace) == state
    assert str(state) not in build_read_deny(locations, workspace).entries
    assert workspace_conflict(locations, tmp_path / "elsewhere") is None
