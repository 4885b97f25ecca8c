#!/usr/bin/env bash
# One comparison run on loopback: Switchyard vs HAProxy (mode tcp, without and with
# `option splice-auto`) vs nginx `stream` vs a direct connection, each proxy with one worker.
# Measures bulk throughput (iperf3, 1 and 4 streams), request rate and latency over kept-alive
# connections, new-connection rate, RSS per idle connection, and the proxy's CPU time for each.
# Prints one markdown table and writes it to benches/results/latest.md. See benches/README.md.
#
# Every process is started here and stopped by its PID on exit; only 127.0.0.1 is used.
# Tunables (environment): BULK_SECONDS (5), RR_SECONDS (5), CONNECT_SECONDS (5),
# RR_CONNS (16), CONNECT_LOOPS (8), IDLE_CONNS (5000), ROUNDS (3), TARGETS (all), KEEP_LOGS (0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BULK_SECONDS=${BULK_SECONDS:-5}
RR_SECONDS=${RR_SECONDS:-5}
CONNECT_SECONDS=${CONNECT_SECONDS:-5}
RR_CONNS=${RR_CONNS:-16}
CONNECT_LOOPS=${CONNECT_LOOPS:-8}
IDLE_CONNS=${IDLE_CONNS:-5000}
TARGETS=${TARGETS:-"direct switchyard haproxy haproxy_splice nginx"}
ROUNDS=${ROUNDS:-3}
KEEP_LOGS=${KEEP_LOGS:-0}
NGINX_STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- Packages -------------------------------------------------------------------------------
install_packages() {
  local want=(haproxy nginx libnginx-mod-stream iperf3 jq) missing=() p sudo=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
      [ ${#missing[@]} -eq 0 ] || die "not root and no sudo: install ${missing[*]} first"
      log "not root: skipping apt-get (all of ${want[*]} present)"
      return
    fi
    sudo=(sudo)
  fi
  # Package lists are only needed when something is missing. Installing what is present is a
  # quick no-op that still checks the set is complete; --no-upgrade keeps the versions being
  # compared as they are.
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o DPkg::Lock::Timeout=600 --no-install-recommends --no-upgrade "${want[@]}" >/dev/null
  [ -e "$NGINX_STREAM_MODULE" ] || die "nginx stream module not found at $NGINX_STREAM_MODULE"
  log "packages: ${want[*]} installed"
}
command -v apt-get >/dev/null || die "apt-get not found: this script expects Debian or Ubuntu"
install_packages
for cmd in haproxy nginx iperf3 jq cargo; do
  command -v "$cmd" >/dev/null || die "$cmd not found"
done

# --- Build ----------------------------------------------------------------------------------
log "building switchyard and the load generator (release)"
cargo build --release --quiet --bin switchyard
SWITCHYARD=$ROOT/target/release/switchyard
LOADGEN=$(cargo bench --bench loadgen --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"name":"loadgen".*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$SWITCHYARD" ] || die "no switchyard binary at $SWITCHYARD"
[ -n "$LOADGEN" ] && [ -x "$LOADGEN" ] || die "could not find the loadgen bench executable"

# --- Processes ------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/switchyard-compare.XXXXXX)
PIDS=()

stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if [ "$KEEP_LOGS" = 1 ]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background with output in $WORK/NAME.log; sets $STARTED.
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  STARTED=$!
  PIDS+=("$STARTED")
}

# wait_for FILE PATTERN SECONDS
wait_for() {
  local i
  for i in $(seq $(($3 * 10))); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

wait_port() {
  local i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

free_port() { "$LOADGEN" free-port; }

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# --- Machine --------------------------------------------------------------------------------
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# Each proxied connection holds two sockets, and HAProxy reserves one pipe (two descriptors)
# per four connections for splicing; leave room for listeners and logs.
MAXCONN=$(((NOFILE - 200) * 2 / 5))
[ "$MAXCONN" -le 30000 ] || MAXCONN=30000
log "open-file limit: $NOFILE, proxies sized for $MAXCONN connections"
[ "$MAXCONN" -ge "$IDLE_CONNS" ] || die "open-file limit $NOFILE is too low for $IDLE_CONNS idle connections"
NPROC=$(nproc)
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
KERNEL=$(uname -r)
DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- Backends -------------------------------------------------------------------------------
start echo-backend "$LOADGEN" serve --listen 127.0.0.1:0
ECHO_PID=$STARTED
wait_for "$WORK/echo-backend.log" '^listening' 10 || die "echo backend did not start"
ECHO_PORT=$(sed -n 's/^listening port=//p' "$WORK/echo-backend.log")
IPERF_PORT=$(free_port)
start iperf3-server iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT"
wait_port "$IPERF_PORT" || die "iperf3 server did not start"
log "echo backend :$ECHO_PORT (pid $ECHO_PID), iperf3 server :$IPERF_PORT"

# --- Proxies --------------------------------------------------------------------------------
# start_target NAME: starts the proxy (none for direct); sets PROXY_PID, ECHO_AT, BULK_AT.
start_target() {
  local name=$1 p_echo p_bulk
  PROXY_PID=
  if [ "$name" = direct ]; then
    ECHO_AT=$ECHO_PORT
    BULK_AT=$IPERF_PORT
    return
  fi
  p_echo=$(free_port)
  p_bulk=$(free_port)
  [ "$p_echo" != "$p_bulk" ] || p_bulk=$(free_port)
  case $name in
  switchyard)
    cat >"$WORK/switchyard.yaml" <<EOF
global: {worker_threads: 1}
listeners:
  - {name: echo, bind: "127.0.0.1:$p_echo", pool: echo, max_connections: $MAXCONN}
  - {name: bulk, bind: "127.0.0.1:$p_bulk", pool: bulk}
pools:
  - {name: echo, backends: [{address: "127.0.0.1:$ECHO_PORT"}]}
  - {name: bulk, backends: [{address: "127.0.0.1:$IPERF_PORT"}]}
EOF
    start switchyard "$SWITCHYARD" run -c "$WORK/switchyard.yaml" --log-level warn
    ;;
  haproxy | haproxy_splice)
    local splice=""
    [ "$name" = haproxy_splice ] && splice="option splice-auto"
    cat >"$WORK/$name.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
defaults
    mode tcp
    maxconn $MAXCONN
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    $splice
frontend echo
    bind 127.0.0.1:$p_echo
    default_backend echo
backend echo
    server echo 127.0.0.1:$ECHO_PORT
frontend bulk
    bind 127.0.0.1:$p_bulk
    default_backend bulk
backend bulk
    server bulk 127.0.0.1:$IPERF_PORT
EOF
    start "$name" haproxy -db -f "$WORK/$name.cfg"
    ;;
  nginx)
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx/nginx.conf" <<EOF
load_module $NGINX_STREAM_MODULE;
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((MAXCONN * 2)); }
stream {
    proxy_timeout 1h;
    server { listen 127.0.0.1:$p_echo; proxy_pass 127.0.0.1:$ECHO_PORT; }
    server { listen 127.0.0.1:$p_bulk; proxy_pass 127.0.0.1:$IPERF_PORT; }
}
EOF
    start nginx nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf"
    ;;
  *) die "unknown target $name" ;;
  esac
  PROXY_PID=$STARTED
  wait_port "$p_echo" && wait_port "$p_bulk" || {
    cat "$WORK/$name.log" >&2 || true
    die "$name did not start"
  }
  ECHO_AT=$p_echo
  BULK_AT=$p_bulk
}

