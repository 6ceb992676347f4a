# Helpers for Xen rig scenarios (busybox sh in the PV dom0; sourced by dom0/main.sh before each
# scenario). The host share is /host: scenarios, this library and results live there.
#
# Storage backends, chosen by RIG_BACKEND (tests/xen-rig/run.sh --backend):
#   parallax  the product (default): `parallax serve` with Xen enabled in dom0 (gntdev/evtchn),
#             a fresh store on the scratch disk per scenario, xen-configs/block-parallax as the
#             hotplug script; VDIs, snapshots and forks are Parallax's own (rig_px_* below).
#   storage   the product in a storage (driver) domain: `parallax serve` runs in its own PV
#             domain ("storage", driver_domain = 1, images/xen/storage-init.sh) with its store
#             on a disk dom0 gives it (blkback on a file of the scratch disk) and `xl devd`
#             running block-parallax there; guests name it (backend=storage). dom0 manages
#             VDIs with `parallax --connect` over a point-to-point vif and TLS-PSK (rig_sd_*).
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
    storage) rig_sd_start ;;
    *) fail "unknown RIG_BACKEND $RIG_BACKEND" ;;
  esac
}
rig_backend_stop() {
  case "$RIG_BACKEND" in
    parallax) rig_px_stop ;;
    storage) rig_sd_stop ;;
  esac
}
# rig_serve_log: the file that has the daemon's log (dom0's serve.log, or the storage domain's
# console).
rig_serve_log() {
  case "$RIG_BACKEND" in
    storage) echo "/var/log/xen/console/guest-$RIG_SD_NAME.log" ;;
    *) echo "$RIG_RESULTS/serve.log" ;;
  esac
}
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

