# What xen-configs/README.md promises about sharing: a VDI is attached writable to at most one
# guest (a second one gets a readable "busy" error from xl create), and NAME@SNAP attaches a
# snapshot read-only: the guest reads it, its writes fail, and the snapshot is unchanged.
rig_backend_start
pattern base 1024 >"$RIG_TMP/base.img"
rig_vdi_new shared "$RIG_TMP/base.img"
rig_vdi_snapshot shared snap

# Guest A holds "shared" writable until told to let go.
cat >"$RIG_TMP/ra-guest.sh" <<'G'
guest_wait_dev xvda
guest_write xvda mine 256
guest_set phase holding
guest_wait_key release 1 120
G
rig_guest ra "$RIG_TMP/ra-guest.sh" "disk = [ '$(rig_disk shared xvda)' ]"
rig_guest_start ra
rig_guest_wait_key ra phase holding 120

# Guest B asks for the same VDI writable: refused, and nothing is left behind. (Parallax's
# promise: the blkback stand-in's hotplug script would hand the image out twice.)
if [ "$RIG_BACKEND" = blkback ]; then
  say "blkback stand-in: second-writer check skipped"
else
echo 'say "this guest should never run"' >"$RIG_TMP/rb-guest.sh"
rig_guest rb "$RIG_TMP/rb-guest.sh" "disk = [ '$(rig_disk shared xvda)' ]"
if rig_guest_create rb; then
  fail "a second guest attached VDI shared writable"
fi
grep -q 'busy' "$RIG_RESULTS/xl-create-rb.log" || fail "xl create's error does not say the VDI is busy"
n=0
while rig_guest_alive rb && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
rig_guest_alive rb && fail "domain rb still exists"
say "second writer refused: $(grep -m1 'busy' "$RIG_RESULTS/xl-create-rb.log")"
fi

# Guest C gets the snapshot while A still writes the VDI: read-only, the old content.
cat >"$RIG_TMP/rc-guest.sh" <<'G'
guest_wait_dev xvda
[ "$(cat /sys/block/xvda/ro)" = 1 ] || fail "xvda is not read-only"
guest_verify xvda 1024 base
if pattern evil 16 | dd of=/dev/xvda bs=65536 oflag=direct conv=notrunc 2>/dev/null; then
  fail "a write to the read-only snapshot succeeded"
fi
guest_verify xvda 1024 base
say "snapshot read-only and intact"
G
rig_guest rc "$RIG_TMP/rc-guest.sh" "disk = [ '$(rig_disk shared@snap xvda ro)' ]"
rig_guest_run rc 120

rig_guest_set ra release 1
rig_guest_wait ra 120
rig_vdi_export shared@snap "$RIG_TMP/snap.out"
pattern_check "$RIG_TMP/snap.out" 1024 base || fail "the snapshot changed"
rig_vdi_export shared "$RIG_TMP/shared.out"
pattern_check "$RIG_TMP/shared.out" 256 mine || fail "guest A's write is missing"
pattern_check "$RIG_TMP/shared.out" 768 base 256 || fail "blocks 256.. of shared changed"
say "one writer at a time; snapshots attach read-only"
