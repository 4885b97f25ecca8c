#!/usr/bin/env bash
# UDP DNS forwarding compared: queries per second, p99 latency and proxy CPU per query
# through Switchyard (batched and unbatched syscalls), dnsdist, nginx `stream` UDP, and
# direct to the backend; plus Switchyard with two workers (reuse_port, two sockets) for scale. dnsperf sends `test.example A` to each; every path ends at the same
# backend (dnsmasq answering from its --address table). Each proxy gets one worker.
#
#   benches/udp_compare.sh                 # about 4-5 minutes; prints a markdown table
#   DURATION=30 ROUNDS=3 benches/udp_compare.sh
#   CLIENTS=256 OUTSTANDING=256 benches/udp_compare.sh   # short flows: nearly a flow per query
#   TARGETS="switchyard dnsdist" benches/udp_compare.sh   # only these rows
#
# Installs what it lacks with apt-get (as root), builds Switchyard in release mode, binds only
# 127.0.0.1, stops every process it started by PID, and removes its temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}      # seconds measured per run
WARMUP=${WARMUP:-2}           # seconds sent before measuring (flows, caches)
ROUNDS=${ROUNDS:-2}           # runs per target, alternating targets; the best is reported
CLIENTS=${CLIENTS:-8}         # dnsperf clients (source ports, so flows)
OUTSTANDING=${OUTSTANDING:-200}
# The same CPU budget for every proxy: one-worker proxies run pinned to this one core
# (dnsdist keeps a listener and a responder thread even when told one of each, so unpinned
# it would get two cores); the two-worker row gets both. PIN_CPU= (empty) turns it off.
PIN_CPU=${PIN_CPU-1}
PIN=() # the command prefix that pins (set per proxy); taskset execs, so $! stays the proxy's PID
pin_to() { # CPUS
  PIN=()
  if [ -n "$PIN_CPU" ] && command -v taskset >/dev/null; then PIN=(taskset -c "$1"); fi
}

log() { echo "[udp_compare] $*" >&2; }

# --- tools ---------------------------------------------------------------------------
need=()
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v dnsdist >/dev/null || need+=(dnsdist)
command -v dig >/dev/null || need+=(bind9-dnsutils)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing ${need[*]}; run as root or install them"; exit 1
  fi
  log "installing ${need[*]}"
  apt-get update -qq -o DPkg::Lock::Timeout=600
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    --no-install-recommends "${need[@]}" >/dev/null
fi
log "building switchyard (release)"
cargo build --release --quiet --bin switchyard
SWITCHYARD=target/release/switchyard