# --- storage domain ---------------------------------------------------------------------------
# The daemon in a PV driver domain. dom0 keeps the domain's store as a file on the scratch disk
# (its xvda, through xen-blkback and a loop device: under QEMU there is no PCI device to pass
# through) and reaches the daemon's control listener over a vif: 10.99.0.1 (dom0) <-> 10.99.0.2.
RIG_SD_NAME=storage
RIG_SD_IP=10.99.0.2
RIG_SD_STORE=$RIG_STORE/sd-store
RIG_SD_KEYS=$RIG_TMP/sd-keys.psk
RIG_SD_MEM=${RIG_SD_MEM:-192}
rig_px_local() { LD_LIBRARY_PATH=/host/bin/lib "$RIG_PX_BIN" "$@"; }
# rig_sd_px ARGS...: the CLI in dom0, run against the daemon in the storage domain.
rig_sd_px() {
  rig_px_local --connect "$RIG_SD_IP" --connect-psk-file "$RIG_SD_KEYS" --connect-username dom0 "$@"
}
rig_sd_domid() { xl domid "$RIG_SD_NAME" 2>/dev/null; }
# rig_sd_start [keep]: a fresh store (unless "keep": the one there is) and the storage domain
# booted on it, serving; fails the scenario otherwise.
rig_sd_start() {
  [ -x "$RIG_PX_BIN" ] || fail "no $RIG_PX_BIN (run.sh copies target/release/parallax there)"
  must modprobe -a xen-blkback xen-netback loop
  cp /host/rig/block-rig /host/rig/vif-rig /etc/xen/scripts/ &&
    chmod 0755 /etc/xen/scripts/block-rig /etc/xen/scripts/vif-rig
  if [ "${1:-}" != keep ]; then
    rm -f "$RIG_SD_STORE"
    must rig_px_local --store "$RIG_SD_STORE" init --size 2G
  fi
  # The key both ends share (psktool's format: identity:hexkey).
  [ -s "$RIG_SD_KEYS" ] ||
    echo "dom0:$(head -c 32 /dev/urandom | hexdump -ve '1/1 "%02x"')" >"$RIG_SD_KEYS"
  # Its boot files on the scratch disk: dom0's /tmp is RAM.
  _d=$RIG_STORE/sd-boot
  rm -rf "$_d"
  mkdir -p "$_d/root/usr/local/bin" "$_d/root/usr/local/lib/parallax" "$_d/root/etc/parallax" ||
    fail "mkdir $_d"
  cp "$RIG_PX_BIN.sd" "$_d/root/usr/local/bin/parallax" || fail "copy parallax"
  cp /host/bin/lib/* "$_d/root/usr/local/lib/parallax/" 2>/dev/null
  cp "$RIG_SD_KEYS" "$_d/root/etc/parallax/keys.psk"
  # What xen-configs/README.md sets up in a storage domain: NBD and the control listener for
  # dom0 over TLS, the xen backend watching this domain's backend/vbd.
  cat >"$_d/root/etc/parallax/parallax.ron" <<RON
(
    store: "/dev/xvda",
    nbd: (enabled: true, listen: ["$RIG_SD_IP:10809"], unix: None, tls: (psk: "/etc/parallax/keys.psk")),
    xen: (enabled: true),
    control: (listen: "$RIG_SD_IP:10810", clients: ["psk:dom0"]),
    // A small domain: bounded caches.
    cache: (map_nodes: 4096, refcount_pages: 1024),
)
RON
  (cd "$_d/root" && find . -mindepth 1 | cpio -o -H newc 2>/dev/null) >"$_d/extra.cpio" ||
    fail "storage domain: cpio"
  cat /scratch/boot/storage.cpio "$_d/extra.cpio" >"$_d/initrd" || fail "storage domain: initrd"
  cat >"$_d/$RIG_SD_NAME.cfg" <<CFG
name = "$RIG_SD_NAME"
type = "pv"
driver_domain = 1
kernel = "$RIG_GUEST_KERNEL"
ramdisk = "$_d/initrd"
memory = $RIG_SD_MEM
vcpus = 2
on_poweroff = "destroy"
on_crash = "destroy"
disk = [ 'format=raw, vdev=xvda, access=rw, script=block-rig, target=$RIG_SD_STORE' ]
vif = [ 'script=vif-rig' ]
extra = "console=hvc0 loglevel=4 rig.ip=$RIG_SD_IP/24${RIG_DEBUG:+ rig.debug=1}"
CFG
  _t0=$(uptime_cs)
  rm -f "/var/log/xen/console/guest-$RIG_SD_NAME.log"
  xl create "$_d/$RIG_SD_NAME.cfg" >"$RIG_RESULTS/xl-create-$RIG_SD_NAME.log" 2>&1 ||
    { cat "$RIG_RESULTS/xl-create-$RIG_SD_NAME.log"; fail "xl create $RIG_SD_NAME failed"; }
  _sd=$(rig_sd_domid) || fail "no domain id for $RIG_SD_NAME"
  # Its console into the scenario's log as it comes, prefixed (ends with the scenario).
  { tail -F "/var/log/xen/console/guest-$RIG_SD_NAME.log" 2>/dev/null |
      while IFS= read -r _l; do echo "[$RIG_SD_NAME] $_l"; done; } &
  [ -z "${RIG_DEBUG:-}" ] || { while sleep 10; do echo "--- debug $(now)"; xl list; ps | grep -v '\[' | tail -n 15; done & }
  _end=$(( $(now) + 120 ))
  until [ "$(xenstore-read "/local/domain/$_sd/data/rig/ready" 2>/dev/null)" = 1 ]; do
    xenstore-exists "/local/domain/$_sd" ||
      { _rig_sd_log; cat "$RIG_RESULTS/$RIG_SD_NAME.log"; fail "the storage domain died while starting"; }
    [ "$(now)" -lt $_end ] ||
      { _rig_sd_log; cat "$RIG_RESULTS/$RIG_SD_NAME.log"; fail "the storage domain did not serve within 120s"; }
    sleep 0.2
  done
  say "storage domain is domain $_sd, serving (up in $(( ($(uptime_cs) - _t0) / 100 )).$(( ($(uptime_cs) - _t0) % 100 / 10 ))s)"
}
# _rig_sd_log: the storage domain's console so far, as $RIG_RESULTS/storage.log.
_rig_sd_log() {
  tr -d '\r' <"/var/log/xen/console/guest-$RIG_SD_NAME.log" >"$RIG_RESULTS/$RIG_SD_NAME.log" 2>/dev/null
}
# rig_sd_wait_gone [SECONDS]: until the storage domain no longer exists (1 if it still does).
rig_sd_wait_gone() {
  _end=$(( $(now) + ${1:-60} ))
  while rig_sd_domid >/dev/null; do
    [ "$(now)" -lt $_end ] || return 1
    sleep 0.2
  done
}
# rig_sd_stop: a clean shutdown, as an admin's `xl shutdown`: the daemon must stop saying it
# closed the store cleanly, and the store (back in dom0) must check clean.
rig_sd_stop() {
  _sd=$(rig_sd_domid) || { _rig_sd_log; fail "the storage domain is gone before it was stopped"; }
  rig_xs_dump "/local/domain/$_sd/control" sd-control.txt
  if [ -n "${RIG_DEBUG:-}" ]; then
    # Blocked tasks in the storage domain, on its console (if its xenstore watches still work).
    xl sysrq "$RIG_SD_NAME" w
    sleep 5
    tail -n 40 /var/log/messages
  fi
  xl shutdown "$RIG_SD_NAME" || { _rig_sd_log; fail "xl shutdown $RIG_SD_NAME failed"; }
  rig_sd_wait_gone 60 ||
    { xl destroy "$RIG_SD_NAME"; _rig_sd_log; fail "the storage domain did not shut down within 60s"; }
  _rig_sd_log
  grep -q 'store closed cleanly' "$RIG_RESULTS/$RIG_SD_NAME.log" ||
    { tail -n 20 "$RIG_RESULTS/$RIG_SD_NAME.log"; fail "parallax serve in the storage domain did not close the store cleanly"; }
  grep -q 'RIG-SD-DONE rc=0' "$RIG_RESULTS/$RIG_SD_NAME.log" ||
    { tail -n 20 "$RIG_RESULTS/$RIG_SD_NAME.log"; fail "the storage domain's daemon did not exit 0"; }
  rig_sd_released
  must rig_px_local --store "$RIG_SD_STORE" check
  say "storage domain shut down cleanly; its store checks clean"
}
# rig_sd_released: waits until blkback has let go of the store file (its loop device detached).
rig_sd_released() {
  _n=100
  while losetup -a 2>/dev/null | grep -q "$RIG_SD_STORE" && [ $_n -gt 0 ]; do _n=$((_n - 1)); sleep 0.1; done
}
_storage_vdi_new() { must rig_sd_px vdi import "$1" "$2"; }
_storage_vdi_snapshot() { must rig_sd_px vdi snapshot "$1" "$2"; }
_storage_vdi_fork() { must rig_sd_px vdi fork "$1" "$2"; }
# An export cannot cross a network: dom0 reads the VDI over NBD (TLS) into a scratch store of
# its own and exports it from there.
_storage_vdi_export() {
  _pull=$RIG_STORE/pull-store
  rm -f "$_pull"
  must rig_px_local --store "$_pull" init --size 2G
  must rig_px_local --store "$_pull" vdi import pulled "nbds://dom0@$RIG_SD_IP/$1?tls-psk-file=$RIG_SD_KEYS"
  must rig_px_local --store "$_pull" vdi export --force pulled "$2"
  rm -f "$_pull"
}
_storage_snapshot_live() { _storage_vdi_snapshot "$@"; }
_storage_disk() {
  echo "backend=$RIG_SD_NAME, format=raw, vdev=$2, access=${3:-rw}, script=block-parallax, target=$1"
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
  # Guests, not the storage domain (rig_backend_stop shuts that down after them).
  for _d in $(xl list 2>/dev/null | awk -v sd="$RIG_SD_NAME" 'NR > 1 && $2 != 0 && $1 != sd {print $2}'); do
    say "cleanup: destroying leftover domain $_d"
    xl destroy "$_d" 2>&1 || true
  done
  for _f in /var/log/xen/console/guest-*.log; do
    [ -f "$_f" ] || continue
    _g=${_f##*/guest-}; _g=${_g%.log}
    [ "$_g" != "$RIG_SD_NAME" ] || continue
    _rig_guest_log "$_g"
  done
}
