#!/bin/sh
# /init of the Xen rig's PV dom0 (packed by images/xen/build.sh). Brings up the Xen toolstack's
# minimum (xenfs, xenstored, xen-init-dom0, xenconsoled), mounts the rig's 9p shares, runs the
# rig's driver script from the host share and powers the machine off, so QEMU exits.
# Mounts: /host (9p tag "host", read-write), /img (9p tag "img", read-only), /scratch (ext4 on
# /dev/vda, when there is one).
#
# Kernel command line options (all optional):
#   rig.main=PATH   script to run (default /host/dom0-main.sh); its exit code is reported
#   rig.scratch=1   a virtio disk holds an ext4 file system: wait for /dev/vda, mount it on /scratch
#   rig.shell=1     after the script (or without one), start a shell on the console instead of
#                   powering off (for interactive debugging with `tests/xen-rig/run.sh --shell`)
# Console markers the host side parses: RIG-DOM0-USERSPACE, RIG-DOM0-READY, RIG-DOM0-DONE rc=N.
export PATH=/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
export HOME=/root

log() { echo "rig-dom0: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run/lock /run/xen /run/xenstored
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "RIG-DOM0-USERSPACE uptime=$(uptime_s)"

main=/host/dom0-main.sh
shell=0
scratch=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    rig.main=*) main=${arg#rig.main=} ;;
    rig.shell=1) shell=1 ;;
    rig.scratch=1) scratch=1 ;;
  esac
done

fail() {
  log "FATAL: $*"
  echo "RIG-DOM0-DONE rc=99"
  [ $shell = 1 ] && exec sh
  sync
  poweroff -f
}

modprobe -a xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs || fail "Xen modules"
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
modprobe -a virtio_pci virtio_blk 9pnet_virtio 9p || fail "virtio modules"
# The host share (read-write: scripts in, results out) and the image share (read-only).
# The 9p virtio device may appear a moment after the driver loads.
i=0
until mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host 2>/dev/null; do
  i=$((i + 1)); [ $i -gt 50 ] && fail "mount 9p share 'host'"; sleep 0.1
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro img /img 2>/dev/null ||
  log "no 'img' share"
# The scratch disk (an ext4 image the host made), if the rig attached one (rig.scratch=1).
if [ $scratch = 1 ]; then
  i=0
  until [ -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 50 ] && fail "no scratch disk /dev/vda"; sleep 0.1
  done
  modprobe -a ext4 crc32c_generic
  mount -t ext4 /dev/vda /scratch || fail "mount scratch disk /dev/vda"
fi

# A syslog for what the toolstack daemons report there (xenstored: stalled connections, quota).
syslogd -O /var/log/messages 2>/dev/null
xenstored --pid-file=/run/xen/xenstored.pid || fail "xenstored"
i=0
until xenstore-read -s / >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -gt 100 ] && fail "xenstored does not answer"; sleep 0.1
done
xen-init-dom0 || fail "xen-init-dom0"
xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console ||
  fail "xenconsoled"
echo "RIG-DOM0-READY uptime=$(uptime_s)"

rc=0
if [ -f "$main" ]; then
  sh "$main"
  rc=$?
else
  log "no $main"
  rc=98
fi
echo "RIG-DOM0-DONE rc=$rc uptime=$(uptime_s)"
if [ $shell = 1 ]; then
  log "rig.shell=1: shell on the console; 'poweroff -f' ends the run"
  setsid cttyhack sh
fi
sync
umount /host 2>/dev/null
poweroff -f
