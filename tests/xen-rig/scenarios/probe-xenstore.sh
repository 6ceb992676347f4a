# PROBE, not a test (run.sh skips probe-* unless named; `run.sh --save-notes probe-xenstore`
# keeps the dumps in tests/xen-rig/notes/probe-xenstore/). Records, as ground truth for the
# xenbus backend, what xl/libxl 4.17 and Linux 6.1's xen-blkfront write into xenstore:
#   part 1  no kernel backend: disk lines a user-space backend could use (script=, backendtype=)
#           and what happens when nothing answers; a fake user-space backend (a shell loop that
#           only moves the backend to InitWait) to see the order libxl and blkfront act in, and
#           what a hotplug error looks like to the user
#   part 2  the kernel's xen-blkback: both directories of a connected vbd, with default blkfront
#           parameters and with max_ring_page_order=2, max_indirect_segments=64, max_queues=2
# Each case NAME leaves NAME.xl.txt (xl create's output and status), NAME.backend.txt and
# NAME.frontend.txt (xenstore-ls -fp of dom0's backend/ and the guest's device/ while the device
# is set up), NAME.watch.txt (every xenstore change under backend/ and the guest's device/, in
# order, with dom0 uptime; values are in the dumps) and, when the hotplug script ran, NAME.hotplug.txt.
set +e   # many commands here are expected to fail; the checks at the end decide
N=$RIG_RESULTS
cp /host/rig/block-probe /etc/xen/scripts/block-parallax
chmod 0755 /etc/xen/scripts/block-parallax
pattern zero 256 >/scratch/probe.img

# An idle guest: reports its block devices, then waits for dom0's go (or 40 s) and powers off.
cat >"$RIG_TMP/idle-guest.sh" <<'G'
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
if [ -b /dev/xvda ]; then
  guest_blkinfo xvda
  guest_write xvda probe 16
  guest_verify xvda 16 probe
  say "xvda works"
else
  say "no xvda"
fi
guest_set ready 1
guest_wait_key go 1 40 || true
G

# watch PATH FILE: logs every change under PATH (dom0 uptime, path) until stop_watches. Values
# are left to the dumps: a process per event is too slow in the emulated dom0.
watch() {
  xenstore-watch "$1" 2>/dev/null | while read -r p; do
    read -r up _ </proc/uptime
    echo "$up $p"
  done >>"$N/$2" &
}
stop_watches() { kill $(pidof xenstore-watch) 2>/dev/null || true; sleep 0.2; }

# fake_backend: a stand-in for a user-space backend's first step only: when a vbd backend
# directory reaches state 1 it advertises features and moves to InitWait (2); it never maps a
# ring. It watches backend/vbd itself (libxl allows a backend 10 s to reach InitWait).
fake_backend() {
  xenstore-watch /local/domain/0/backend/vbd 2>/dev/null | while read -r p; do
    case "$p" in */state) ;; *) continue ;; esac
    [ "$(xenstore-read "$p" 2>/dev/null)" = 1 ] || continue
    d=${p%/state}
    xenstore-write "$d/feature-flush-cache" 1 "$d/feature-max-indirect-segments" 256 \
      "$d/max-ring-page-order" 4 "$d/multi-queue-max-queues" 4 "$d/state" 2
    read -r up _ </proc/uptime
    echo "$up fake backend: $d -> InitWait" >>"$N/fake-backend.log"
  done &
}

