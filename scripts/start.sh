#!/usr/bin/env bash
# llama-gguf-inference supervisor: the container entrypoint.
#
# Boot diagnostics, platform and DATA_DIR detection, model resolution, a fresh backend
# key, then three children in order: health responder -> llama-server -> gateway.
# One child dying takes the others down and the exit status is its status (128+n for a
# signal). SIGTERM/SIGINT drain: health says 503, the gateway finishes in-flight requests
# within DRAIN_TIMEOUT, then llama-server stops and the script exits 0.
#
# Sourcing the file defines the functions without running main (for tests).
set -Eeuo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

# The model, set by resolve_model.
MODEL_MODE="single"
MODEL_FILE=""
MMPROJ_FILE=""

# Child PIDs and run-time state, set by main.
PLATFORM=""
AUTH_MODE=""
KEY_COUNT=0
TICKER_PID=""
HEALTH_PID=""
FETCH_PID=""
LLAMA_PIDS=() # one per backend
BACKEND_COUNT=1
GPUS=() # the GPUs the backends are spread over (auto or several backends)
GATEWAY_PID=""
RUN_DIR=""
STATE_FILE=""
STARTUP_FILE=""
BOOT_TIME=""

log() { printf '%s [supervisor] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
err() { log "ERROR: $*"; }
# A setting that cannot work: one line naming it, exit 2.
die_config() {
  err "$*"
  exit 2
}

# ---------------------------------------------------------------- platform and storage

# load_facts: the platform, DATA_DIR, PORT_HEALTH, auth mode and key count, as the gateway resolves
# them (gateway.py --check): one definition of each rule, in Python. Exits 2 with the
# gateway's message when a gateway setting or the key configuration cannot work.
load_facts() {
  local facts name value
  facts="$(python3 "$SCRIPT_DIR/gateway.py" --check)" || exit 2
  while IFS='=' read -r name value; do
    case "$name" in
      platform) PLATFORM="$value" ;;
      data_dir) DATA_DIR="$value" ;;
      auth) AUTH_MODE="$value" ;;
      keys) KEY_COUNT="$value" ;;
      port_health) PORT_HEALTH="$value" ;;
    esac
  done <<<"$facts"
  [[ -n "$PLATFORM" && -n "$DATA_DIR" ]] || die_config "gateway.py --check gave no platform facts"
  export DATA_DIR PORT_HEALTH
}

# ---------------------------------------------------------------- validation