WORK=$(mktemp -d /tmp/udp_compare.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop() { # PID: stops one process started here
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

wait_dns() { # PORT [PID]: until test.example resolves through it (10s at most)
  for _ in $(seq 50); do
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
      log "process $2 exited"; return 1
    fi
    if [ "$(dig @127.0.0.1 -p "$1" test.example +short +tries=1 +time=1 2>/dev/null)" = 10.1.2.3 ]; then
      return 0
    fi
    sleep 0.2
  done
  log "nothing answers on port $1"; return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
echo "test.example A" > "$WORK/queries"

# --- backend -------------------------------------------------------------------------
# A port found free for UDP may be busy for TCP (dnsmasq binds both): try a few.
for _ in 1 2 3 4 5; do
  BACKEND_PORT=$(free_port)
  /usr/sbin/dnsmasq --no-daemon --port="$BACKEND_PORT" --listen-address=127.0.0.1 \
    --bind-interfaces --no-resolv --no-hosts --address=/test.example/10.1.2.3 \
    --conf-file=/dev/null --pid-file= --user=root --cache-size=0 2>"$WORK/dnsmasq.log" &
  BACKEND_PID=$!
  PIDS+=("$BACKEND_PID")
  if wait_dns "$BACKEND_PORT" "$BACKEND_PID"; then break; fi
  log "dnsmasq: $(cat "$WORK/dnsmasq.log")"
  stop "$BACKEND_PID"
  BACKEND_PID=
done
[ -n "$BACKEND_PID" ] || { log "the dnsmasq backend did not start"; exit 1; }

# --- proxies -------------------------------------------------------------------------
start_switchyard() { # PORT BATCH WORKERS (in the background: $! is its PID)
  cat > "$WORK/switchyard-$2.yaml" <<EOF
global: {worker_threads: $3}
listeners:
  - name: dns
    bind: 127.0.0.1:$1
    protocol: udp
    pool: dns
    reuse_port: $([ "$3" -gt 1 ] && echo true || echo false)
    $([ "$3" -gt 1 ] && echo "accept_tasks: $3")
    udp: {idle_timeout: 5s, responses: 1, max_flows: 100000, batch: $2}
pools:
  - name: dns
    backends: [{address: 127.0.0.1:$BACKEND_PORT}]
EOF
  local cpus=$PIN_CPU
  [ "$3" -gt 1 ] && cpus=0-$(($(nproc) - 1))
  pin_to "$cpus"
  "${PIN[@]}" "$SWITCHYARD" run -c "$WORK/switchyard-$2.yaml" --log-level warn >/dev/null 2>"$WORK/switchyard-$2.log" &
}

start_dnsdist() { # PORT (in the background)
  cat > "$WORK/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:$1")
newServer({address="127.0.0.1:$BACKEND_PORT", checkName="test.example."})
EOF
  pin_to "$PIN_CPU"
  "${PIN[@]}" dnsdist --supervised --disable-syslog -C "$WORK/dnsdist.conf" >"$WORK/dnsdist.log" 2>&1 &
}

start_nginx() { # PORT (in the background; master_process off: one process does the work)
  mkdir -p "$WORK/nginx/logs"
  cat > "$WORK/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 65536; }
stream {
  upstream dns { server 127.0.0.1:$BACKEND_PORT; }
  server {
    listen 127.0.0.1:$1 udp;
    proxy_pass dns;
    proxy_responses 1;
    proxy_timeout 5s;
  }
}
EOF
  pin_to "$PIN_CPU"
  "${PIN[@]}" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >/dev/null 2>"$WORK/nginx/stderr.log" &
}

# --- measuring ---------------------------------------------------------------------
RESULTS="$WORK/results"
: > "$RESULTS"

measure() { # NAME PORT PID(or "-")
  local name=$1 port=$2 pid=$3 out="$WORK/dnsperf.out"
  local args=(-s 127.0.0.1 -p "$port" -d "$WORK/queries" -c "$CLIENTS" -q "$OUTSTANDING" -T 1)
  dnsperf "${args[@]}" -l "$WARMUP" >/dev/null 2>&1 || true
  local load0 cpu0=0 cpu1=0
  load0=$(cut -d' ' -f1 /proc/loadavg)
  [ "$pid" != - ] && cpu0=$(cpu_ticks "$pid")
  dnsperf "${args[@]}" -l "$DURATION" -v >"$out" 2>&1 || true
  [ "$pid" != - ] && cpu1=$(cpu_ticks "$pid")
  local qps completed lost p50 p99 cpu
  qps=$(awk '/Queries per second/ {printf "%d", $4}' "$out")
  completed=$(awk '/Queries completed/ {print $3}' "$out")
  lost=$(awk '/Queries lost/ {print $3}' "$out")
  read -r p50 p99 < <(awk '/^> / {print $NF}' "$out" | sort -g |
    awk '{v[NR]=$1} END {if (NR==0) {print "- -"; exit} i=int(NR*0.5); if(i<1)i=1; j=int(NR*0.99); if(j<1)j=1; printf "%.3f %.3f\n", v[i]*1000, v[j]*1000}')
  if [ "$pid" != - ] && [ "${completed:-0}" -gt 0 ]; then
    cpu=$(awk -v t="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v n="$completed" 'BEGIN {printf "%.2f", t / hz * 1e6 / n}')
  else
    cpu=-
  fi
  echo "$name|$qps|$p50|$p99|$lost|$cpu|$load0" >> "$RESULTS"
  log "$name: $qps qps, p50 ${p50}ms, p99 ${p99}ms, lost $lost, proxy CPU ${cpu}us/query, load $load0"
}

run_target() { # NAME
  local port pid
  port=$(free_port)
  case $1 in
    direct) measure direct "$BACKEND_PORT" -; return ;;
    switchyard) start_switchyard "$port" 32 1 ;;
    switchyard-batch1) start_switchyard "$port" 1 1 ;;
    switchyard-2workers) start_switchyard "$port" 32 2 ;;
    dnsdist) start_dnsdist "$port" ;;
    nginx) start_nginx "$port" ;;
  esac
  pid=$!
  PIDS+=("$pid")
  if wait_dns "$port" "$pid"; then
    measure "$1" "$port" "$pid"
  fi
  stop "$pid"
}

# TARGETS="switchyard dnsdist" measures only those (space-separated); all by default.
read -r -a TARGETS <<< "${TARGETS:-direct switchyard switchyard-batch1 dnsdist nginx switchyard-2workers}"
for round in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    log "round $round: $t"
    run_target "$t"
  done
done

# --- report --------------------------------------------------------------------------
echo
echo "UDP DNS forwarding, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), Linux $(uname -r)"
echo "One-worker proxies pinned to CPU ${PIN_CPU:-none} (taskset); the two-worker row uses every core."
echo "dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2; exit}') -c $CLIENTS -q $OUTSTANDING -T 1, ${DURATION}s per run, best of $ROUNDS; backend dnsmasq $(/usr/sbin/dnsmasq --version | awk 'NR==1 {print $3}'); dnsdist $(dnsdist --version | awk 'NR==1 {print $2}'); nginx $(nginx -v 2>&1 | sed 's|.*/||')"
echo
echo "| path | queries/s | p50 ms | p99 ms | lost | proxy CPU µs/query | load avg at start |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for t in "${TARGETS[@]}"; do
  awk -F'|' -v t="$t" '$1 == t' "$RESULTS" | sort -t'|' -k2 -n -r | head -1 |
    awk -F'|' '{printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7}'
done
