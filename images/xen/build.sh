#!/usr/bin/env bash
# Builds the boot images of the Xen rig (tests/xen-rig) from Debian packages only, and caches them:
#
#   xen              Xen 4.17 (xen-hypervisor-4.17-amd64), a 32-bit multiboot ELF QEMU boots with -kernel
#   vmlinuz          dom0 kernel (Debian linux-image-amd64, 6.1, has XEN_DOM0)
#   dom0.cpio.gz     dom0 initramfs: busybox, bash, the host's xl/xenstored/xen-init-dom0/xenconsoled/
#                    xenstore-* with their libraries, Xen's modules; /init is images/xen/dom0-init.sh
#   domU-vmlinux     the same kernel as a plain ELF vmlinux for PV guests: xl create spends ~11 s
#                    unpacking the xz bzImage in the emulated dom0, ~7 s on a gzip'd vmlinux and
#                    ~2 s on this (66 MiB; the rig puts it on dom0's scratch disk, not 9p)
#   domU.cpio        domU initramfs: busybox, xenstore-read/-write, xen-blkfront, ext4; /init is
#                    domU-init.sh. Not compressed: dom0 appends each guest's script as a second
#                    archive, and libxenguest would try (and fail) to gunzip a multi-member gzip.
#   storage.cpio     the storage (driver) domain's initramfs: busybox, xl (for `xl devd`) and the
#                    xenstore tools with their libraries, xen-configs/block-parallax, the modules a
#                    user-space vbd backend needs (xen-gntdev, xen-evtchn) and xen-blkfront +
#                    xen-netfront for its own disk and network; /init is storage-init.sh. dom0
#                    appends the parallax binary, its configuration and keys as a second archive.
#
# The hypervisor is pinned to the version of the host's xen-utils-4.17, so the tools copied into dom0
# and the hypervisor always match. Nothing is installed on the host: packages are fetched with
# `apt-get download` and unpacked with `dpkg -x` into the cache.
#
# Usage: images/xen/build.sh [--force]        Idempotent; prints what it fetched and built.
# Env:   XEN_RIG_CACHE (default images/.cache/xen), XEN_RIG_KERNEL_PKG (default: what
#        linux-image-amd64 depends on).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${XEN_RIG_CACHE:-$root/images/.cache/xen}
debs=$cache/debs
out=$cache/out
force=0
[ "${1:-}" = --force ] && force=1

say() { echo "xen-images: $*"; }
die() { echo "xen-images: error: $*" >&2; exit 1; }

# Host tools and the packages whose files go into the initramfs images.
for p in xen-utils-4.17 xenstore-utils busybox-static; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    die "package $p is not installed (run scripts/deps.sh xen)"
done
for c in apt-get apt-cache dpkg cpio gzip xz depmod ldd; do
  command -v "$c" >/dev/null || die "command $c not found (run scripts/deps.sh xen)"
done

xen_ver=$(dpkg-query -W -f='${Version}' xen-utils-4.17)
resolve_kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/^ *Depends: linux-image-/{print $2; exit}'
}
kernel_pkg=${XEN_RIG_KERNEL_PKG:-$(resolve_kernel_pkg)}
if [ -z "$kernel_pkg" ] || ! apt-cache show "xen-hypervisor-4.17-amd64=$xen_ver" >/dev/null 2>&1; then
  say "refreshing apt lists"
  apt-get update -qq
  kernel_pkg=${XEN_RIG_KERNEL_PKG:-$(resolve_kernel_pkg)}