# case NAME DISKSPEC [CFG-LINE...]: creates guest probe-NAME with that disk, dumps xenstore while
# xl create runs (or once the vbd is connected, if the guest gets one), then cleans up.
probe_case() {
  name=$1 disk=$2
  shift 2
  say "case $name: disk = [ '$disk' ]"
  rig_guest "probe-$name" "$RIG_TMP/idle-guest.sh" "disk = [ '$disk' ]" "$@"
  : >"$RIG_TMP/block-probe.log"
  watch /local/domain/0/backend "$name.watch.txt"
  t0=$(uptime_cs)
  (set +e
   timeout 60 xl create "$RIG_TMP/guest-probe-$name/probe-$name.cfg" >"$N/$name.xl.txt" 2>&1
   echo "xl create exit status $? after $(( ($(uptime_cs) - t0) / 100 ))s" >>"$N/$name.xl.txt") &
  xlpid=$!
  # Find the domain, watch its device dir, give the toolstack time to write both sides.
  domid=""
  n=0
  while [ -z "$domid" ] && [ $n -lt 50 ]; do domid=$(rig_domid "probe-$name"); n=$((n + 1)); sleep 0.1; done
  if [ -n "$domid" ]; then watch "/local/domain/$domid/device" "$name.watch.txt"; fi
  # Dump once the guest says it is ready (its disk connected, or it gave up on it), or, for cases
  # expected to fail, 5 s into xl create (libxl gives a backend 10 s).
  while [ $(( $(uptime_cs) - t0 )) -lt $((${wait_s:-5} * 100)) ]; do
    [ -n "$domid" ] && [ "$(xenstore-read "/local/domain/$domid/data/rig/ready" 2>/dev/null)" = 1 ] && break
    if ! kill -0 $xlpid 2>/dev/null; then grep -q 'exit status 0' "$N/$name.xl.txt" || break; fi
    sleep 0.1
  done
  if [ -n "$domid" ]; then
    xenstore-ls -fp /local/domain/0/backend >"$N/$name.backend.txt" 2>&1
    xenstore-ls -fp "/local/domain/$domid/device" >"$N/$name.frontend.txt" 2>&1
    xenstore-ls -fp "/libxl/$domid" >"$N/$name.libxl.txt" 2>&1
  fi
  wait $xlpid || true
  if [ -n "$domid" ]; then xenstore-write "/local/domain/$domid/data/rig/go" 1 2>/dev/null || true; fi
  n=0
  while rig_guest_alive "probe-$name" && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
  xl destroy "probe-$name" >/dev/null 2>&1 || true
  stop_watches
  [ -n "$keep_fake" ] && fake_backend   # stop_watches stopped it too
  if [ -s "$RIG_TMP/block-probe.log" ]; then cp "$RIG_TMP/block-probe.log" "$N/$name.hotplug.txt"; fi
  if [ -f "/var/log/xen/console/guest-probe-$name.log" ]; then
    tr -d '\r' <"/var/log/xen/console/guest-probe-$name.log" >"$N/$name.console.txt"
  fi
  sed "s/^/  $name: /" "$N/$name.xl.txt"
  for f in "$N/$name".*; do rig_note "${f##*/}"; done
}

# --- part 1: no kernel backend --------------------------------------------------------------------
lsmod | grep -q xen_blkback && fail "xen-blkback is loaded; part 1 needs no kernel backend"
probe_case script-nobackend "format=raw, vdev=xvda, access=rw, script=block-parallax, target=vdi-one"
probe_case qdisk "format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=/scratch/probe.img"
probe_case qdisk-script "format=raw, vdev=xvda, access=rw, backendtype=qdisk, script=block-parallax, target=vdi-one"
probe_case tap "format=raw, vdev=xvda, access=rw, backendtype=tap, target=/scratch/probe.img"
probe_case standalone "format=raw, vdev=xvda, access=rw, backendtype=standalone, target=/scratch/probe.img"
keep_fake=1
fake_backend
wait_s=120
probe_case script-fakebackend "format=raw, vdev=xvda, access=rw, script=block-parallax, target=vdi-one"
wait_s=5
echo error >"$RIG_TMP/block-probe.mode"
probe_case script-error "format=raw, vdev=xvda, access=rw, script=block-parallax, target=no-such-vdi"
rm -f "$RIG_TMP/block-probe.mode"
keep_fake=""
stop_watches
cp "$N/fake-backend.log" "$N/script-fakebackend.fake-backend.txt" 2>/dev/null && rig_note script-fakebackend.fake-backend.txt

# --- part 2: the kernel's xen-blkback -------------------------------------------------------------
rig_backend_start
rig_vdi_new probe "/scratch/probe.img"
wait_s=120
probe_case blkback-default "$(rig_disk probe xvda)"
probe_case blkback-mq "$(rig_disk probe xvda)" "vcpus = 2" "memory = 256" \
  "extra = 'xen_blkfront.max_ring_page_order=2 xen_blkfront.max_indirect_segments=64 xen_blkfront.max_queues=2'"
wait_s=5
probe_case phy-default-script-missing "format=raw, vdev=xvda, access=rw, target=/scratch/no-such.img"
grep -q 'xvda works' "$N/blkback-default.console.txt" || fail "blkback-default guest had no working disk"
grep -q 'xvda works' "$N/blkback-mq.console.txt" || fail "blkback-mq guest had no working disk"
say "dumps in $N"
