#!/bin/sh
# /init of the Xen rig's storage (driver) domain (packed by images/xen/build.sh as storage.cpio).
# It does what xen-configs/README.md, "In a storage domain", tells an admin to do in one: the
# user-space grant and event-channel devices, its network, `xl devd` (runs block-parallax for the
# vbds whose backend is this domain), and `parallax serve` with its store on the disk dom0 gives
# it (xvda). dom0 appends /usr/local/bin/parallax (+ libraries), /etc/parallax/parallax.ron and
# the TLS keys as a second archive. Everything goes to the console (hvc0), which dom0's
# xenconsoled keeps as guest-NAME.log.
#
# A clean shutdown (`xl shutdown`: the kernel runs /sbin/poweroff, which signals PID 1) stops the
# daemon with SIGTERM (it detaches the rings and closes the store cleanly), then powers off.
# Kernel command line: rig.ip=ADDR/PREFIX (eth0's address; default 10.99.0.2/24).
# Console markers: RIG-SD-UP, RIG-SD-READY, RIG-SD-STOPPING, RIG-SD-DONE rc=N. Once serving it
# also sets its own xenstore data/rig/ready = 1 (dom0 waits for that).
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
export HOME=/root
export LD_LIBRARY_PATH=/usr/local/lib/parallax

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run/xen /run/lock /var/log/xen
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
echo "RIG-SD-UP uptime=$(cut -d' ' -f1 /proc/uptime)"

ip=10.99.0.2/24
for arg in $(cat /proc/cmdline); do
  case "$arg" in rig.ip=*) ip=${arg#rig.ip=} ;; esac
done

done_rc() {
  echo "RIG-SD-DONE rc=$1"
  sync
  poweroff -f
}
fail() { echo "rig-sd: FATAL: $*"; done_rc 99; }

modprobe -a xen-evtchn xen-gntdev xen-privcmd xenfs xen-blkfront xen-netfront || fail "modules"
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
i=0
until [ -b /dev/xvda ] && [ -e /sys/class/net/eth0 ]; do
  i=$((i + 1)); [ $i -gt 300 ] && fail "no store disk xvda or no eth0"; sleep 0.1
done
ip link set lo up
ip addr add "$ip" dev eth0 || fail "ip addr add $ip dev eth0"
ip link set eth0 up || fail "eth0 up"

# xl devd runs the hotplug scripts of the devices whose backend this domain is.
xl devd -p /run/xldevd.pid || fail "xl devd"

[ -x /usr/local/bin/parallax ] || fail "no parallax binary (dom0 appends it)"
stopping=0
trap 'stopping=1' USR1 USR2 TERM INT
parallax serve --config /etc/parallax/parallax.ron >/tmp/serve.log 2>&1 &
pid=$!
tail -f /tmp/serve.log &
i=0
until grep -q 'xen: serving vbds' /tmp/serve.log; do
  kill -0 $pid 2>/dev/null || fail "parallax serve died"
  i=$((i + 1)); [ $i -gt 600 ] && fail "parallax serve did not come up in 60s"
  sleep 0.1
done
xenstore-write data/rig/ready 1
echo "RIG-SD-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

# Wait for a shutdown request (or the daemon's end).
while [ $stopping = 0 ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
echo "RIG-SD-STOPPING"
rc=0
if kill -0 $pid 2>/dev/null; then
  kill -TERM $pid
  wait $pid
  rc=$?
else
  wait $pid
  rc=$?
  echo "rig-sd: parallax serve exited by itself"
fi
sleep 0.3
done_rc $rc
