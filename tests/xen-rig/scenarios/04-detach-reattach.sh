# Issue 9, scenario 4: block-detach and block-attach of a running guest's disk. The guest writes
# generation A and lets go of the disk; dom0 detaches it (`xl block-detach`: Closing/Closed on
# both ends, the backend directory goes away), checks the VDI holds A, attaches it again (`xl
# block-attach`); the guest sees the disk come back, reads A, writes B elsewhere. At the end the
# VDI holds A and B.
rig_backend_start
pattern zero 1024 >"$RIG_TMP/blank.img"
rig_vdi_new da "$RIG_TMP/blank.img"

cat >"$RIG_TMP/da-guest.sh" <<'G'
guest_wait_dev xvda
guest_write xvda gen-a 256
guest_verify xvda 256 gen-a
guest_set phase written-a
guest_wait_nodev xvda 120
say "xvda is gone"
guest_set phase detached
guest_wait_key reattached 1 120
guest_wait_dev xvda 60
say "xvda is back"
guest_verify xvda 256 gen-a
guest_write xvda gen-b 256 256
guest_verify xvda 256 gen-b 256
guest_verify xvda 512 zero 512
G
rig_guest da "$RIG_TMP/da-guest.sh" "disk = [ '$(rig_disk da xvda)' ]"
rig_guest_start da
rig_guest_wait_key da phase written-a 120
be=$(rig_be_path da 51712)
must xl block-detach da xvda
rig_guest_wait_key da phase detached 120
xenstore-exists "$be" && fail "backend directory $be still there after block-detach"
rig_vdi_export da "$RIG_TMP/da-detached.out"
pattern_check "$RIG_TMP/da-detached.out" 256 gen-a || fail "generation A not in the VDI after detach"
must xl block-attach da "$(rig_disk da xvda)"
rig_vbd_wait da 51712 4 60
rig_guest_set da reattached 1
rig_guest_wait da 120
rig_vdi_export da "$RIG_TMP/da.out"
pattern_check "$RIG_TMP/da.out" 256 gen-a || fail "generation A lost"
pattern_check "$RIG_TMP/da.out" 256 gen-b 256 || fail "generation B missing"
pattern_check "$RIG_TMP/da.out" 512 zero 512 || fail "untouched blocks changed"
say "detach, re-attach and I/O after it work"
