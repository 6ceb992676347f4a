#!/usr/bin/env bash
# The Xen rig: boots Xen 4.17 with a PV dom0 under QEMU (TCG), runs scenarios in dom0 that start
# PV guests whose blkfront talks to a block backend in dom0 through real grant tables and event
# channels, and reports each scenario as PASS/FAIL with its time.
#
# Usage: tests/xen-rig/run.sh [options] [SCENARIO[@BACKEND]...]
#   (default: every scenarios/*.sh but probe-* and sd-*, then, with the parallax backend, the
#   scenarios that prove the storage-domain path again with the daemon in a storage domain
#   (NAME@storage) and sd-*; with --backend storage, just those)
#   --backend parallax|storage|blkback
#                               storage backend (default $XEN_RIG_BACKEND or parallax:
#                               `parallax serve` in dom0, the binary $PARALLAX_BIN or
#                               $CARGO_TARGET_DIR/release/parallax, CARGO_TARGET_DIR defaulting
#                               to ./target; storage: the same in a storage domain; blkback: the
#                               kernel's, for comparison; dom0/lib.sh). NAME@BACKEND runs one
#                               scenario with another backend.
#   --timeout S                 whole run's limit (default 1800); QEMU is killed after it
#   --scenario-timeout S        one scenario's limit inside dom0 (default 600)
#   --save-notes                copy what scenarios saved with rig_note to tests/xen-rig/notes/
#   --keep                      keep the work directory even when everything passed
#   --shell                     interactive: serial console on this terminal, a dom0 shell after
#                               the scenarios (or instead of them with no SCENARIO and --no-run)
#   --no-run                    run no scenario (with --shell: just boot to a dom0 shell)
#   -v                          print the whole serial console as it comes
#   --list                      list the scenarios and exit
# Work directory: tests/.work/xen/run-<time>/ (serial.log, share/results/<scenario>/...). It is
# deleted after a run where everything passed, unless --keep; otherwise its path is printed.
# Exit status: 0 when every scenario passed. The last line is "N passed, N failed".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
img=${XEN_RIG_CACHE:-$root/images/.cache/xen}/out

