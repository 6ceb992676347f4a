# Issue 9, scenario 5: a snapshot taken while the guest writes. The guest fills the disk with
# generation A and flushes, then overwrites it with B in 64-block O_DIRECT chunks, each flushed;
# after the first 256 blocks are flushed it tells dom0, which snapshots the VDI (with Parallax:
# `parallax vdi snapshot`, which goes to the serving daemon over its control socket) while the
# guest keeps writing. The snapshot must be a crash-consistent image: every block is A or B,
# never anything else, and the 256 blocks flushed before the snapshot was asked for are B. The
# live VDI ends all B.
rig_backend_start
pattern zero 1024 >"$RIG_TMP/blank.img"
rig_vdi_new live "$RIG_TMP/blank.img"

cat >"$RIG_TMP/live-guest.sh" <<'G'
guest_wait_dev xvda
guest_write xvda gen-a 1024
b=0
while [ $b -lt 1024 ]; do
  guest_write xvda gen-b 64 $b
  b=$((b + 64))
  [ $b = 256 ] && guest_set flushed-b 256
done
say "all of B written"
guest_wait_key snapshot done 120
guest_verify xvda 1024 gen-b
G
rig_guest live "$RIG_TMP/live-guest.sh" "disk = [ '$(rig_disk live xvda)' ]"
rig_guest_start live
rig_guest_wait_key live flushed-b 256 180
rig_snapshot_live live snap
say "snapshot taken"
rig_guest_set live snapshot done
rig_guest_wait live 180

rig_vdi_export live@snap "$RIG_TMP/snap.out"
pattern_check "$RIG_TMP/snap.out" 1024 gen-a,gen-b || fail "the snapshot has blocks that are neither A nor B"
pattern_check "$RIG_TMP/snap.out" 256 gen-b || fail "blocks flushed before the snapshot are not in it"
rig_vdi_export live "$RIG_TMP/live.out"
pattern_check "$RIG_TMP/live.out" 1024 gen-b || fail "the live VDI is not all B"
say "the snapshot is crash-consistent"