# require_uint NAME [MIN] [MAX]: the variable, if set, must be a whole number in range.
require_uint() {
  local name="$1" min="${2:-0}" max="${3:-}"
  local value="${!name:-}"
  [[ -z "$value" ]] && return 0
  if [[ ! "$value" =~ ^[0-9]+$ ]]; then
    die_config "$name='$value': expected a whole number"
  fi
  if ((10#$value < min)); then
    die_config "$name=$value: must be at least $min"
  fi
  if [[ -n "$max" ]] && ((10#$value > max)); then
    die_config "$name=$value: must be at most $max"
  fi
}

validate_settings() {
  # PORT, PORT_HEALTH and PORT_BACKEND are checked by gateway.py --check (load_facts).
  require_uint CTX 0
  require_uint PARALLEL 1
  require_uint MODELS_MAX 0
  if [[ -n "${MODEL_ALIAS:-}" && ! "$MODEL_ALIAS" =~ ^[A-Za-z0-9._:@/+-]{1,128}$ ]]; then
    die_config "MODEL_ALIAS='$MODEL_ALIAS': use 1-128 letters, digits and . _ : @ / + -"
  fi
  if [[ -n "${NGL:-}" && ! "${NGL}" =~ ^([0-9]+|auto|all)$ ]]; then
    die_config "NGL='${NGL}': expected a number of layers, 'auto' or 'all'"
  fi
  case "${HEALTH_MODE:-ready}" in
    ready | static) ;;
    *) die_config "HEALTH_MODE='${HEALTH_MODE}': expected ready or static" ;;
  esac
  check_extra_args
  check_llama_env
}

# check_port_roles: PORT_HEALTH may equal PORT (RunPod's load balancer defaults it so):
# the gateway then answers the probes itself. The backend's port is loopback-only and
# must differ from both.
check_port_roles() {
  local last=$((PORT_BACKEND + BACKEND_COUNT - 1))
  if ((last > 65535)); then
    die_config "PORT_BACKEND=$PORT_BACKEND with BACKENDS=$BACKEND_COUNT runs past port 65535"
  fi
  if ((PORT >= PORT_BACKEND && PORT <= last)) || ((PORT_HEALTH >= PORT_BACKEND && PORT_HEALTH <= last)); then
    die_config "PORT_BACKEND=$PORT_BACKEND (to $last for BACKENDS=$BACKEND_COUNT) must not include PORT=$PORT or PORT_HEALTH=$PORT_HEALTH"
  fi
}

single_port() { [[ "$PORT" == "$PORT_HEALTH" ]]; }

# extra_args: EXTRA_ARGS as words, each ended by a NUL (mapfile -d ''), from every line of
# it: split on spaces, tabs and newlines, so no word holds a newline.
extra_args() {
  local -a words=()
  read -r -d '' -a words <<<"${EXTRA_ARGS:-}" || true
  ((${#words[@]} == 0)) || printf '%s\0' "${words[@]}"
}

# llama_flag_refusal FLAG: why llama-server may not be given FLAG, or nothing when it may.
# The spellings are llama-server b11434's own (common/arg.cpp): every short and long name,
# `--a_b` as `--a-b` (its parser turns `_` into `-` in long names), `--flag=value` by its
# flag. Refused: what the supervisor owns (where it listens, its key, which model and under
# which name), whatever makes it fetch or load a model or projector from elsewhere (the
# Hub, a URL, Docker Hub, RPC servers), moving its routes (the gateway forwards fixed
# paths), context shift (generation past the slot context, beyond what a request reserves),
# and tools or files it would run or serve inside the container (ALLOW_SERVER_TOOLS).
llama_flag_refusal() {
  local flag="${1%%=*}"
  [[ "$flag" == --* ]] && flag="${flag//_/-}"
  case "$flag" in
    --host | --port | --reuse-port | --path | --api-key | --api-key-file | --ssl-key-file | \
      --ssl-cert-file | -m | --model | -a | --alias | --models-dir | --models-preset | \
      --models-max | -hft | --hf-token)
      echo "the supervisor owns it (use PORT, MODEL_PATH/MODEL_NAME/MODEL_REPO, MODEL_ALIAS, MODELS_MAX, the key file)"
      ;;
    -mu | --model-url | -hf | -hfr | --hf-repo | -hff | --hf-file | -dr | --docker-repo | \
      -mmu | --mmproj-url | --spec-draft-hf | -hfd | -hfrd | --hf-repo-draft | \
      --spec-draft-model | -md | --model-draft | --rpc | --mtp | --dflash | --eagle3 | \
      --embd-gemma-default | --fim-qwen-* | --gpt-oss-* | --vision-gemma-*)
      echo "it makes llama-server fetch or load a model from elsewhere (the Hub, a URL, Docker Hub, RPC servers): the supervisor fetches the model (MODEL_REPO)"
      ;;
    --api-prefix)
      echo "it moves llama-server's routes away from the paths the gateway forwards"
      ;;
    --context-shift)
      echo "context shift lets one generation run past the slot's context, beyond what the gateway reserves for a request (it plans every task to fit its slot): size CTX instead"
      ;;
    --tools | --tools-runtime | -ag | --agent | --mcp-* | --ui-mcp-proxy | --webui-mcp-proxy | --media-path)
      if [[ "${ALLOW_SERVER_TOOLS:-false}" != "true" ]]; then
        echo "it lets llama-server run tools or read files inside the container for clients: set ALLOW_SERVER_TOOLS=true to allow it"
      fi
      ;;
  esac
}

# check_extra_args: EXTRA_ARGS may tune llama-server, within llama_flag_refusal's rules.
check_extra_args() {
  local -a extra
  local arg why
  mapfile -d '' -t extra < <(extra_args)
  for arg in "${extra[@]}"; do
    [[ "$arg" == -* ]] || continue
    why="$(llama_flag_refusal "$arg")"
    [[ -z "$why" ]] || die_config "EXTRA_ARGS may not set ${arg%%=*}: $why"
  done
}

