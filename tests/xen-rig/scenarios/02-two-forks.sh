# Issue 9, scenario 2: two guests at once, each on its own fork of one template snapshot. Each
# reads the template, waits until both are up (so their I/O overlaps), overwrites blocks
# 256..511 with its own pattern and checks the whole disk. Each fork ends with only its own
# guest's writes; the template and its snapshot are untouched.
rig_backend_start
pattern template 1024 >"$RIG_TMP/template.img"      # 4 MiB
rig_vdi_new template "$RIG_TMP/template.img"
rig_vdi_snapshot template gold
rig_vdi_fork template@gold fork-a
rig_vdi_fork template@gold fork-b

for g in a b; do
  cat >"$RIG_TMP/guest-$g.sh" <<G
guest_wait_dev xvda
guest_verify xvda 1024 template
guest_set ready 1
guest_wait_key go 1 300
guest_write xvda fork-$g 256 256
guest_verify xvda 256 template
guest_verify xvda 256 fork-$g 256
guest_verify xvda 512 template 512
say "fork-$g: template read, own blocks written"
G
  rig_guest "g$g" "$RIG_TMP/guest-$g.sh" "disk = [ '$(rig_disk "fork-$g" xvda)' ]"
done
rig_guest_start ga
rig_guest_start gb
rig_guest_wait_key ga ready 1 300
rig_guest_wait_key gb ready 1 300
rig_guest_set ga go 1
rig_guest_set gb go 1
rig_guest_wait ga 180
rig_guest_wait gb 180

for g in a b; do
  rig_vdi_export "fork-$g" "$RIG_TMP/fork-$g.out"
  pattern_check "$RIG_TMP/fork-$g.out" 256 template || fail "fork-$g blocks 0..255"
  pattern_check "$RIG_TMP/fork-$g.out" 256 "fork-$g" 256 || fail "fork-$g blocks 256..511"
  pattern_check "$RIG_TMP/fork-$g.out" 512 template 512 || fail "fork-$g blocks 512..1023"
done
for v in template template@gold; do
  rig_vdi_export "$v" "$RIG_TMP/check.out"
  pattern_check "$RIG_TMP/check.out" 1024 template || fail "$v changed"
done
say "each fork has only its own guest's writes"
