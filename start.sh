#!/usr/bin/env bash
# Container entrypoint: prepare the agent's directories as root, then run the Molecule runtime as
# the agent user. The adapter's setup() owns auth.json and config.toml; this script never writes
# them (one owner per file, rendered once).
#
# Paths default to the image layout and can be overridden (the tests run this script under a
# temporary root): MOLECULE_CONFIGS_DIR (/configs), AGENT_USER (agent), AGENT_HOME (/home/agent),
# CODEX_HOME ($AGENT_HOME/.codex).
set -euo pipefail

configs_dir="${MOLECULE_CONFIGS_DIR:-/configs}"
agent_user="${AGENT_USER:-agent}"
agent_home="${AGENT_HOME:-/home/agent}"
export CODEX_HOME="${CODEX_HOME:-${agent_home}/.codex}"
secrets_loader="${configs_dir}/secrets.d/load.sh"

log() { printf '[start.sh] %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" = "0" ]; }

# The provisioner creates /configs as root; the runtime (as the agent) only uses it when it can
# write there, otherwise it silently falls back to ~/.molecule-workspace and children that were
# told /configs (the molecule MCP server) lose the auth token. A read-only mount is not fatal.
own_configs_dir() {
  if [ -d "$configs_dir" ]; then
    chown -R "${agent_user}:" "$configs_dir" 2>/dev/null || log "WARN: could not chown ${configs_dir} to ${agent_user}"
  fi
}

# Multi-line secrets (CODEX_AUTH_JSON holds a whole auth.json) survive only through this file:
# the provisioner's env-file path drops newlines. `set -a` exports plain assignments too. The
# loader's stdout is discarded so nothing it echoes can land in the container log, and a broken
# loader costs a warning, not the boot.
load_secrets() {
  if [ ! -f "$secrets_loader" ]; then
    log "secrets loader: none at ${secrets_loader}"
    return 0
  fi
  local rc=0
  set +eu
  set -a
  # shellcheck disable=SC1090  # the path is only known at run time
  . "$secrets_loader" >/dev/null
  rc=$?
  set +a
  set -eu
  if [ "$rc" -eq 0 ]; then
    log "secrets loader: sourced ${secrets_loader}"
  else
    log "WARN: secrets loader ${secrets_loader} exited ${rc}; continuing with what it set"
  fi
}

# Names and set/unset only, never values: `docker logs` must answer "which credential did this
# container get?" without leaking one.
credential_state() {
  if [ -n "${!1:-}" ]; then printf 'set'; else printf 'unset'; fi
}

print_boot_context() {
  local name
  local -a names=(OPENAI_API_KEY CODEX_AUTH_JSON CODEX_API_KEY OPENAI_BASE_URL MOLECULE_WORKSPACE_TOKEN MOLECULE_ORG_ID)
  # Custom provider keys (config.yaml names them via env_key) follow the *_API_KEY convention.
  while IFS= read -r name; do
    case " ${names[*]} " in *" ${name} "*) ;; *) names+=("$name") ;; esac
  done < <(compgen -e | grep -E '^[A-Z0-9_]+_API_KEY$' | sort || true)

  {
    printf -- '----- start.sh boot %s -----\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'uid=%s user=%s\n' "$(id -u)" "$(id -un 2>/dev/null || echo unknown)"
    printf 'workspace_id=%s platform_url=%s\n' "${WORKSPACE_ID:-<unset>}" "${PLATFORM_URL:-<unset>}"
    printf 'configs_dir=%s codex_home=%s\n' "$configs_dir" "$CODEX_HOME"
    for name in "${names[@]}"; do
      printf 'env %s=%s\n' "$name" "$(credential_state "$name")"
    done
    printf -- '-----\n'
  } >&2
}

# CODEX_HOME must exist before codex starts; it holds auth.json, sessions and state, so 0700.
# A failure here is logged, not fatal: the adapter's setup() then reports it through the runtime's
# "not configured" card, which is more visible than a crash-looping container.
prepare_codex_home() {
  if ! mkdir -p "$CODEX_HOME" || ! chmod 0700 "$CODEX_HOME"; then
    log "WARN: could not prepare CODEX_HOME=${CODEX_HOME}"
    return 0
  fi
  if is_root; then
    # The home itself only (it may be a large persistent volume); CODEX_HOME fully, because
    # files a root process left there would make codex fail as the agent.
    if [ -d "$agent_home" ]; then
      chown "${agent_user}:" "$agent_home" || log "WARN: could not chown ${agent_home} to ${agent_user}"
    fi
    chown -R "${agent_user}:" "$CODEX_HOME" || log "WARN: could not chown ${CODEX_HOME} to ${agent_user}"
  fi
}

main() {
  if is_root; then
    own_configs_dir
  fi
  load_secrets
  print_boot_context
  prepare_codex_home

  if ! command -v molecule-runtime >/dev/null 2>&1; then
    log "FATAL: molecule-runtime is not on PATH (is molecule-ai-workspace-runtime installed?)"
    exit 127
  fi
  if is_root; then
    if ! command -v gosu >/dev/null 2>&1; then
      log "FATAL: running as root but gosu is missing; refusing to run the agent as root"
      exit 1
    fi
    exec gosu "$agent_user" molecule-runtime "$@"
  fi
  exec molecule-runtime "$@"
}

main "$@"
