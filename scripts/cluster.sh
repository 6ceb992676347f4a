#!/usr/bin/env bash
# A throwaway real Ceph (1 mon + N memstore OSDs, no mgr) and a single etcd member, for tests.
# Everything lives in one directory and on ports picked at start, so several clusters can run
# side by side (nextest runs test processes in parallel). Data is kept in RAM (memstore) and is
# thrown away by `stop`. Run `scripts/cluster.sh --help` for the commands; scripts/deps.sh base
# installs the packages. Settings follow the measured recipe for Debian 12 (Ceph 16, etcd 3.4).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/cluster.sh COMMAND DIR [ARGS]

  start DIR [--osds N]   Start a mon, N memstore OSDs (1..3, default 1) and one etcd member,
                         with cephx on, all listening on 127.0.0.1 on free ports. Creates the
                         pool `parallax` (pg_num 8, size N, min_size 2 when N >= 3 else 1,
                         application `rados`) and returns once a rados put/get on it and etcd's
                         /health both work. Each OSD holds at most CLUSTER_OSD_BYTES (default
                         512 MiB, in RAM). Gives up after CLUSTER_TIMEOUT seconds (default 30),
                         killing what it started (logs stay in DIR/log).
  stop DIR               SIGKILL every daemon listed in DIR/pids, wait until they are gone and
                         empty DIR. Safe to repeat, and on a DIR that never started.
  kill-osd DIR ID        SIGKILL OSD ID, for failure tests. Its peers get refused connections
                         and the mon marks it down within a second; with a single OSD nobody
                         notices, and I/O hangs.
  stop-etcd DIR          SIGKILL etcd.
  start-etcd DIR         Start etcd again on the same ports and data directory; waits for health.

Files in DIR:
  ceph.conf   configuration for clients (rados -c, librados rados_conf_read_file)
  keyring     client.admin's key (ceph.conf points at it)
  pids        one "name pid" line per running daemon (mon.a, osd.ID, etcd)
  env         KEY=value lines, no quoting needed: CEPH_CONF, CEPH_KEYRING, PX_POOL, PX_OSD_IDS
              (comma-separated), PX_OSD_COUNT, PX_MON_ADDR, ETCD_ENDPOINTS, ETCD_DIR,
              ETCD_DATA_DIR, ETCD_CLIENT_PORT, ETCD_PEER_PORT
  log/        daemon logs

Example: scripts/cluster.sh start /tmp/c --osds 3 && . /tmp/c/env && rados -c "$CEPH_CONF" -p "$PX_POOL" ls
EOF
}

die() { echo "cluster.sh: $*" >&2; exit 1; }

# Seconds (with fractions) since $t0.
t0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) - $t0" | bc; }
# Notes a step of `start` with its time in DIR/log/start.log (what to read when it is slow).
step() { printf '%6.2f %s\n' "$(elapsed)" "$*" >>"$d/log/start.log"; }

# Seconds left before the start deadline, at least 1 (for `timeout`).
remaining() {
  local r
  r=$(echo "$deadline - $(date +%s.%N)" | bc)
  if [ "$(echo "$r < 1" | bc)" = 1 ]; then echo 1; else echo "$r"; fi
}
past_deadline() { [ "$(echo "$(date +%s.%N) > $deadline" | bc)" = 1 ]; }

# The Ceph CLIs are Python (ceph) or C++ (rados); both hang without a deadline when a daemon
# is missing, so every call goes through `timeout` with the time the start has left.
ceph_t() { timeout "$(remaining)" ceph --connect-timeout 5 "$@"; }

# Picks COUNT distinct free TCP ports on 127.0.0.1 below the kernel's ephemeral range (so an
# outgoing connection cannot take one before the daemon binds it) and away from Ceph's OSD
# range 6800-7300. Called under a lock (see `start`), so parallel starts do not pick the same.
free_ports() {
  local py=python3
  [ -x /usr/bin/python3 ] && py=/usr/bin/python3   # skips pyenv's slow shim if there is one
  "$py" - "$1" <<'PY'
import random, socket, sys
held = []
while len(held) < int(sys.argv[1]):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(20000, 32000)))
    except OSError:
        s.close()
        continue
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

# Waits until something listens on 127.0.0.1:PORT, or the deadline passes.
wait_listen() {
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    past_deadline && return 1
    sleep 0.02
  done
}

# Process id of daemon NAME in DIR/pids (empty if not listed).
pid_of() { awk -v n="$2" '$1 == n { print $2 }' "$1/pids" 2>/dev/null; }