# The variables llama-server reads as flags (LLAMA_ARG_*: the same rules as EXTRA_ARGS),
# with the flag each stands for; host, port and key are scrubbed instead (scrub_llama_env:
# the base image sets LLAMA_ARG_HOST). A switch counts only when on (llama.cpp's truthy
# values), as llama-server reads it.
readonly LLAMA_ENV_FLAGS="LLAMA_ARG_REUSE_PORT:--reuse-port:switch
LLAMA_ARG_STATIC_PATH:--path
LLAMA_ARG_SSL_KEY_FILE:--ssl-key-file
LLAMA_ARG_SSL_CERT_FILE:--ssl-cert-file
LLAMA_ARG_MODEL:--model
LLAMA_ARG_ALIAS:--alias
LLAMA_ARG_MODELS_DIR:--models-dir
LLAMA_ARG_MODELS_PRESET:--models-preset
LLAMA_ARG_MODELS_MAX:--models-max
LLAMA_ARG_MODEL_URL:--model-url
LLAMA_ARG_HF_REPO:--hf-repo
LLAMA_ARG_HF_FILE:--hf-file
LLAMA_ARG_DOCKER_REPO:--docker-repo
LLAMA_ARG_MMPROJ_URL:--mmproj-url
LLAMA_ARG_SPEC_DRAFT_HF_REPO:--hf-repo-draft
LLAMA_ARG_SPEC_DRAFT_MODEL:--model-draft
LLAMA_ARG_RPC:--rpc
LLAMA_ARG_API_PREFIX:--api-prefix
LLAMA_ARG_CONTEXT_SHIFT:--context-shift:switch
LLAMA_ARG_TOOLS:--tools
LLAMA_ARG_TOOLS_RUNTIME:--tools-runtime
LLAMA_ARG_MCP_SERVERS_CONFIG:--mcp-servers-config
LLAMA_ARG_MCP_SERVERS_JSON:--mcp-servers-json
LLAMA_ARG_AGENT:--agent:switch
LLAMA_ARG_UI_MCP_PROXY:--ui-mcp-proxy:switch"

# check_llama_env: each LLAMA_ARG_* variable above, when set, is refused as its flag would
# be (named, never its value).
check_llama_env() {
  local name flag kind value why
  while IFS=: read -r name flag kind; do
    value="${!name:-}"
    [[ -n "$value" ]] || continue
    if [[ "$kind" == "switch" ]]; then
      case "$value" in on | enabled | true | 1) ;; *) continue ;; esac
    fi
    why="$(llama_flag_refusal "$flag")"
    [[ -z "$why" ]] || die_config "$name is set (llama-server's $flag): $why; unset it"
  done <<<"$LLAMA_ENV_FLAGS"
}

# backend_ports: PORT_BACKEND, PORT_BACKEND + 1, ... one per backend.
backend_ports() { seq "$PORT_BACKEND" $((PORT_BACKEND + BACKEND_COUNT - 1)); }

# gpu_ids: the GPUs visible to the container, one index per line (CUDA_VISIBLE_DEVICES
# when set, else what nvidia-smi lists; none on a CPU-only machine).
gpu_ids() {
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | sed '/^$/d'
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true
  fi
}

