# Helpers for Xen rig scenarios (busybox sh in the PV dom0; sourced by dom0/main.sh before each
# scenario). The host share is /host: scenarios, this library and results live there.
#
# Storage backends, chosen by RIG_BACKEND (tests/xen-rig/run.sh --backend):
#   parallax  the product (default): `parallax serve` with Xen enabled in dom0 (gntdev/evtchn),
#             a fresh store on the scratch disk per scenario, xen-configs/block-parallax as the
#             hotplug script; VDIs, snapshots and forks are Parallax's own (rig_px_* below).
#   blkback   a COMPARISON: the kernel's xen-blkback serves raw image files on loop devices
#             (hotplug script dom0/block-rig); snapshots and forks are file copies. It checks
#             the rig (Xen, grant tables, event channels, xenstore, xl, blkfront) and the
#             scenarios' checks without Parallax.
# Every storage operation goes through these, so scenarios do not care which backend runs:
#   rig_backend_start · rig_backend_stop · rig_vdi_new NAME FILE · rig_vdi_snapshot NAME SNAP
#   rig_vdi_fork NAME@SNAP NEW · rig_vdi_export NAME[@SNAP] FILE · rig_disk NAME VDEV [ro]
#   rig_snapshot_live NAME SNAP (while a guest writes to NAME)
# Guests: rig_guest NAME SCRIPT [CFG-LINE...] · rig_guest_start NAME · rig_guest_wait NAME [S]
#   rig_guest_run NAME [S] · rig_domid NAME · rig_guest_set/get NAME KEY [VALUE]
#   rig_guest_wait_key NAME KEY VALUE [S] · rig_vbd_wait NAME DEVID STATE [S] · rig_xs_dump PATH FILE
# Results: $RIG_RESULTS (this scenario's directory under /host/results); rig_note FILE copies a
# file into $RIG_RESULTS/notes/, which `run.sh --save-notes` copies to tests/xen-rig/notes/.

RIG_BACKEND=${RIG_BACKEND:-parallax}
RIG_TMP=/tmp/rig
RIG_STORE=/scratch/rig-store
RIG_GUEST_MEM=${RIG_GUEST_MEM:-160}
RIG_GUEST_KERNEL=${RIG_GUEST_KERNEL:-/scratch/boot/domU-vmlinux}
mkdir -p "$RIG_TMP" "$RIG_STORE"

say() { echo "rig: $*"; }
fail() { echo "RIG-FAIL: $*"; exit 1; }
# must CMD...: runs CMD, fails the scenario (with CMD's output) if it fails.
must() {
  _out=$("$@" 2>&1) || { echo "$_out"; fail "$*"; }
  [ -z "$_out" ] || echo "$_out"
}
# uptime_cs / now: dom0 uptime in centiseconds / whole seconds, without starting a process
# (every process start costs real time in the emulated dom0).
uptime_cs() { read -r _up _ </proc/uptime; _s=${_up%.*}; _f=${_up#*.}; echo $(( _s * 100 + 1${_f} - 100 )); }
now() { read -r _up _ </proc/uptime; echo "${_up%.*}"; }

. /host/rig/pattern.sh

# ---------------------------------------------------------------------------------------------
# storage

rig_backend_start() {
  case "$RIG_BACKEND" in
    blkback) _bb_start ;;
    parallax) rig_px_start ;;
    *) fail "unknown RIG_BACKEND $RIG_BACKEND" ;;
  esac
}
rig_backend_stop() { [ "$RIG_BACKEND" != parallax ] || rig_px_stop; }
# rig_vdi_new NAME FILE: a VDI whose content is FILE (a raw image).
rig_vdi_new() { "_${RIG_BACKEND}_vdi_new" "$@"; }
rig_vdi_snapshot() { "_${RIG_BACKEND}_vdi_snapshot" "$@"; }
rig_vdi_fork() { "_${RIG_BACKEND}_vdi_fork" "$@"; }
# rig_vdi_export NAME[@SNAP] FILE: the VDI's current content as a raw file, for checking.
rig_vdi_export() { "_${RIG_BACKEND}_vdi_export" "$@"; }
# rig_snapshot_live NAME SNAP: snapshot NAME while a guest is writing to it.
rig_snapshot_live() { "_${RIG_BACKEND}_snapshot_live" "$@"; }
# rig_disk NAME VDEV [ro]: the xl disk spec that gives a guest VDI NAME as VDEV.
rig_disk() { "_${RIG_BACKEND}_disk" "$@"; }

