# Issue 9, scenario 3: a guest with 2 vCPUs whose blkfront asks for a 4-page ring
# (max_ring_page_order=2), 64 indirect segments and 2 queues. While it is connected, dom0 checks
# what the frontend negotiated in xenstore (ring-page-order 2, two queue-N/ with 4 ring refs and
# an event channel each); the guest checks its block queue (2 hardware queues, max_segments 64)
# and writes 4 MiB in 1 MiB O_DIRECT requests (indirect descriptors), then reads it back.
# blkfront and Parallax negotiate persistent grants, which the same I/O goes through.
rig_backend_start
pattern zero 2048 >"$RIG_TMP/blank.img"      # 8 MiB
rig_vdi_new mq "$RIG_TMP/blank.img"

cat >"$RIG_TMP/mq-guest.sh" <<'G'
guest_wait_dev xvda
guest_blkinfo xvda
[ "$(ls /sys/block/xvda/mq | wc -l)" = 2 ] || fail "wanted 2 hardware queues"
[ "$(cat /sys/block/xvda/queue/max_segments)" = 64 ] || fail "wanted max_segments 64 (indirect)"
guest_set ready 1
guest_wait_key go 1 60
pattern mq 1024 256 | dd of=/dev/xvda bs=1M seek=1 iflag=fullblock oflag=direct conv=fsync,notrunc 2>/dev/null ||
  fail "1 MiB writes"
# (Reads go in 256 KiB requests: also far more than the 11 segments of a direct request.)
PATTERN_DD_FLAGS=direct pattern_check /dev/xvda 1024 mq 256 || fail "data read back"
guest_verify xvda 256 zero
guest_verify xvda 768 zero 1280
G
rig_guest mq "$RIG_TMP/mq-guest.sh" "disk = [ '$(rig_disk mq xvda)' ]" "vcpus = 2" "memory = 256" \
  "extra = 'xen_blkfront.max_ring_page_order=2 xen_blkfront.max_indirect_segments=64 xen_blkfront.max_queues=2'"
rig_guest_start mq
rig_guest_wait_key mq ready 1 300
rig_vbd_wait mq 51712 4
fe=$(rig_fe_path mq 51712)
be=$(rig_be_path mq 51712)
rig_xs_dump "$fe" frontend.txt
rig_xs_dump "$be" backend.txt
rig_note frontend.txt backend.txt
cat "$RIG_RESULTS/frontend.txt" "$RIG_RESULTS/backend.txt"
xs() { xenstore-read "$1" 2>/dev/null; }
[ "$(xs "$fe/multi-queue-num-queues")" = 2 ] || fail "frontend did not ask for 2 queues"
[ "$(xs "$fe/ring-page-order")" = 2 ] || fail "frontend did not ask for a 4-page ring"
for q in 0 1; do
  for r in 0 1 2 3; do
    [ -n "$(xs "$fe/queue-$q/ring-ref$r")" ] || fail "no queue-$q/ring-ref$r"
  done
  [ -n "$(xs "$fe/queue-$q/event-channel")" ] || fail "no queue-$q/event-channel"
done
# Persistent grants: offered by Parallax, asked for by blkfront, and kept mapped by the engine.
[ "$(xs "$be/feature-persistent")" = 1 ] || fail "backend did not offer feature-persistent"
[ "$(xs "$fe/feature-persistent")" = 1 ] || fail "frontend did not ask for persistent grants"
if [ "$RIG_BACKEND" != blkback ]; then
  grep -q 'blkif device connected.*persistent=true' "$(rig_serve_log)" ||
    fail "the engine does not keep the grants mapped"
fi
rig_guest_set mq go 1
rig_guest_wait mq 120
rig_vdi_export mq "$RIG_TMP/mq.out"
pattern_check "$RIG_TMP/mq.out" 1024 mq 256 || fail "dom0 does not see the guest's 1 MiB writes"
say "multi-page ring, 2 queues and indirect requests work"