# Results: R[target.metric] = value; per round R[target.metric.round] first.
declare -A R
declare -A PID ECHO BULK

# run_idle TARGET: RSS per idle connection on the freshly started proxy.
run_idle() {
  local t=$1 pid=${PID[$1]} before after opened idle_pid
  [ -n "$pid" ] || return 0
  before=$(rss_kb "$pid")
  start "$t-idle" "$LOADGEN" idle --to "127.0.0.1:${ECHO[$t]}" --conns "$IDLE_CONNS" --hold-seconds 120
  idle_pid=$STARTED
  wait_for "$WORK/$t-idle.log" '^ready' 90 || die "$t: idle connections did not open"
  sleep 1
  after=$(rss_kb "$pid")
  opened=$(sed -n 's/^ready opened=\([0-9]*\).*/\1/p' "$WORK/$t-idle.log")
  stop_pid "$idle_pid"
  log "$t idle: opened $opened, RSS ${before} kB -> ${after} kB"
  if [ "${opened:-0}" -gt 0 ]; then
    R[$t.idle_bytes]=$(calc '%.0f' "($after - $before) * 1024 / $opened")
  fi
  [ "$opened" = "$IDLE_CONNS" ] || R[$t.idle_note]="only $opened of $IDLE_CONNS opened"
}

