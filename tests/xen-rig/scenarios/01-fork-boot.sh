# Issue 9, scenario 1: a guest boots from a fork of a template and reads the template's data.
# The template is a file system with a script and a 2 MiB data file plus its checksum; dom0
# snapshots it (template@gold) and forks vm1. The guest mounts its disk, runs the script from it,
# checks the data, writes a file of its own. Afterwards the fork has the guest's file and the
# template's data; the template and its snapshot are unchanged, byte for byte.
rig_backend_start

# The template: an ext2 file system (busybox mke2fs) built through a loop mount in dom0.
t=$RIG_TMP/template.img
dd if=/dev/zero of="$t" bs=1M count=16 2>/dev/null
must mke2fs -F -L template "$t"
mkdir -p /mnt/t
must mount -o loop "$t" /mnt/t
mkdir /mnt/t/rig
printf '#!/bin/sh\necho "RIG-TEMPLATE-HELLO: running from the disk of $(hostname)"\n' >/mnt/t/rig/hello.sh
pattern template 512 >/mnt/t/rig/data.bin
(cd /mnt/t/rig && sha256sum data.bin hello.sh >MANIFEST)
umount /mnt/t
sha_template=$(sha256sum <"$t")
rig_vdi_new template "$t"
rig_vdi_snapshot template gold
rig_vdi_fork template@gold vm1

cat >"$RIG_TMP/fork-boot-guest.sh" <<'G'
guest_wait_dev xvda
hostname vm1
mkdir -p /mnt
mount -t ext2 /dev/xvda /mnt || fail "mount xvda"
sh /mnt/rig/hello.sh || fail "hello.sh from the disk"
(cd /mnt/rig && sha256sum -c MANIFEST) || fail "template data differs on the fork"
pattern_check /mnt/rig/data.bin 512 template || fail "data.bin"
echo "written by vm1" >/mnt/rig/vm1.txt
umount /mnt || fail "umount"
say "fork read and written"
G
rig_guest vm1 "$RIG_TMP/fork-boot-guest.sh" "disk = [ '$(rig_disk vm1 xvda)' ]"
rig_guest_run vm1 120
grep -q 'RIG-TEMPLATE-HELLO' "$RIG_RESULTS/guest-vm1.log" || fail "the guest did not run the template's script"

# The fork holds the guest's change; the template and its snapshot do not.
rig_vdi_export vm1 "$RIG_TMP/vm1.out"
must mount -o loop,ro "$RIG_TMP/vm1.out" /mnt/t
[ "$(cat /mnt/t/rig/vm1.txt)" = "written by vm1" ] || fail "vm1.txt missing on the fork"
(cd /mnt/t/rig && sha256sum -c MANIFEST) || fail "fork's template data changed"
umount /mnt/t
for v in template template@gold; do
  rig_vdi_export "$v" "$RIG_TMP/check.out"
  [ "$(sha256sum <"$RIG_TMP/check.out")" = "$sha_template" ] || fail "$v changed"
done
say "fork has the guest's file; template and template@gold unchanged"
