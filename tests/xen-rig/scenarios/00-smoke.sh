# Smoke: one guest, one disk. The guest's blkfront writes a known pattern with O_DIRECT, flushes,
# reads it back and powers off; dom0 then checks the VDI holds exactly that pattern. Proves the
# rig end to end: Xen, grant tables, event channels, xenstore, xl, hotplug, blkfront + a backend.
rig_backend_start
pattern zero 1024 >"$RIG_TMP/blank.img"        # 4 MiB
rig_vdi_new smoke "$RIG_TMP/blank.img"

cat >"$RIG_TMP/smoke-guest.sh" <<'G'
guest_wait_dev xvda
guest_blkinfo xvda
guest_verify xvda 1024 zero
guest_write xvda smoke 512 256
guest_verify xvda 1024 zero,smoke
guest_verify xvda 512 smoke 256
say "wrote and read back blocks 256..767"
G
rig_guest smoke "$RIG_TMP/smoke-guest.sh" "disk = [ '$(rig_disk smoke xvda)' ]"
rig_guest_run smoke 120

rig_vdi_export smoke "$RIG_TMP/smoke.out"
pattern_check "$RIG_TMP/smoke.out" 256 zero || fail "blocks 0..255 changed"
pattern_check "$RIG_TMP/smoke.out" 512 smoke 256 || fail "blocks 256..767 are not the guest's"
pattern_check "$RIG_TMP/smoke.out" 256 zero 768 || fail "blocks 768..1023 changed"
say "dom0 sees exactly what the guest wrote"