# run_bulk TARGET STREAMS ROUND
run_bulk() {
  local t=$1 n=$2 r=$3 pid=${PID[$1]} c0 c1 json bytes bps
  json=$WORK/$t-bulk$n-$r.json
  [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
  if ! timeout $((BULK_SECONDS + 30)) iperf3 -c 127.0.0.1 -p "${BULK[$t]}" -t "$BULK_SECONDS" -P "$n" -J >"$json" 2>&1; then
    log "$t: iperf3 -P $n failed: $(jq -r '.error // empty' "$json" 2>/dev/null)"
    return 0
  fi
  [ -z "$pid" ] || c1=$(cpu_ticks "$pid")
  bytes=$(jq '.end.sum_received.bytes' "$json")
  bps=$(jq '.end.sum_received.bits_per_second' "$json")
  R[$t.bulk${n}_gbps.$r]=$(calc '%.2f' "$bps / 1e9")
  [ -z "$pid" ] || R[$t.bulk${n}_cpu.$r]=$(calc '%.3f' "($c1 - $c0) / $CLK_TCK / ($bytes / 1e9)")
  log "round $r $t bulk -P $n: ${R[$t.bulk${n}_gbps.$r]} Gbit/s, CPU ${R[$t.bulk${n}_cpu.$r]:--} s/GB"
}

# run_load TARGET MODE ROUND (MODE: rr | connect)
run_load() {
  local t=$1 mode=$2 r=$3 pid=${PID[$1]} c0 c1 out count errors args
  out=$WORK/$t-$mode-$r.log
  if [ "$mode" = rr ]; then
    args=(rr --conns "$RR_CONNS" --seconds "$RR_SECONDS")
  else
    args=(connect --concurrency "$CONNECT_LOOPS" --seconds "$CONNECT_SECONDS")
  fi
  [ -z "$pid" ] || c0=$(cpu_ticks "$pid")
  timeout 120 "$LOADGEN" "${args[@]}" --to "127.0.0.1:${ECHO[$t]}" >"$out" 2>&1 ||
    { log "$t: $mode failed: $(cat "$out")"; return 0; }
  [ -z "$pid" ] || c1=$(cpu_ticks "$pid")
  count=$(sed -n 's/.* \(requests\|connections\)=\([0-9]*\).*/\2/p' "$out")
  errors=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' "$out")
  R[$t.${mode}_rate.$r]=$(sed -n 's/.* rate=\([0-9]*\).*/\1/p' "$out")
  R[$t.${mode}_p50.$r]=$(sed -n 's/.* p50_us=\([0-9.]*\).*/\1/p' "$out")
  R[$t.${mode}_p99.$r]=$(sed -n 's/.* p99_us=\([0-9.]*\).*/\1/p' "$out")
  [ "${errors:-0}" = 0 ] || R[$t.${mode}_errors]=$((${R[$t.${mode}_errors]:-0} + errors))
  if [ -n "$pid" ] && [ "${count:-0}" -gt 0 ]; then
    R[$t.${mode}_cpu.$r]=$(calc '%.2f' "($c1 - $c0) * 1e6 / $CLK_TCK / $count")
  fi
  log "round $r $t $mode: $(cat "$out")${pid:+, proxy CPU ${R[$t.${mode}_cpu.$r]:-?} µs each}"
}

median() {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

for t in $TARGETS; do
  start_target "$t"
  PID[$t]=$PROXY_PID
  ECHO[$t]=$ECHO_AT
  BULK[$t]=$BULK_AT
done
log "targets started: $(for t in $TARGETS; do printf '%s(%s) ' "$t" "${PID[$t]:-none}"; done)"
# Memory first, on fresh processes; then the rounds, every target back to back per test so
# they share the machine's conditions.
for t in $TARGETS; do run_idle "$t"; done
# Each round starts with a different target, so none always runs first.
read -r -a ORDER <<<"$TARGETS"
for r in $(seq "$ROUNDS"); do
  for t in "${ORDER[@]}"; do run_bulk "$t" 1 "$r"; done
  for t in "${ORDER[@]}"; do run_bulk "$t" 4 "$r"; done
  for t in "${ORDER[@]}"; do run_load "$t" rr "$r"; done
  for t in "${ORDER[@]}"; do run_load "$t" connect "$r"; done
  ORDER=("${ORDER[@]:1}" "${ORDER[0]}")
done
for t in $TARGETS; do
  [ -z "${PID[$t]}" ] || stop_pid "${PID[$t]}"
  for m in bulk1_gbps bulk4_gbps bulk1_cpu bulk4_cpu rr_rate rr_p50 rr_p99 rr_cpu \
    connect_rate connect_p50 connect_p99 connect_cpu; do
    vals=()
    for r in $(seq "$ROUNDS"); do
      [ -z "${R[$t.$m.$r]:-}" ] || vals+=("${R[$t.$m.$r]}")
    done
    [ ${#vals[@]} -eq 0 ] || R[$t.$m]=$(median "${vals[@]}")
  done
  for mode in rr connect; do
    [ -z "${R[$t.${mode}_errors]:-}" ] || R[$t.${mode}_note]="${R[$t.${mode}_errors]} errors"
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- Report ---------------------------------------------------------------------------------
label() {
  case $1 in
  direct) echo direct ;;
  switchyard) echo Switchyard ;;
  haproxy) echo HAProxy ;;
  haproxy_splice) echo "HAProxy splice" ;;
  nginx) echo "nginx stream" ;;
  esac
}