# --- blkback stand-in: $RIG_STORE/NAME.img -----------------------------------------------------
_bb_start() {
  must modprobe -a loop xen-blkback
  cp /host/rig/block-rig /etc/xen/scripts/block-rig && chmod 0755 /etc/xen/scripts/block-rig
}
_blkback_vdi_new() { must cp "$2" "$RIG_STORE/$1.img"; }
_blkback_vdi_snapshot() { must cp "$RIG_STORE/$1.img" "$RIG_STORE/$1@$2.img"; }
_blkback_vdi_fork() { must cp "$RIG_STORE/$1.img" "$RIG_STORE/$2.img"; }
_blkback_vdi_export() { must cp "$RIG_STORE/$1.img" "$2"; }
# A copy of the file under the loop device while the guest writes. Each 4 KiB block of the copy is
# some version of that block only as far as the page cache copies pages whole, and nothing orders
# the copy against in-flight writes: good enough to exercise the scenario, not a real snapshot.
_blkback_snapshot_live() { _blkback_vdi_snapshot "$@"; }
_blkback_disk() {
  echo "format=raw, vdev=$2, access=${3:-rw}, script=block-rig, target=$RIG_STORE/$1.img"
}

# --- parallax ---------------------------------------------------------------------------------
# dom0 set up as xen-configs/README.md tells an admin to; the disk target is the VDI name, and
# the CLI reaches the running daemon through its control socket (snapshots of a served VDI too).
RIG_PX_BIN=/host/bin/parallax
rig_px() { LD_LIBRARY_PATH=/host/bin/lib "$RIG_PX_BIN" --store "$RIG_STORE/store" "$@"; }
rig_px_start() {
  [ -x "$RIG_PX_BIN" ] || fail "no $RIG_PX_BIN (run.sh copies target/release/parallax there)"
  [ -f /host/xen-configs/block-parallax ] || fail "no xen-configs/block-parallax"
  # As xen-configs/README.md says for dom0: the user-space grant and event-channel devices, no
  # kernel vbd backend, the hotplug script in /etc/xen/scripts.
  must modprobe -a xen-gntdev xen-evtchn
  lsmod | grep -q '^xen_blkback' && fail "xen-blkback is loaded: it would claim backend/vbd too"
  cp /host/xen-configs/block-parallax /etc/xen/scripts/ && chmod 0755 /etc/xen/scripts/block-parallax
  # A store of its own for each scenario (they reuse VDI names).
  rm -f "$RIG_STORE/store"
  must rig_px init --size 2G
  # No NBD (dom0 has no network); the CLI reaches the daemon through its control socket.
  cat >"$RIG_TMP/serve.ron" <<EOF
(
    store: "$RIG_STORE/store",
    nbd: (enabled: false),
    xen: (enabled: true),
)
EOF
  LD_LIBRARY_PATH=/host/bin/lib RUST_LOG=${RUST_LOG:-info} \
    "$RIG_PX_BIN" serve --config "$RIG_TMP/serve.ron" >>"$RIG_RESULTS/serve.log" 2>&1 &
  echo $! >/run/rig-serve.pid
  # Up once it says it serves vbds (it watches backend/vbd by then), or dead.
  _n=600
  until grep -q 'xen: serving vbds' "$RIG_RESULTS/serve.log" 2>/dev/null; do
    _px_running "$(cat /run/rig-serve.pid)" || { cat "$RIG_RESULTS/serve.log"; fail "parallax serve died"; }
    _n=$((_n - 1)); [ $_n -gt 0 ] || { cat "$RIG_RESULTS/serve.log"; fail "parallax serve did not come up in 60s"; }
    sleep 0.1
  done
  say "parallax serve is up (pid $(cat /run/rig-serve.pid))"
}
# _px_running PID: the process exists and is not a zombie (its parent, the scenario's shell, is
# gone, and /init reaps orphans only when it gets to it).
_px_running() { read -r _ _ _st _ 2>/dev/null <"/proc/$1/stat" && [ "$_st" != Z ]; }
# rig_px_stop: SIGTERM, as systemd stops it; fails unless serve stops within 30 s saying it
# closed the store cleanly and the store then checks clean.
rig_px_stop() {
  [ -f /run/rig-serve.pid ] || return 0
  _pid=$(cat /run/rig-serve.pid)
  rm -f /run/rig-serve.pid
  _px_running "$_pid" || { tail -n 5 "$RIG_RESULTS/serve.log"; fail "parallax serve (pid $_pid) died before it was stopped"; }
  kill -TERM "$_pid"
  _n=300
  while _px_running "$_pid"; do
    _n=$((_n - 1))
    [ $_n -gt 0 ] || { kill -KILL "$_pid"; fail "parallax serve did not stop within 30s of SIGTERM"; }
    sleep 0.1
  done
  grep -q 'store closed cleanly' "$RIG_RESULTS/serve.log" ||
    { tail -n 5 "$RIG_RESULTS/serve.log"; fail "parallax serve did not close the store cleanly"; }
  must rig_px check
  say "parallax serve stopped; the store checks clean"
}
_parallax_vdi_new() { must rig_px vdi import "$1" "$2"; }
_parallax_vdi_snapshot() { must rig_px vdi snapshot "$1" "$2"; }
_parallax_vdi_fork() { must rig_px vdi fork "$1" "$2"; }
# --force: like cp, overwrite the previous check file.
_parallax_vdi_export() { must rig_px vdi export --force "$1" "$2"; }
_parallax_snapshot_live() { _parallax_vdi_snapshot "$@"; }
_parallax_disk() {
  echo "format=raw, vdev=$2, access=${3:-rw}, script=block-parallax, target=$1"
}