# SIGKILLs the pids given and waits until they are gone (zombies of our own children count
# as gone: `kill -0` still succeeds on them, so look at /proc state instead).
kill_wait() {
  local p
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "$@"; do
    while [ -e "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; do sleep 0.02; done
  done
}

# Daemons run in the foreground (-f) as our background jobs, with their stdio on files under
# DIR/log: a caller that reads our output (Rust's Command::output) must see EOF when we exit.
# They stay in the caller's process group, so a test runner that kills a timed-out test's
# group takes them along; -c DIR/ceph.conf on their command lines tells clusters apart in ps.

# Starts etcd in DIR from the ports and data directory in DIR/env and records its pid (on a
# restart it finds its data there and ignores the --initial-* flags). Heartbeat 10 ms /
# election 100 ms make a one-member cluster ready in ~0.1 s (the defaults take about a second).
launch_etcd() {
  local d=$1 cp pp
  cp=$(env_get "$d" ETCD_CLIENT_PORT)
  pp=$(env_get "$d" ETCD_PEER_PORT)
  etcd --name px --data-dir "$d/etcd/data" \
    --listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
    --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
    --initial-cluster "px=http://127.0.0.1:$pp" --initial-cluster-state new \
    --heartbeat-interval 10 --election-timeout 100 </dev/null >>"$d/log/etcd.log" 2>&1 9>&- &
  set_pid "$d" etcd $!
}

# Waits until etcd of DIR answers /health with true (fails early if it died).
wait_etcd() {
  local d=$1 cp pid
  cp=$(env_get "$d" ETCD_CLIENT_PORT)
  pid=$(pid_of "$d" etcd)
  until curl -sf --max-time 1 "http://127.0.0.1:$cp/health" 2>/dev/null | grep -q '"health":"true"'; do
    kill -0 "$pid" 2>/dev/null || return 1
    past_deadline && return 1
    sleep 0.02
  done
}

# Replaces (or adds) daemon NAME's line in DIR/pids.
set_pid() {
  local d=$1 name=$2 pid=$3
  { grep -v "^$name " "$d/pids" 2>/dev/null || true; echo "$name $pid"; } >"$d/pids.new"
  mv "$d/pids.new" "$d/pids"
}

env_get() { sed -n "s/^$2=//p" "$1/env"; }

# Kills every daemon of DIR. Leaves the files.
kill_all() {
  local d=$1
  [ -f "$d/pids" ] || return 0
  disown -a 2>/dev/null || true   # no "Killed" job notices from bash for our own daemons
  # shellcheck disable=SC2046
  kill_wait $(awk '{ print $2 }' "$d/pids")
  rm -f "$d/pids"
}

cmd_start() {
  local d=$1 osds=$2
  [[ $osds =~ ^[1-3]$ ]] || die "--osds must be 1, 2 or 3 (got $osds)"
  for b in ceph-mon ceph-osd ceph ceph-authtool monmaptool rados etcd curl uuidgen bc flock; do
    command -v "$b" >/dev/null || die "$b is missing: run scripts/deps.sh"
  done
  mkdir -p "$d"
  d=$(cd "$d" && pwd)
  [ -e "$d/pids" ] && die "$d already holds a cluster (scripts/cluster.sh stop $d first)"
  deadline=$(echo "$t0 + ${CLUSTER_TIMEOUT:-30}" | bc)
  # From here on, any failure kills what was started and leaves only the logs.
  started=0
  trap 'rc=$?; if [ $started = 0 ]; then kill_all "$d"; find "$d" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +; fi; exit $rc' EXIT
  mkdir -p "$d"/{mon-a,run,log,etcd}

  local fsid min_size=1 i
  fsid=$(uuidgen)
  [ "$osds" -ge 3 ] && min_size=2

  # The ports are picked and bound by the daemons under one machine-wide lock, so two starts
  # running at once cannot pick the same port before either binds it.
  exec 9>"${TMPDIR:-/tmp}/parallax-cluster-ports.lock"
  timeout "$(remaining)" flock 9 || die "timed out waiting for the port lock"
  local mon2 mon1 etcd_c etcd_p
  read -r mon2 mon1 etcd_c etcd_p <<<"$(free_ports 4)"
  local mon_addr="[v2:127.0.0.1:$mon2,v1:127.0.0.1:$mon1]"

  {
    echo "CEPH_CONF=$d/ceph.conf"
    echo "CEPH_KEYRING=$d/keyring"
    echo "PX_POOL=parallax"
    echo "PX_OSD_IDS=$(seq -s, 0 $((osds - 1)))"
    echo "PX_OSD_COUNT=$osds"
    echo "PX_MON_ADDR=$mon_addr"
    echo "ETCD_ENDPOINTS=http://127.0.0.1:$etcd_c"
    echo "ETCD_DIR=$d/etcd"
    echo "ETCD_DATA_DIR=$d/etcd/data"
    echo "ETCD_CLIENT_PORT=$etcd_c"
    echo "ETCD_PEER_PORT=$etcd_p"
  } >"$d/env"

  # etcd is independent of Ceph: start it first and check on it at the end.
  launch_etcd "$d"
  step "etcd launched"

  # Daemon-only settings (logs, pid files, admin sockets) go in [mon]/[osd] so that clients
  # (rados, librados in the tests) do not write logs or fight over one admin socket.
  cat >"$d/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = $mon_addr
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $d/keyring
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
# The default 1 s makes every mon write (pool create, osd new) take a second.
paxos propose interval = 0.05
paxos min wait = 0.01
# No mgr: without this the cluster turns HEALTH_WARN "no active mgr" after a few minutes.
mon mgr mkfs grace = 86400
# Build machines often have little free disk; the mon only holds a few maps.
mon data avail warn = 2
# The pool is created with these (and so needs no extra mon round trips).
osd pool default size = $osds
osd pool default min size = $min_size
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# All OSDs sit on one host: replicate across OSDs, not hosts.
osd crush chooseleaf type = 0
mon data = $d/mon-\$id
osd data = $d/osd-\$id
osd objectstore = memstore
# Memstore is RAM: cap each OSD's store (CLUSTER_OSD_BYTES, default 512 MiB).
memstore device bytes = ${CLUSTER_OSD_BYTES:-536870912}
run dir = $d/run

[mon]
log file = $d/log/\$name.log
pid file = $d/run/\$name.pid
admin socket = $d/run/\$name.asok

[osd]
keyring = \$osd_data/keyring
# Otherwise the OSD binds 0.0.0.0. Its ports come from 6800-7300, first free wins.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
log file = $d/log/\$name.log
pid file = $d/run/\$name.pid
admin socket = $d/run/\$name.asok
CONF
  export CEPH_CONF=$d/ceph.conf

  # Keys: DIR/keyring holds only client.admin's (what clients read). The mon's keyring adds
  # the mon's own key and one per OSD; `ceph-mon --mkfs` loads all of them into the auth
  # database, so the OSDs need no `ceph auth` calls later.
  ceph-authtool --create-keyring "$d/keyring" --gen-key -n client.admin --cap mon 'allow *' \
    --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool --create-keyring "$d/run/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$d/run/mon.keyring" --import-keyring "$d/keyring" >/dev/null
  local uuids=()
  for ((i = 0; i < osds; i++)); do
    mkdir -p "$d/osd-$i"
    uuids+=("$(uuidgen)")
    ceph-authtool --create-keyring "$d/osd-$i/keyring" --gen-key -n "osd.$i" \
      --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    ceph-authtool "$d/run/mon.keyring" --import-keyring "$d/osd-$i/keyring" >/dev/null
  done
  monmaptool --create --fsid "$fsid" --addv a "$mon_addr" "$d/run/monmap" >/dev/null
  ceph-mon -c "$d/ceph.conf" -i a --mkfs --monmap "$d/run/monmap" --keyring "$d/run/mon.keyring" \
    >>"$d/log/mon.a.mkfs" 2>&1 || die "ceph-mon --mkfs failed (see $d/log/mon.a.mkfs)"
  step "keys + mon mkfs done"

  ceph-mon -c "$d/ceph.conf" -i a -f </dev/null >>"$d/log/mon.a.stdout" 2>&1 9>&- &
  set_pid "$d" mon.a $!
  wait_listen "$mon2" || die "ceph-mon did not listen on 127.0.0.1:$mon2 in time (see $d/log/mon.a.log)"
  wait_listen "$etcd_c" || die "etcd did not listen on 127.0.0.1:$etcd_c in time (see $d/log/etcd.log)"
  flock -u 9
  exec 9>&-
  step "mon + etcd listening"

  # Memstore mkfs needs no mon; do it while the mon settles.
  local mkfs=()
  for ((i = 0; i < osds; i++)); do
    ceph-osd -c "$d/ceph.conf" -i "$i" --mkfs --osd-uuid "${uuids[$i]}" >>"$d/log/osd.$i.mkfs" 2>&1 &
    mkfs+=($!)
  done
  for ((i = 0; i < osds; i++)); do
    wait "${mkfs[$i]}" || die "ceph-osd --mkfs of osd.$i failed (see $d/log/osd.$i.mkfs)"
  done
  step "osd mkfs done"

  # One `ceph` session (the CLI is Python, ~0.3 s to start) runs every mon command: register
  # the OSDs under their ids (their keys are already in), create and tag the pool.
  {
    for ((i = 0; i < osds; i++)); do echo "osd new ${uuids[$i]} $i"; done
    echo "osd pool create parallax 8 8 replicated"
    echo "osd pool application enable parallax rados"
  } | ceph_t >"$d/log/setup.out" 2>&1 || die "ceph setup commands failed (see $d/log/setup.out)"
  grep -q "pool 'parallax' created" "$d/log/setup.out" ||
    die "pool create failed: $(tr '\n' ' ' <"$d/log/setup.out")"
  step "osds registered, pool created"

  for ((i = 0; i < osds; i++)); do
    ceph-osd -c "$d/ceph.conf" -i "$i" -f </dev/null >>"$d/log/osd.$i.stdout" 2>&1 &
    set_pid "$d" "osd.$i" $!
  done

  # The probe blocks until the OSDs have booted and the pool's PGs are active. A client whose
  # op maps to no OSD only asks the mon for a newer map on its tick (objecter tick interval,
  # 5 s by default), and the OSDs are still booting here: tick often for the probe.
  echo "parallax probe" >"$d/run/probe"
  timeout "$(remaining)" rados --objecter-tick-interval 0.05 -p parallax put probe "$d/run/probe" \
    2>>"$d/log/probe.err" ||
    die "no rados put on pool parallax within ${CLUSTER_TIMEOUT:-30} s (see $d/log/)"
  step "rados put ok"
  local got
  got=$(timeout "$(remaining)" rados -p parallax get probe - 2>>"$d/log/probe.err") || true
  [ "$got" = "parallax probe" ] || die "rados get of the probe object failed (see $d/log/probe.err)"
  wait_etcd "$d" || die "etcd not healthy within ${CLUSTER_TIMEOUT:-30} s (see $d/log/etcd.log)"

  started=1
  trap - EXIT
  printf 'cluster.sh: started mon + %d OSD(s) + etcd in %s in %.2f s (%s, etcd %s)\n' \
    "$osds" "$d" "$(elapsed)" "$mon_addr" "http://127.0.0.1:$etcd_c"
}

cmd_stop() {
  local d=$1
  [ -d "$d" ] || return 0
  kill_all "$d"
  find "$d" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
}

cmd_kill_osd() {
  local d=$1 id=$2 pid
  pid=$(pid_of "$d" "osd.$id")
  [ -n "$pid" ] || die "no osd.$id in $d/pids"
  kill_wait "$pid"
  sed -i "/^osd\.$id /d" "$d/pids"
}

cmd_stop_etcd() {
  local d=$1 pid
  pid=$(pid_of "$d" etcd)
  [ -n "$pid" ] || die "no etcd in $d/pids"
  kill_wait "$pid"
  sed -i '/^etcd /d' "$d/pids"
}

cmd_start_etcd() {
  local d=$1 pid
  [ -f "$d/env" ] || die "$d/env is missing: start the cluster first"
  pid=$(pid_of "$d" etcd)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && die "etcd is already running in $d (pid $pid)"
  deadline=$(echo "$t0 + ${CLUSTER_TIMEOUT:-30}" | bc)
  launch_etcd "$d"
  wait_etcd "$d" || die "etcd not healthy within ${CLUSTER_TIMEOUT:-30} s (see $d/log/etcd.log)"
  printf 'cluster.sh: etcd restarted in %.2f s\n' "$(elapsed)"
}

case "${1:-}" in
  -h | --help | help) usage ;;
  start)
    [ $# -ge 2 ] || die "usage: start DIR [--osds N]"
    dir=$2 osds=1
    shift 2
    while [ $# -gt 0 ]; do
      case "$1" in
        --osds) [ $# -ge 2 ] || die "--osds needs a number"; osds=$2; shift 2 ;;
        --osds=*) osds=${1#--osds=}; shift ;;
        *) die "start: unknown argument $1" ;;
      esac
    done
    cmd_start "$dir" "$osds"
    ;;
  stop) [ $# -eq 2 ] || die "usage: stop DIR"; cmd_stop "$2" ;;
  kill-osd) [ $# -eq 3 ] || die "usage: kill-osd DIR ID"; cmd_kill_osd "$2" "$3" ;;
  stop-etcd) [ $# -eq 2 ] || die "usage: stop-etcd DIR"; cmd_stop_etcd "$2" ;;
  start-etcd) [ $# -eq 2 ] || die "usage: start-etcd DIR"; cmd_start_etcd "$2" ;;
  *) usage >&2; exit 2 ;;
esac