backend=${XEN_RIG_BACKEND:-parallax}
timeout=1800
scen_timeout=600
save_notes=0 keep=0 shell=0 run=1 verbose=0
scenarios=()
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift ;;
    --timeout) timeout=$2; shift ;;
    --scenario-timeout) scen_timeout=$2; shift ;;
    --save-notes) save_notes=1 ;;
    --keep) keep=1 ;;
    --shell) shell=1 ;;
    --no-run) run=0 ;;
    -v) verbose=1 ;;
    --list) (cd "$here/scenarios" && ls ./*.sh | sed 's|^\./||; s|\.sh$||'); exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) scenarios+=("${1%.sh}") ;;
  esac
  shift
done
case "$backend" in blkback|parallax|storage) ;; *) echo "run.sh: unknown backend $backend" >&2; exit 2 ;; esac
# The scenarios that prove the storage-domain path: boot, two forks, multi-queue, destroy under
# I/O (the rest pass there too, but make test's time is better spent on sd-*).
sd_variants=(01-fork-boot 02-two-forks 03-multiqueue 07-destroy-under-io)
if [ $run = 0 ]; then
  scenarios=()
elif [ ${#scenarios[@]} -eq 0 ]; then
  # probe-* scenarios record facts rather than test anything: they run only when named; sd-*
  # test the storage domain itself.
  mapfile -t scenarios < <(cd "$here/scenarios" && ls ./*.sh | sed 's|^\./||; s|\.sh$||' | grep -v '^probe-\|^sd-')
  mapfile -t sd_only < <(cd "$here/scenarios" && ls ./sd-*.sh 2>/dev/null | sed 's|^\./||; s|\.sh$||')
  case "$backend" in
    parallax) for s in "${sd_variants[@]}"; do scenarios+=("$s@storage"); done
              scenarios+=("${sd_only[@]}") ;;
    storage) scenarios=("${sd_variants[@]}" "${sd_only[@]}") ;;
  esac
fi
for s in "${scenarios[@]}"; do
  [ -f "$here/scenarios/${s%@*}.sh" ] || { echo "run.sh: no scenario ${s%@*} (see --list)" >&2; exit 2; }
done

log() { echo "xen-rig: $*"; }
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 missing (scripts/deps.sh xen)" >&2; exit 1; }
"$root/images/xen/build.sh"

# --- the work directory and the 9p share ----------------------------------------------------------
mkdir -p "$root/tests/.work/xen"
work=$(mktemp -d "$root/tests/.work/xen/run-$(date +%Y%m%d-%H%M%S)-XXXX")
share=$work/share
mkdir -p "$share"/{rig,scenarios,results,bin/lib}
cp "$here/dom0/main.sh" "$share/dom0-main.sh"
cp "$here"/dom0/* "$share/rig/"
cp "$here/lib/pattern.sh" "$here/lib/guest.sh" "$share/rig/"
for s in "${scenarios[@]}"; do cp "$here/scenarios/${s%@*}.sh" "$share/scenarios/"; done
printf '%s\n' "${scenarios[@]}" >"$share/scenarios.list"
{
  echo "RIG_BACKEND=$backend"
  echo "RIG_SCENARIO_TIMEOUT=$scen_timeout"
  echo "RIG_DEBUG=${RIG_DEBUG:-}"
} >"$share/rig.env"
if [ "$backend" != blkback ] || printf '%s\n' "${scenarios[@]}" | grep -q '@\|^sd-'; then
  bin=${PARALLAX_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/parallax}
  [ -x "$bin" ] || { echo "run.sh: no $bin (make release, or PARALLAX_BIN=...)" >&2; exit 1; }
  stale=$(find "$root/backend/src" "$root/backend/Cargo.toml" -newer "$bin" -print -quit)
  [ -z "$stale" ] || log "WARNING: $bin is older than $stale (make release)"
  cp "$bin" "$share/bin/parallax"
  # The storage domain unpacks it into its RAM: without debug info (a third of the size).
  if command -v strip >/dev/null; then strip -o "$share/bin/parallax.sd" "$bin"; else cp "$bin" "$share/bin/parallax.sd"; fi
  # dom0 has the host's glibc already; ship whatever else the binary links.
  for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do cp -L "$lib" "$share/bin/lib/"; done
  [ -d "$root/xen-configs" ] && cp -r "$root/xen-configs" "$share/xen-configs"
fi
# The scratch disk: dom0 keeps disk images and stores there (ext4 on a virtio disk, sparse here).
# It starts with the guest kernel and initramfs in boot/: xl create reads them much faster from
# there than over 9p, and guests boot ~5 s sooner from a plain vmlinux than from a compressed one.
mkdir -p "$work/scratch-root/boot"
for f in domU-vmlinux domU.cpio storage.cpio; do
  ln "$img/$f" "$work/scratch-root/boot/$f" 2>/dev/null || cp "$img/$f" "$work/scratch-root/boot/$f"
done
truncate -s 4G "$work/scratch.img"
mkfs.ext4 -q -F -d "$work/scratch-root" -E lazy_itable_init=1,lazy_journal_init=1 "$work/scratch.img"
rm -rf "$work/scratch-root"

# --- boot ---------------------------------------------------------------------------------------------
xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=512M,max:512M bootscrub=0 spec-ctrl=eager-fpu console_timestamps=boot"
dom0_cmdline="console=hvc0 loglevel=4 rig.scratch=1"
[ $shell = 1 ] && dom0_cmdline+=" rig.shell=1"
qemu=(qemu-system-x86_64 -accel tcg,thread=single -cpu max,-svm,-vmx,-smap,-smep -m 1536 -smp 2
  -display none -no-reboot
  -kernel "$img/xen" -append "$xen_cmdline"
  -initrd "$img/vmlinuz $dom0_cmdline,$img/dom0.cpio.gz"
  -virtfs "local,path=$share,mount_tag=host,security_model=none"
  -virtfs "local,path=$img,mount_tag=img,security_model=none,readonly=on"
  -drive "file=$work/scratch.img,format=raw,if=virtio,cache=unsafe")

if [ $shell = 1 ]; then
  log "interactive: dom0 shell on this terminal after the scenarios; 'poweroff -f' ends it"
  "${qemu[@]}" -serial mon:stdio
  [ $keep = 1 ] || rm -rf "$work"
  exit 0
fi

log "booting Xen + dom0 (work dir $work)"
t0=${EPOCHREALTIME/./}
mkfifo "$work/serial.fifo"
# Every console line gets the host time since QEMU started, "[   12.34] ".
stamp() {
  local line now
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    now=${EPOCHREALTIME/./}
    printf '[%5d.%02d] %s\n' $(((now - t0) / 1000000)) $(((now - t0) / 10000 % 100)) "$line"
    if [ $verbose = 1 ]; then
      printf '[%5d.%02d] %s\n' $(((now - t0) / 1000000)) $(((now - t0) / 10000 % 100)) "$line" >&2
    else
      case "$line" in
        RIG-SCENARIO-*|RIG-FAIL*|RIG-DOM0-*|*"Panic on CPU"*|*"Kernel panic"*)
          printf '[%5d.%02d] %s\n' $(((now - t0) / 1000000)) $(((now - t0) / 10000 % 100)) "$line" >&2 ;;
      esac
    fi
  done
}
stamp <"$work/serial.fifo" >"$work/serial.log" &
stamp_pid=$!
"${qemu[@]}" -monitor none -serial stdio </dev/null >"$work/serial.fifo" 2>&1 &
qemu_pid=$!

# Watch the clock and QEMU's peak memory (VmHWM only grows: the last reading is the peak).
peak_kb=0 timed_out=0
while kill -0 $qemu_pid 2>/dev/null; do
  hwm=$(awk '/^VmHWM:/ {print $2}' /proc/$qemu_pid/status 2>/dev/null || true)
  [ -n "$hwm" ] && peak_kb=$hwm
  if [ $(((${EPOCHREALTIME/./} - t0) / 1000000)) -ge "$timeout" ]; then
    log "TIMEOUT after ${timeout}s: killing QEMU"
    timed_out=1
    kill -TERM $qemu_pid 2>/dev/null || true
    sleep 2
    kill -KILL $qemu_pid 2>/dev/null || true
    break
  fi
  sleep 0.5
done
qemu_rc=0
wait $qemu_pid || qemu_rc=$?
wait $stamp_pid || true
wall=$(((${EPOCHREALTIME/./} - t0) / 10000))

# --- report ---------------------------------------------------------------------------------------
marker_time() { grep -m1 -- "$1" "$work/serial.log" | sed -E 's/^\[ *([0-9.]+)\].*/\1/'; }
userspace=$(marker_time 'RIG-DOM0-USERSPACE')
ready=$(marker_time 'RIG-DOM0-READY')
log "QEMU exited rc=$qemu_rc after $((wall / 100)).$((wall % 100 / 10))s; dom0 userspace at ${userspace:-?}s," \
  "toolstack ready at ${ready:-?}s; QEMU peak RSS $((peak_kb / 1024)) MiB"
passed=0 failed=0
for s in "${scenarios[@]}"; do
  st=$share/results/$s/status
  if [ -f "$st" ]; then
    rc=$(sed -E 's/.*rc=([0-9]+).*/\1/' "$st"); secs=$(sed -E 's/.*secs=([0-9.]+).*/\1/' "$st")
  else
    rc=none secs=-
  fi
  if [ "$rc" = 0 ]; then
    passed=$((passed + 1)); printf 'PASS  %-28s %6ss\n' "$s" "$secs"
  else
    failed=$((failed + 1)); printf 'FAIL  %-28s %6ss  (rc=%s, log: %s)\n' "$s" "$secs" "$rc" "$share/results/$s/log"
    [ -f "$share/results/$s/log" ] && grep -E 'RIG-FAIL|RIG-GUEST-FAIL' "$share/results/$s/log" | head -5 | sed 's/^/      /'
  fi
done
if [ ${#scenarios[@]} -eq 0 ]; then
  grep -q 'RIG-DOM0-DONE' "$work/serial.log" || { failed=1; log "dom0 did not finish its boot"; }
fi
[ $timed_out = 1 ] && [ $failed = 0 ] && failed=1

if [ $save_notes = 1 ]; then
  for s in "${scenarios[@]}"; do
    [ -d "$share/results/$s/notes" ] || continue
    mkdir -p "$here/notes/$s"
    cp "$share/results/$s/notes/"* "$here/notes/$s/"
    log "notes of $s saved in tests/xen-rig/notes/$s/"
  done
fi
if [ $failed = 0 ] && [ $keep = 0 ]; then
  rm -rf "$work"
else
  rm -f "$work/scratch.img" "$work/serial.fifo"
  log "serial log and results kept in $work"
fi
echo "xen-test: $passed passed, $failed failed"
[ $failed = 0 ]