# ---------------------------------------------------------------------------------------------
# guests

# rig_guest NAME SCRIPT [CFG-LINE...]: prepares guest NAME (an xl config and an initramfs whose
# /guest.sh is SCRIPT, a file). CFG-LINEs are extra xl config lines, e.g. "vcpus = 2",
# "disk = [ '...' ]", "extra = 'xen_blkfront.max_queues=2'" (appended to the kernel command line).
rig_guest() {
  _name=$1 _script=$2
  shift 2
  _d=$RIG_TMP/guest-$_name
  rm -rf "$_d"; mkdir -p "$_d/root"
  cat /host/rig/guest.sh /host/rig/pattern.sh >"$_d/root/guest-lib.sh"
  cp "$_script" "$_d/root/guest.sh"
  (cd "$_d/root" && printf '%s\n' guest-lib.sh guest.sh | cpio -o -H newc 2>/dev/null) >"$_d/extra.cpio" ||
    fail "guest $_name: cpio"
  cat /scratch/boot/domU.cpio "$_d/extra.cpio" >"$_d/initrd"
  _extra=""
  {
    echo "name = \"$_name\""
    echo "type = \"pv\""
    echo "kernel = \"$RIG_GUEST_KERNEL\""
    echo "ramdisk = \"$_d/initrd\""
    case " $* " in *" memory ="*|*" memory="*) ;; *) echo "memory = $RIG_GUEST_MEM" ;; esac
    echo "on_poweroff = \"destroy\""
    echo "on_crash = \"destroy\""
    for _l in "$@"; do
      case "$_l" in
        extra*=*) _extra=$(echo "${_l#*=}" | sed "s/^ *['\"]//; s/['\"] *\$//") ;;
        *) echo "$_l" ;;
      esac
    done
    echo "extra = \"console=hvc0 loglevel=4 $_extra\""
  } >"$_d/$_name.cfg"
}

# rig_guest_start NAME: xl create (output in $RIG_RESULTS/xl-create-NAME.log); fails the scenario
# if it fails. rig_guest_create NAME just returns xl's status.
rig_guest_create() {
  xl create "$RIG_TMP/guest-$1/$1.cfg" >"$RIG_RESULTS/xl-create-$1.log" 2>&1
  _rc=$?
  sed "s/^/xl create $1: /" "$RIG_RESULTS/xl-create-$1.log"
  return $_rc
}
rig_guest_start() {
  _t0=$(uptime_cs)
  rm -f "$RIG_TMP/guest-$1/domid"
  rig_guest_create "$1" || fail "xl create $1 failed"
  _id=$(xl domid "$1") || fail "no domain id for $1"
  echo "$_id" >"$RIG_TMP/guest-$1/domid"
  say "guest $1 is domain $(rig_domid "$1") (xl create took $(( ($(uptime_cs) - _t0) / 100 )).$(( ($(uptime_cs) - _t0) % 100 / 10 ))s)"
}
# rig_domid NAME: the domain id of guest NAME: remembered by rig_guest_start, else looked up in
# xenstore (each `xl` run costs ~0.5 s in the emulated dom0, too slow to poll with).
rig_domid() {
  if [ -f "$RIG_TMP/guest-$1/domid" ]; then
    read -r _id <"$RIG_TMP/guest-$1/domid"
    echo "$_id"
    return 0
  fi
  for _id in $(xenstore-list /local/domain 2>/dev/null); do
    [ "$(xenstore-read "/local/domain/$_id/name" 2>/dev/null)" = "$1" ] && { echo "$_id"; return 0; }
  done
  return 1
}
# rig_guest_alive NAME: the domain exists (xenstore's view, confirmed by xl when it says no).
rig_guest_alive() {
  _id=$(rig_domid "$1") || return 1
  [ "$(xenstore-read "/local/domain/$_id/name" 2>/dev/null)" = "$1" ] && return 0
  xl list "$_id" >/dev/null 2>&1
}