# ratio METRIC BASE_TARGET: switchyard / base, as "0.83x".
ratio() {
  local a=${R[switchyard.$1]:-} b=${R[$2.$1]:-}
  if [ -n "$a" ] && [ -n "$b" ] && awk "BEGIN { exit !($b > 0) }"; then
    calc '%.2fx' "$a / $b"
  else
    echo "–"
  fi
}

row() {
  local metric=$1 title=$2 line t v
  line="| $title |"
  for t in $TARGETS; do
    v=${R[$t.$metric]:-–}
    # Errors and short counts are shown next to the figure they affect.
    case $metric in
    *_rate | idle_bytes) local note=${R[$t.${metric%_*}_note]:-} ;;
    *) local note= ;;
    esac
    [ -z "$note" ] || v="$v ($note)"
    line="$line $v |"
  done
  echo "$line $(ratio "$metric" haproxy) | $(ratio "$metric" haproxy_splice) |"
}

TABLE=$WORK/table.md
{
  echo "### Switchyard vs HAProxy vs nginx on loopback, one worker each"
  echo
  echo "Machine: $NPROC × $CPU_MODEL, Linux $KERNEL. Date: $DATE."
  echo "Load average at start $LOAD_START, at end $LOAD_END (other work shared the machine: rates are noisy, CPU per unit of work is the steadier figure)."
  echo "Switchyard runs with \`--log-level warn\` (no per-connection log line); HAProxy and nginx run without access logs."
  echo "Each figure is the median of $ROUNDS rounds; within a round every target runs each test back to back, and each round starts with a different target."
  echo "Kept-alive: $RR_CONNS connections, 64-byte request/reply, ${RR_SECONDS}s. New connections: $CONNECT_LOOPS loops of connect/64 B/reply/close, ${CONNECT_SECONDS}s. Bulk: iperf3, ${BULK_SECONDS}s. Idle: $IDLE_CONNS connections after one round trip each."
  echo
  header="| metric |"
  sep="|---|"
  for t in $TARGETS; do
    header="$header $(label "$t") |"
    sep="$sep---:|"
  done
  echo "$header Switchyard ÷ HAProxy | Switchyard ÷ HAProxy splice |"
  echo "$sep---:|---:|"
  row bulk1_cpu "bulk CPU, 1 stream (CPU-s/GB, lower is better)"
  row bulk4_cpu "bulk CPU, 4 streams (CPU-s/GB, lower is better)"
  row rr_cpu "CPU per request (µs, lower is better)"
  row connect_cpu "CPU per new connection (µs, lower is better)"
  row idle_bytes "RSS per idle connection (bytes, lower is better)"
  row bulk1_gbps "bulk, 1 stream (Gbit/s)"
  row bulk4_gbps "bulk, 4 streams (Gbit/s)"
  row rr_rate "requests/s, kept-alive"
  row rr_p50 "request p50 (µs)"
  row rr_p99 "request p99 (µs)"
  row connect_rate "new connections/s"
  row connect_p99 "new connection p99 (µs)"
} >"$TABLE"

mkdir -p "$ROOT/benches/results"
cp "$TABLE" "$ROOT/benches/results/latest.md"
cat "$TABLE"
log "written to benches/results/latest.md"