# resolve_backends: BACKEND_COUNT from BACKENDS (auto: one per visible GPU) and GPUS, the
# GPUs backend i picks from (i modulo their count). One backend sees every GPU as before.
resolve_backends() {
  mapfile -t GPUS < <(gpu_ids)
  case "${BACKENDS:-1}" in
    auto) BACKEND_COUNT=$((${#GPUS[@]} > 0 ? ${#GPUS[@]} : 1)) ;;
    *)
      require_uint BACKENDS 1 64
      BACKEND_COUNT=$((10#${BACKENDS:-1}))
      ;;
  esac
  if [[ "$MODEL_MODE" == "router" ]] && ((BACKEND_COUNT > 1)); then
    log "router mode runs one llama-server: BACKENDS=${BACKENDS} does not apply"
    BACKEND_COUNT=1
  fi
  export BACKENDS="$BACKEND_COUNT"
}

# check_ports: each of PORT, PORT_HEALTH and the backend ports must be free (one bind test each,
# in one interpreter start: this runs before the health responder exists).
check_ports() {
  local busy
  local -a backend_list
  mapfile -t backend_list < <(backend_ports)
  busy="$(
    python3 - "$PORT" "$PORT_HEALTH" "${backend_list[@]}" <<'PY'
import socket, sys
seen = set()
names = ["PORT", "PORT_HEALTH"] + [f"PORT_BACKEND+{i}" for i in range(len(sys.argv) - 3)]
names[2] = "PORT_BACKEND"
for name, port in zip(names, sys.argv[1:]):
    if port in seen:
        continue
    seen.add(port)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", int(port)))
        except OSError:
            print(f"{name}={port}")
            break
PY
  )"
  if [[ -n "$busy" ]]; then
    die_config "$busy is already in use: stop what listens there or choose another port"
  fi
}

# ---------------------------------------------------------------- llama-server

resolve_llama_bin() {
  if [[ -n "${LLAMA_SERVER_BIN:-}" ]]; then
    if [[ ! -x "$LLAMA_SERVER_BIN" ]] && ! command -v "$LLAMA_SERVER_BIN" >/dev/null 2>&1; then
      die_config "LLAMA_SERVER_BIN=$LLAMA_SERVER_BIN is not an executable file"
    fi
    echo "$LLAMA_SERVER_BIN"
  elif command -v llama-server >/dev/null 2>&1; then
    command -v llama-server
  elif [[ -x /app/llama-server ]]; then
    echo /app/llama-server
  else
    die_config "no llama-server found on PATH or at /app/llama-server: set LLAMA_SERVER_BIN"
  fi
}

# is_model_file NAME: a .gguf a user would call a model: not a later shard of a split
# model, not a multimodal projector.
is_model_file() {
  local base="$1"
  [[ "$base" == *.gguf && "$base" != *mmproj* ]] || return 1
  [[ "$base" =~ -[0-9]{5}-of-[0-9]{5}\.gguf$ && ! "$base" =~ -00001-of-[0-9]{5}\.gguf$ ]] && return 1
  return 0
}

# model_in_dir DIR: the model file of a one-model subdirectory (its first shard).
model_in_dir() {
  local file
  shopt -s nullglob
  for file in "$1"/*.gguf; do
    if is_model_file "$(basename "$file")"; then
      shopt -u nullglob
      echo "$file"
      return 0
    fi
  done
  shopt -u nullglob
}

# list_models DIR: the models in llama-server's models-dir layout, one per line: a .gguf
# at the top of DIR, or a subdirectory holding one model's files (split shards, mmproj).
list_models() {
  local dir="$1" entry
  shopt -s nullglob
  for entry in "$dir"/*; do
    if [[ -d "$entry" ]]; then
      [[ -n "$(model_in_dir "$entry")" ]] && echo "$entry"
    elif is_model_file "$(basename "$entry")"; then
      echo "$entry"
    fi
  done
  shopt -u nullglob
  return 0
}

# use_model_dir DIR: serve a one-model subdirectory: its model file (first shard) and
# its projector, if it holds one.
use_model_dir() {
  local projector
  MODEL_FILE="$(model_in_dir "$1")"
  shopt -s nullglob
  for projector in "$1"/*mmproj*.gguf; do
    MMPROJ_FILE="$projector"
    break
  done
  shopt -u nullglob
}

# resolve_model: sets MODEL_MODE (single|router|hub), MODEL_FILE and MMPROJ_FILE; exits 2
# when there is none.
resolve_model() {
  local models_dir="$1"
  MODEL_MODE="single"
  MODEL_FILE=""
  MMPROJ_FILE=""
  if [[ -n "${MODEL_PATH:-}" ]]; then
    [[ -f "$MODEL_PATH" ]] || die_config "MODEL_PATH=$MODEL_PATH: no such file"
    MODEL_FILE="$MODEL_PATH"
    return 0
  fi
  if [[ -n "${MODEL_NAME:-}" ]]; then
    if [[ -d "$models_dir/$MODEL_NAME" && -n "$(model_in_dir "$models_dir/$MODEL_NAME")" ]]; then
      use_model_dir "$models_dir/$MODEL_NAME"
      return 0
    fi
    [[ -f "$models_dir/$MODEL_NAME" ]] ||
      die_config "MODEL_NAME=$MODEL_NAME: no such file or model subdirectory in $models_dir (for a split model name its first shard, *-00001-of-0000N.gguf)"
    MODEL_FILE="$models_dir/$MODEL_NAME"
    return 0
  fi
  if [[ -n "${MODEL_REPO:-}" ]]; then
    MODEL_MODE="hub" # fetched (or found on the volume) once the probes answer
    return 0
  fi
  local -a found=()
  if [[ -d "$models_dir" ]]; then
    mapfile -t found < <(list_models "$models_dir")
  fi
  case "${#found[@]}" in
    0) die_config "no .gguf model in $models_dir: copy one there (or a subdirectory per multi-file model), or set MODEL_PATH, MODEL_NAME or MODEL_REPO" ;;
    1)
      if [[ -d "${found[0]}" ]]; then
        use_model_dir "${found[0]}"
      else
        MODEL_FILE="${found[0]}"
      fi
      ;;
    *) MODEL_MODE="router" ;;
  esac
}

# fetch_hub_model: MODEL_REPO onto the volume (or found there), while probes say 204 and
# the log and /health show progress. Run in the background so SIGTERM still drains.
fetch_hub_model() {
  local out="$RUN_DIR/model.path" status began
  set_state downloading
  began="$(now_epoch)"
  mark_startup download_start "$began"
  GATEWAY_DOWNLOAD_FILE="$RUN_DIR/download.json" python3 "$SCRIPT_DIR/fetch_model.py" >"$out" &
  FETCH_PID=$!
  while true; do
    status=0
    wait "$FETCH_PID" || status=$?
    # A trapped signal (SIGHUP) interrupts wait while the download goes on.
    kill -0 "$FETCH_PID" 2>/dev/null || break
  done
  rm -f "$RUN_DIR/download.json"
  if ((status != 0)); then
    child_died "$FETCH_PID" "$status"
  fi
  FETCH_PID=""
  mark_startup download_end
  log "model fetched in $(awk -v a="$began" -v b="$(now_epoch)" 'BEGIN { printf "%.1f", b - a }')s"
  MODEL_MODE="single"
  MODEL_FILE="$(<"$out")"
  set_state starting
  log "model:         $MODEL_FILE ($(human_size "$(stat -L -c %s "$MODEL_FILE")")), served as '$(model_alias)'"
}

# model_alias: the model id clients see: MODEL_ALIAS, else the file name without .gguf
# and without a split suffix (never a path).
model_alias() {
  local base
  base="$(basename "$MODEL_FILE" .gguf)"
  echo "${MODEL_ALIAS:-${base%-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]}}"
}

# llama_args MODELS_DIR KEY_FILE [PORT]: prints the llama-server arguments, each ended by a
# NUL (read them with mapfile -d ''): a path may hold any character but NUL, and a newline
# in one must stay inside that argument, never become another.
llama_args() {
  local models_dir="$1" key_file="$2"
  if [[ "$MODEL_MODE" == "router" ]]; then
    printf '%s\0' --models-dir "$models_dir"
    [[ -n "${MODELS_MAX:-}" ]] && printf '%s\0' --models-max "$MODELS_MAX"
  else
    printf '%s\0' -m "$MODEL_FILE" --alias "$(model_alias)"
    [[ -n "$MMPROJ_FILE" ]] && printf '%s\0' --mmproj "$MMPROJ_FILE"
  fi
  printf '%s\0' --host 127.0.0.1 --port "${3:-$PORT_BACKEND}" --api-key-file "$key_file" --metrics --slots
  [[ -n "${NGL:-}" ]] && printf '%s\0' -ngl "$NGL"
  [[ -n "${CTX:-}" ]] && printf '%s\0' -c "$CTX"
  [[ -n "${PARALLEL:-}" ]] && printf '%s\0' -np "$PARALLEL"
  # WEBUI=false: the gateway answers 404 for the UI, and llama-server serves none either.
  case "${WEBUI:-true}" in
    [Ff][Aa][Ll][Ss][Ee] | 0 | [Nn][Oo] | [Oo][Ff][Ff]) printf '%s\0' --no-ui ;;
  esac
  local threads
  threads="$(backend_threads)"
  [[ -n "$threads" ]] && printf '%s\0' --threads "$threads"
  extra_args
  return 0
}

# backend_threads: with several llama-servers, each one's share of the CPUs, unless the
# operator chose (-t/--threads in EXTRA_ARGS, or LLAMA_ARG_THREADS); empty otherwise.
# Each would spin a thread per core: two generating at once on 2 cores ran 40x slower.
backend_threads() {
  ((BACKEND_COUNT > 1)) || return 0
  [[ -z "${LLAMA_ARG_THREADS:-}" ]] || return 0
  local word
  local -a extra
  mapfile -d '' -t extra < <(extra_args)
  for word in "${extra[@]}"; do
    case "$word" in -t | --threads | -t=* | --threads=*) return 0 ;; esac
  done
  local cpus
  cpus="$(nproc 2>/dev/null || echo 1)"
  echo $((cpus / BACKEND_COUNT > 1 ? cpus / BACKEND_COUNT : 1))
}

# The base image and users may set these; the supervisor owns host, port and key.
scrub_llama_env() {
  unset LLAMA_ARG_HOST LLAMA_ARG_PORT LLAMA_API_KEY LLAMA_ARG_API_KEY LLAMA_ARG_API_KEY_FILE
}

# start_llama_servers BIN KEY_FILE: one llama-server per backend, backend i on
# PORT_BACKEND + i; with several, each sees one GPU (i modulo the visible ones).
start_llama_servers() {
  local bin="$1" key_file="$2" i port prefix
  local -a args
  log "starting $BACKEND_COUNT llama-server(s) (no load deadline: large models take minutes)"
  for ((i = 0; i < BACKEND_COUNT; i++)); do
    port=$((PORT_BACKEND + i))
    mapfile -d '' -t args < <(llama_args "$MODELS_DIR" "$key_file" "$port")
    prefix="[llama-server]"
    ((BACKEND_COUNT > 1)) && prefix="[llama-server $i]"
    # Under Vertex AI (AIP_MODE=PREDICTION) llama-server moves to AIP_HTTP_PORT, the
    # container's serving port, which is the gateway's: keep it on its own.
    if ((BACKEND_COUNT > 1 && ${#GPUS[@]})); then
      AIP_HTTP_PORT="$port" CUDA_VISIBLE_DEVICES="${GPUS[i % ${#GPUS[@]}]}" \
        "$bin" "${args[@]}" > >(sed -u "s/^/$prefix /" >&2) 2>&1 &
    else
      AIP_HTTP_PORT="$port" "$bin" "${args[@]}" > >(sed -u "s/^/$prefix /" >&2) 2>&1 &
    fi
    LLAMA_PIDS+=("$!")
  done
}

# ---------------------------------------------------------------- keys and state

# make_run_dir: a private directory on tmpfs for the backend key and the state file.
make_run_dir() {
  local base
  for base in "${RUN_BASE:-}" /dev/shm "${XDG_RUNTIME_DIR:-}" "${TMPDIR:-/tmp}"; do
    [[ -n "$base" && -d "$base" && -w "$base" ]] || continue
    mktemp -d "$base/llama-gguf-inference.XXXXXX" && return 0
  done
  die_config "no writable tmpfs for the backend key (tried /dev/shm, XDG_RUNTIME_DIR, TMPDIR)"
}

generate_backend_key() {
  local key_file="$1"
  (
    umask 077
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$key_file"
  )
}

set_state() {
  [[ -n "$STATE_FILE" ]] || return 0
  printf '%s\n' "$1" >"$STATE_FILE.tmp" && mv -f "$STATE_FILE.tmp" "$STATE_FILE"
}

# now_epoch: wall-clock seconds with microseconds ('.' whatever the locale says).
now_epoch() { echo "${EPOCHREALTIME/,/.}"; }

# mark_startup EVENT [EPOCH]: one line of the cold-start timeline the gateway reads
# (gguf_gateway/startup.py): where the time from boot to ready went.
mark_startup() {
  [[ -n "$STARTUP_FILE" ]] || return 0
  printf '%s=%s\n' "$1" "${2:-$(now_epoch)}" >>"$STARTUP_FILE"
}

# ---------------------------------------------------------------- diagnostics

human_size() {
  local bytes="$1"
  awk -v b="$bytes" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1; while (b >= 1024 && i < 5) { b /= 1024; i++ } printf "%.1f %s", b, u[i] }'
}

boot_diagnostics() {
  local platform="$1" bin="$2" key_count="$3" health
  if single_port; then
    health="on the gateway's port (PORT_HEALTH=PORT): ${HEALTH_CHECK_PATH:-/ping} and /ping"
  else
    health="$HOST:$PORT_HEALTH"
  fi
  local model_desc gpu version
  if [[ "$MODEL_MODE" == "router" ]]; then
    model_desc="router mode over $MODELS_DIR ($(list_models "$MODELS_DIR" | wc -l) models)"
  elif [[ "$MODEL_MODE" == "hub" ]]; then
    local token="not set" # whether it is set, never its value
    [[ -n "${HF_TOKEN:-}" ]] && token="set"
    model_desc="MODEL_REPO=$MODEL_REPO${MODEL_REPO_FILE:+ file $MODEL_REPO_FILE} from ${HF_ENDPOINT:-https://huggingface.co} (HF_TOKEN $token)"
  else
    model_desc="$MODEL_FILE ($(human_size "$(stat -L -c %s "$MODEL_FILE")")), served as '$(model_alias)'"
    [[ -n "$MMPROJ_FILE" ]] && model_desc+=", projector $MMPROJ_FILE"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | paste -sd ';' - || true)"
    gpu="${gpu:-nvidia-smi present but no GPU visible (did you pass --gpus all?)}"
  else
    gpu="none detected (CPU inference)"
  fi
  version="$("$bin" --version 2>&1 | grep -m1 -i 'version' || echo unknown)"
  log "---- llama-gguf-inference boot ----"
  log "platform:      $platform"
  log "DATA_DIR:      $DATA_DIR"
  log "model:         $model_desc"
  log "GPU:           $gpu"
  log "llama-server:  $bin ($version)"
  log "ports:         gateway $HOST:$PORT, health $health, backend 127.0.0.1:$PORT_BACKEND"
  if ((BACKEND_COUNT > 1)); then
    local i placement=""
    for ((i = 0; i < BACKEND_COUNT; i++)); do
      placement+=" 127.0.0.1:$((PORT_BACKEND + i))"
      ((${#GPUS[@]})) && placement+="(GPU ${GPUS[i % ${#GPUS[@]}]})"
    done
    local threads
    threads="$(backend_threads)"
    log "backends:      $BACKEND_COUNT llama-servers:$placement${threads:+, $threads CPU thread(s) each}"
  fi
  if [[ "$platform" == "vastai" ]]; then
    # Vast.ai maps each exposed port to a random external one: say which.
    local external_var="VAST_TCP_PORT_${PORT}" external
    external="${!external_var:-unknown (see the instance port list)}"
    log "vast.ai:       API at ${PUBLIC_IPADDR:-<instance ip>}:$external (-> container port $PORT)"
  fi
  log "auth:          $AUTH_MODE ($key_count key(s) in $AUTH_KEYS_FILE${API_KEYS:+ and API_KEYS}${API_KEY:+, plus API_KEY}${API_KEY_FILE:+, plus API_KEY_FILE})"
  log "llama args:    NGL=${NGL:-auto} CTX=${CTX:-auto} PARALLEL=${PARALLEL:-auto} EXTRA_ARGS=${EXTRA_ARGS:-}"
  log "-----------------------------------"
}

# ---------------------------------------------------------------- supervision

# stop_child PID SECONDS: SIGTERM, then SIGKILL after SECONDS.
stop_child() {
  local pid="$1" grace="$2" waited=0
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited >= grace * 10)); then
      log "pid $pid did not stop in ${grace}s: killing"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  cleanup_ticker
  [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]] && rm -rf "$RUN_DIR"
  RUN_DIR=""
}

# Drain on SIGTERM/SIGINT: health 503 at once, gateway finishes in-flight requests,
# then llama-server stops, then the health responder.
drain() {
  trap '' TERM INT
  log "shutdown requested: draining (DRAIN_TIMEOUT=${DRAIN_TIMEOUT}s)"
  set_state draining
  stop_child "$FETCH_PID" 2 # a partial download is kept and resumed at the next start
  FETCH_PID=""
  stop_child "$GATEWAY_PID" "$((${DRAIN_TIMEOUT%.*} + 2))"
  GATEWAY_PID=""
  stop_llama_servers
  stop_child "$HEALTH_PID" 2
  HEALTH_PID=""
  cleanup
  log "stopped cleanly"
  exit 0
}

# A child died on its own: the others go too, with its status.
child_died() {
  local pid="$1" status="$2" name
  case "$pid" in
    "$GATEWAY_PID") name="gateway" GATEWAY_PID="" ;;
    "$HEALTH_PID") name="health responder" HEALTH_PID="" ;;
    "$FETCH_PID") name="model download" FETCH_PID="" ;;
    *) name="pid $pid" ;;
  esac
  local i
  for i in "${!LLAMA_PIDS[@]}"; do
    if [[ "${LLAMA_PIDS[i]}" == "$pid" ]]; then
      name="llama-server"
      ((BACKEND_COUNT > 1)) && name+=" $i (port $((PORT_BACKEND + i)))"
      unset 'LLAMA_PIDS[i]'
    fi
  done
  ((status == 0)) && status=1
  err "$name exited unexpectedly (status $status): stopping"
  set_state failed
  stop_child "$GATEWAY_PID" 3
  stop_llama_servers
  # Let a probe see 503 before the health responder goes.
  sleep "${FAILED_HEALTH_GRACE:-1}"
  stop_child "$HEALTH_PID" 2
  cleanup
  exit "$status"
}

# stop_llama_servers: all of them at once (SIGTERM to each, then wait for each).
stop_llama_servers() {
  local pid
  for pid in "${LLAMA_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${LLAMA_PIDS[@]}"; do
    stop_child "$pid" 5
  done
  LLAMA_PIDS=()
}

cleanup_ticker() {
  if [[ -n "$TICKER_PID" ]]; then
    kill "$TICKER_PID" 2>/dev/null || true
    TICKER_PID=""
  fi
}

supervise() {
  local started=$SECONDS pid status state
  local -a children=()
  [[ -n "$HEALTH_PID" ]] && children+=("$HEALTH_PID")
  children+=("${LLAMA_PIDS[@]}" "$GATEWAY_PID")
  while true; do
    # The ticker is a child like the others; it never outlives the script (cleanup).
    sleep 10 &
    TICKER_PID=$!
    status=0
    pid=""
    wait -n -p pid "$TICKER_PID" "${children[@]}" || status=$?
    if [[ -z "${pid:-}" ]]; then
      # wait was interrupted by a trapped signal; the trap has run.
      cleanup_ticker
      continue
    fi
    if [[ "$pid" == "$TICKER_PID" ]]; then
      TICKER_PID=""
      state="$(cat "$STATE_FILE" 2>/dev/null || echo starting)"
      if [[ "$state" != "ready" ]]; then
        log "model still loading ($((SECONDS - started))s): state=$state"
      fi
      continue
    fi
    child_died "$pid" "$status"
  done
}

# default_port: the gateway's port when PORT is unset: 8000, or under Vertex AI
# (AIP_MODE=PREDICTION) the port it sends requests and probes to, AIP_HTTP_PORT.
default_port() {
  if [[ "${AIP_MODE:-}" == "PREDICTION" ]]; then
    echo "${AIP_HTTP_PORT:-8080}"
  else
    echo 8000
  fi
}

main() {
  BOOT_TIME="$(now_epoch)"
  export HOST="${HOST:-0.0.0.0}" PORT="${PORT:-$(default_port)}"
  export PORT_BACKEND="${PORT_BACKEND:-8090}" DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-8}"
  validate_settings

  local bin key_file
  # The gateway validates its settings and the keys, and resolves the platform, DATA_DIR
  # and PORT_HEALTH's default; fail before anything starts.
  load_facts
  export MODELS_DIR="${MODELS_DIR:-$DATA_DIR/models}" LOG_DIR="${LOG_DIR:-$DATA_DIR/logs}"
  export AUTH_KEYS_FILE="${AUTH_KEYS_FILE:-$DATA_DIR/api_keys.txt}"
  mkdir -p "$MODELS_DIR" "$LOG_DIR" 2>/dev/null || true

  bin="$(resolve_llama_bin)"
  resolve_model "$MODELS_DIR"
  resolve_backends
  check_port_roles
  check_ports
  scrub_llama_env

  RUN_DIR="$(make_run_dir)"
  chmod 700 "$RUN_DIR"
  STATE_FILE="$RUN_DIR/state"
  STARTUP_FILE="$RUN_DIR/startup"
  mark_startup boot "$BOOT_TIME"
  key_file="$RUN_DIR/backend.key"
  set_state starting
  trap drain TERM INT
  trap cleanup EXIT
  trap 'log "SIGHUP: reloading keys"; [[ -n "$GATEWAY_PID" ]] && kill -HUP "$GATEWAY_PID"' HUP

  generate_backend_key "$key_file"
  # First, so platform probes get 204 (starting) within a second of container start: the
  # health responder (two-port mode) and the gateway. Neither needs HF_TOKEN.
  if ! single_port; then
    (
      unset HF_TOKEN
      GATEWAY_STATE_FILE="$STATE_FILE" exec python3 "$SCRIPT_DIR/health_server.py"
    ) &
    HEALTH_PID=$!
  fi
  (
    unset HF_TOKEN
    BACKEND_API_KEY="$(<"$key_file")" GATEWAY_STATE_FILE="$STATE_FILE" \
      GATEWAY_DOWNLOAD_FILE="$RUN_DIR/download.json" GATEWAY_STARTUP_FILE="$STARTUP_FILE" \
      exec python3 "$SCRIPT_DIR/gateway.py"
  ) &
  GATEWAY_PID=$!

  boot_diagnostics "$PLATFORM" "$bin" "$KEY_COUNT"
  if [[ "$MODEL_MODE" == "hub" ]]; then
    fetch_hub_model
  fi
  # llama-server never sees the Hub token: the model is on the volume by now.
  unset HF_TOKEN

  mark_startup load_start
  start_llama_servers "$bin" "$key_file"

  supervise
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