# rig_guest_wait NAME [SECONDS]: waits for guest NAME to power off (default 120 s; then destroys
# it and fails), saves its console log as $RIG_RESULTS/guest-NAME.log and fails unless the guest
# script succeeded.
rig_guest_wait() {
  _end=$(( $(now) + ${2:-120} ))
  while rig_guest_alive "$1"; do
    if [ "$(now)" -ge $_end ]; then
      xl destroy "$1"
      _rig_guest_log "$1"
      fail "guest $1 still running after ${2:-120}s"
    fi
    sleep 0.1
  done
  _rig_guest_log "$1"
  grep -q 'RIG-GUEST-DONE rc=0' "$RIG_RESULTS/guest-$1.log" || fail "guest $1 did not succeed"
  say "guest $1 done"
}
_rig_guest_log() {
  _f=/var/log/xen/console/guest-$1.log
  # xenconsoled may still be draining the ring of a guest that just went away.
  _n=20
  while [ $_n -gt 0 ] && ! grep -q 'RIG-GUEST-DONE' "$_f" 2>/dev/null; do _n=$((_n - 1)); sleep 0.1; done
  tr -d '\r' <"$_f" >"$RIG_RESULTS/guest-$1.log" 2>/dev/null
  sed "s/^/[$1] /" "$RIG_RESULTS/guest-$1.log"
  rm -f "$_f"
}
# rig_guest_run NAME [SECONDS]: start and wait.
rig_guest_run() { rig_guest_start "$1" && rig_guest_wait "$@"; }

# rig_guest_set NAME KEY VALUE / rig_guest_get NAME KEY: the guest's data/rig/KEY in xenstore.
rig_guest_set() { must xenstore-write "/local/domain/$(rig_domid "$1")/data/rig/$2" "$3"; }
rig_guest_get() { xenstore-read "/local/domain/$(rig_domid "$1")/data/rig/$2" 2>/dev/null; }
# rig_guest_wait_key NAME KEY VALUE [SECONDS]: waits until the guest sets rig/KEY to VALUE.
rig_guest_wait_key() {
  _end=$(( $(now) + ${4:-60} ))
  while [ "$(rig_guest_get "$1" "$2")" != "$3" ]; do
    rig_guest_alive "$1" || { _rig_guest_log "$1"; fail "guest $1 died before rig/$2=$3"; }
    [ "$(now)" -lt $_end ] || fail "timeout waiting for guest $1 rig/$2=$3"
    sleep 0.1
  done
}

# vbd paths of guest NAME's device DEVID (51712 = xvda, 51728 = xvdb, ...).
rig_fe_path() { echo "/local/domain/$(rig_domid "$1")/device/vbd/$2"; }
rig_be_path() { xenstore-read "$(rig_fe_path "$1" "$2")/backend" 2>/dev/null; }
# rig_vbd_wait NAME DEVID STATE [SECONDS]: waits until both ends of the vbd are in STATE (4 =
# Connected).
rig_vbd_wait() {
  _end=$(( $(now) + ${4:-30} ))
  while :; do
    _fe=$(xenstore-read "$(rig_fe_path "$1" "$2")/state" 2>/dev/null || true)
    _be=$(xenstore-read "$(rig_be_path "$1" "$2")/state" 2>/dev/null || true)
    [ "$_fe" = "$3" ] && [ "$_be" = "$3" ] && return 0
    [ "$(now)" -lt $_end ] || fail "vbd $2 of $1: frontend state '$_fe', backend '$_be', wanted $3"
    sleep 0.1
  done
}

# rig_xs_dump PATH FILE: `xenstore-ls -fp PATH` (full paths, permissions) into $RIG_RESULTS/FILE.
rig_xs_dump() {
  xenstore-ls -fp "$1" >"$RIG_RESULTS/$2" 2>&1 || echo "(xenstore-ls $1 failed)" >>"$RIG_RESULTS/$2"
}
# rig_note FILE...: keep files (from $RIG_RESULTS) as ground-truth notes.
rig_note() {
  mkdir -p "$RIG_RESULTS/notes"
  for _f in "$@"; do cp "$RIG_RESULTS/$_f" "$RIG_RESULTS/notes/"; done
}

# rig_cleanup: destroys every guest and keeps the console logs of those that did not finish
# normally (main.sh runs it after each scenario).
rig_cleanup() {
  for _d in $(xl list 2>/dev/null | awk 'NR > 1 && $2 != 0 {print $2}'); do
    say "cleanup: destroying leftover domain $_d"
    xl destroy "$_d" 2>&1 || true
  done
  for _f in /var/log/xen/console/guest-*.log; do
    [ -f "$_f" ] || continue
    _g=${_f##*/guest-}; _g=${_g%.log}
    _rig_guest_log "$_g"
  done
}