fi
[ -n "$kernel_pkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"

mkdir -p "$debs" "$out"
# fetch PKG[=VERSION]: downloads the .deb into the cache unless it is there; prints its path.
fetch() {
  local spec=$1 name=${1%%=*} ver deb
  if [ "$spec" != "$name" ]; then ver=${spec#*=}; else
    ver=$(apt-cache policy "$name" | awk '/Candidate:/{print $2}')
  fi
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no version of $name available from apt"
  deb=$(ls "$debs/${name}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    (cd "$debs" && apt-get download -q "$name=$ver" >/dev/null 2>"$debs/.apt.err") ||
      { cat "$debs/.apt.err" >&2; die "apt-get download $name=$ver failed"; }
    deb=$(ls "$debs/${name}_${ver//:/%3a}_"*.deb | head -n1)
    say "fetched $(basename "$deb") ($(du -h "$deb" | cut -f1))" >&2
  fi
  echo "$deb"
}
xen_deb=$(fetch "xen-hypervisor-4.17-amd64=$xen_ver")
kernel_deb=$(fetch "$kernel_pkg")
# Old versions of the same packages are dead weight once a newer one is cached.
for d in "$debs"/*.deb; do
  [ "$d" = "$xen_deb" ] || [ "$d" = "$kernel_deb" ] || { say "dropping stale $(basename "$d")"; rm -f "$d"; }
done

# Everything the outputs depend on, so a change anywhere rebuilds and nothing else does.
host_bins=(/usr/lib/xen-4.17/bin/xl /usr/lib/xen-4.17/bin/xenstored /usr/lib/xen-4.17/bin/xen-init-dom0
           /usr/lib/xen-4.17/bin/xenconsoled /usr/lib/xen-4.17/bin/xenstore-control /usr/bin/xenstore
           /usr/bin/bash /usr/bin/busybox)
stamp=$( {
  basename "$xen_deb"; basename "$kernel_deb"
  dpkg-query -W -f='${Package} ${Version}\n' xen-utils-4.17 xen-utils-common xenstore-utils \
    busybox-static libc6 libxenmisc4.17 libxenstore4 bash
  cat "$here/build.sh" "$here/dom0-init.sh" "$here/domU-init.sh" "$here/storage-init.sh" \
    "$root/xen-configs/block-parallax"
} | sha256sum | cut -d' ' -f1)
outputs=(xen vmlinuz dom0.cpio.gz domU-vmlinux domU.cpio storage.cpio)
all_there=1
for f in "${outputs[@]}"; do [ -s "$out/$f" ] || all_there=0; done
if [ $force = 0 ] && [ $all_there = 1 ] && [ "$(cat "$out/STAMP" 2>/dev/null)" = "$stamp" ]; then
  say "up to date in $out"
  exit 0
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- Xen -----------------------------------------------------------------------------------------
dpkg -x "$xen_deb" "$work/xenpkg"
xen_gz=$(ls "$work"/xenpkg/boot/xen-4.17-amd64.gz 2>/dev/null || ls "$work"/xenpkg/boot/xen-*.gz | head -n1)
zcat "$xen_gz" >"$work/xen"
[ "$(head -c4 "$work/xen" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "$xen_gz is not an ELF image"

# --- kernel --------------------------------------------------------------------------------------
dpkg -x "$kernel_deb" "$work/kpkg"
kver=$(ls "$work/kpkg/lib/modules")
[ "$(echo "$kver" | wc -w)" = 1 ] || die "expected one kernel in $kernel_deb, found: $kver"
grep -q '^CONFIG_XEN_DOM0=y' "$work/kpkg/boot/config-$kver" || die "$kernel_pkg lacks CONFIG_XEN_DOM0"
cp "$work/kpkg/boot/vmlinuz-$kver" "$work/vmlinuz"
depmod -b "$work/kpkg" "$kver"

# The bzImage's payload is an xz stream; unpack it to the ELF vmlinux for the domU.
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/vmlinuz" | head -n1 | cut -d: -f1 || true)
[ -n "$off" ] || die "no xz payload found in vmlinuz-$kver"
# (xz stops reading at the end of its stream, so tail may die of SIGPIPE: that is expected.)
{ tail -c +$((off + 1)) "$work/vmlinuz" || true; } | xz -dc --single-stream >"$work/vmlinux"
[ "$(head -c4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "vmlinux extraction failed"
mv "$work/vmlinux" "$work/domU-vmlinux"

# --- initramfs helpers ---------------------------------------------------------------------------
# A merged-/usr tree like Debian's, so library paths from ldd resolve unchanged.
new_root() {
  local r=$1
  mkdir -p "$r"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,run,tmp,root,mnt,var}
  ln -s usr/bin "$r/bin"; ln -s usr/sbin "$r/sbin"; ln -s usr/lib "$r/lib"; ln -s usr/lib64 "$r/lib64"
  cp /usr/bin/busybox "$r/usr/bin/busybox"
  local a
  for a in $(/usr/bin/busybox --list-full); do
    a=${a#/}
    case "$a" in bin/*) a=usr/$a ;; sbin/*) a=usr/$a ;; esac
    [ -e "$r/$a" ] || [ -L "$r/$a" ] || ln -s /usr/bin/busybox "$r/$a"
  done
  echo "root:x:0:0:root:/root:/bin/sh" >"$r/etc/passwd"
  echo "root:x:0:" >"$r/etc/group"
}
# add_bin ROOT FILE...: copies each file to the same path, plus every library ldd lists for it.
add_bin() {
  local r=$1 f lib
  shift
  for f in "$@"; do
    mkdir -p "$r/$(dirname "${f#/}")"
    cp -L "$f" "$r/${f#/}"
    for lib in $(ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      [ -e "$r/$lib" ] || { mkdir -p "$r/$(dirname "${lib#/}")"; cp -L "$lib" "$r/${lib#/}"; }
    done
  done
}
# add_modules ROOT NAME...: copies the named modules and everything they depend on, then runs depmod
# so busybox modprobe works inside.
add_modules() {
  local r=$1 m path dep
  shift
  local moddir=$work/kpkg/lib/modules/$kver
  local -A want=()
  local queue=()
  for m in "$@"; do
    path=$(awk -F: -v m="$m" '{n=$1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); gsub(/-/, "_", n);
            mm=m; gsub(/-/, "_", mm); if (n == mm) {print $1; exit}}' "$moddir/modules.dep")
    [ -n "$path" ] || die "module $m not found in $kver"
    queue+=("$path")
  done
  while [ ${#queue[@]} -gt 0 ]; do
    path=${queue[0]}; queue=("${queue[@]:1}")
    [ -n "${want[$path]:-}" ] && continue
    want[$path]=1
    for dep in $(awk -F': *' -v p="$path" '$1 == p {print $2}' "$moddir/modules.dep"); do queue+=("$dep"); done
  done
  for path in "${!want[@]}"; do
    mkdir -p "$r/usr/lib/modules/$kver/$(dirname "$path")"
    cp "$moddir/$path" "$r/usr/lib/modules/$kver/$path"
  done
  cp "$moddir"/modules.{order,builtin,builtin.modinfo} "$r/usr/lib/modules/$kver/"
  depmod -b "$r" "$kver"
}
# pack ROOT OUT: a newc cpio with stable ordering and no host uid/gid; gzip'd if OUT ends in .gz.
pack() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2.tmp"
  case "$2" in *.gz) gzip -n -6 <"$2.tmp" >"$2"; rm "$2.tmp" ;; *) mv "$2.tmp" "$2" ;; esac
}

# --- dom0 initramfs ------------------------------------------------------------------------------
d0=$work/dom0
new_root "$d0"
add_bin "$d0" "${host_bins[@]}" /usr/bin/xenstore-{read,write,ls,list,exists,rm,watch,chmod}
# xl dlopen()s libgcc_s (pthread_cancel): ldd does not show it.
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$d0/usr/lib/x86_64-linux-gnu/"
for b in xl xenstored xen-init-dom0 xenconsoled xenstore-control; do ln -sf ../lib/xen-4.17/bin/$b "$d0/usr/sbin/$b"; done
mkdir -p "$d0"/etc/xen "$d0"/var/{lib/xen,lib/xenstored,log/xen/console} "$d0"/{host,img,scratch}
cp -a /etc/xen/scripts "$d0/etc/xen/scripts"
cat >"$d0/etc/xen/xl.conf" <<'EOF'
# dom0 has a fixed dom0_mem; never balloon it to make room for guests.
autoballoon="off"
run_hotplug_scripts=1
EOF
ln -s /run "$d0/var/run"
ln -s /run/lock "$d0/var/lock"
# Xen devices; the kernel block backend (the comparison backend, and the storage domain's own
# disk) and network backend (dom0's link to the storage domain); 9p for the host shares; virtio_blk + ext4 for the scratch disk (stores and disk images live there:
# unlike tmpfs it has O_DIRECT and costs dom0 no RAM).
add_modules "$d0" xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback xen-netback loop \
  virtio_pci 9pnet_virtio 9p virtio_blk ext4 crc32c_generic
install -m 0755 "$here/dom0-init.sh" "$d0/init"
echo "$kver" >"$d0/etc/rig-kernel"
pack "$d0" "$work/dom0.cpio.gz"

# --- domU initramfs ------------------------------------------------------------------------------
du0=$work/domU
new_root "$du0"
add_bin "$du0" /usr/bin/xenstore-{read,write,exists}
add_modules "$du0" xen-blkfront ext4 crc32c_generic
install -m 0755 "$here/domU-init.sh" "$du0/init"
pack "$du0" "$work/domU.cpio"

# --- storage domain initramfs --------------------------------------------------------------------
sd=$work/storage
new_root "$sd"
add_bin "$sd" /usr/lib/xen-4.17/bin/xl /usr/bin/xenstore /usr/bin/xenstore-{read,write,ls,list,exists,rm,chmod}
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$sd/usr/lib/x86_64-linux-gnu/"
ln -sf ../lib/xen-4.17/bin/xl "$sd/usr/sbin/xl"
mkdir -p "$sd"/etc/xen/scripts "$sd"/etc/parallax "$sd"/var/{lib/xen,log/xen} "$sd"/usr/local/bin
cp -a /etc/xen/scripts/. "$sd/etc/xen/scripts/"
install -m 0755 "$root/xen-configs/block-parallax" "$sd/etc/xen/scripts/block-parallax"
printf 'run_hotplug_scripts=1\n' >"$sd/etc/xen/xl.conf"
ln -s /run "$sd/var/run"
add_modules "$sd" xen-evtchn xen-gntdev xen-privcmd xenfs xen-blkfront xen-netfront
install -m 0755 "$here/storage-init.sh" "$sd/init"
pack "$sd" "$work/storage.cpio"

for f in "${outputs[@]}"; do mv -f "$work/$f" "$out/$f"; done
{
  echo "xen $(basename "$xen_deb")"
  echo "kernel $(basename "$kernel_deb") ($kver)"
  dpkg-query -W -f='${Package} ${Version}\n' xen-utils-4.17 xenstore-utils busybox-static
} >"$out/MANIFEST"
echo "$stamp" >"$out/STAMP"
say "built in $out:"
(cd "$out" && ls -l "${outputs[@]}" | awk '{printf "  %-16s %6.1f MiB\n", $9, $5 / 1048576}')
