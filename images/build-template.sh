#!/usr/bin/env bash
# Builds the Parallax test template from Debian packages only: the cloud kernel (fetched with
# `apt-get download` and unpacked with `dpkg -x`, never installed on the host), a busybox
# initramfs that loads virtio_pci/virtio_blk and mounts the root disk, and a 128 MiB ext4 root
# file system whose /sbin/init takes orders from the kernel command line (images/guest/).
#
# Usage: images/build-template.sh [--print-env]
# Output (cached; rebuilt only when an input changes; REFRESH=1 also re-resolves the kernel):
#   $PX_IMAGE_CACHE/template/{vmlinuz,initrd.img,rootfs.img,template.env}
# PX_IMAGE_CACHE defaults to images/.cache (gitignored). template.env holds shell assignments
# (PX_KERNEL, PX_INITRD, PX_ROOTFS, PX_KVER, PX_ROOTFS_SHA256) that the VM rig sources.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=images/mkfs-repro.sh
source "$here/mkfs-repro.sh"
cache="${PX_IMAGE_CACHE:-$here/.cache}"
out="$cache/template"
rootfs_size=128M
meta_pkg=linux-image-cloud-amd64
modules=(virtio_pci virtio_blk)   # ext4, jbd2 and crc32c are built into the cloud kernel

log() { echo "build-template: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg dpkg-deb depmod cpio gzip mkfs.ext4 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (run: scripts/deps.sh vm)"
done
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox not found (run: scripts/deps.sh vm)"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked; install busybox-static"
fi

mkdir -p "$cache/debs" "$out"
exec 9>"$cache/.lock"
flock 9

# --- kernel package -------------------------------------------------------------------------
resolve_kernel_pkg() {
    apt-cache depends "$meta_pkg" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}

deb=""
if [ -z "${REFRESH:-}" ]; then
    deb="$(ls -t "$cache"/debs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n1 || true)"
fi
if [ -z "$deb" ]; then
    pkg="$(resolve_kernel_pkg)"
    if [ -z "$pkg" ]; then
        log "apt does not know $meta_pkg yet; running apt-get update"
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        pkg="$(resolve_kernel_pkg)"
    fi
    [ -n "$pkg" ] || die "cannot resolve the kernel package behind $meta_pkg"
    log "downloading $pkg"
    # apt-get download warns when the _apt user cannot write the directory; that is harmless.
    (cd "$cache/debs" && apt-get download -qq "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb="$(ls -t "$cache"/debs/"$pkg"_*.deb 2>/dev/null | head -n1 || true)"
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
fi
kpkg_version="$(dpkg-deb -f "$deb" Version)"
kver="$(dpkg-deb -f "$deb" Package | sed 's/^linux-image-//')"

# --- cache key ------------------------------------------------------------------------------
key="$( { cat "$here/build-template.sh" "$here/mkfs-repro.sh" "$here/guest/initramfs-init" "$here/guest/rootfs-init";
          echo "$kver $kpkg_version $rootfs_size"; sha256sum "$busybox"; } | sha256sum | cut -c1-16)"
if [ -f "$out/template.env" ] && grep -qx "PX_TEMPLATE_KEY=$key" "$out/template.env" \
        && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ -f "$out/rootfs.img" ]; then
    log "up to date ($out, kernel $kver)"
    [ "${1:-}" = "--print-env" ] && cat "$out/template.env"
    exit 0
fi

log "building template for kernel $kver ($kpkg_version)"
work="$(mktemp -d "$cache/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

kroot="$work/kernel"
dpkg -x "$deb" "$kroot"
moddir="$kroot/lib/modules/$kver"
[ -f "$kroot/boot/vmlinuz-$kver" ] || die "no vmlinuz in $deb"
depmod -b "$kroot" "$kver"

# Modules in load order: each module's dependencies (recursively) before the module itself.
declare -A seen=()
load_order=()
add_module() {   # $1 = path relative to the module dir, as in modules.dep
    local rel="$1" dep
    [ -z "${seen[$rel]:-}" ] || return 0
    seen[$rel]=1
    for dep in $(awk -v m="$rel:" '$1 == m { $1 = ""; print }' "$moddir/modules.dep"); do
        add_module "$dep"
    done
    load_order+=("$rel")
}
for m in "${modules[@]}"; do
    rel="$(awk -F: -v n="/$m.ko" 'index($1, n) == length($1) - length(n) + 1 { print $1; exit }' \
        "$moddir/modules.dep")"
    [ -n "$rel" ] || die "module $m not found in $kver"
    add_module "$rel"
done

# --- initramfs ------------------------------------------------------------------------------
ird="$work/initramfs"
mkdir -p "$ird/bin" "$ird/lib/modules" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/newroot"
cp "$busybox" "$ird/bin/busybox"
install -m 0755 "$here/guest/initramfs-init" "$ird/init"
: > "$ird/lib/modules/modules.load"
for rel in "${load_order[@]}"; do
    name="$(basename "$rel")"
    case "$name" in
        *.ko.xz) xz -dc "$moddir/$rel" > "$ird/lib/modules/${name%.xz}"; name="${name%.xz}" ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" > "$ird/lib/modules/${name%.zst}"; name="${name%.zst}" ;;
        *) cp "$moddir/$rel" "$ird/lib/modules/$name" ;;
    esac
    echo "$name" >> "$ird/lib/modules/modules.load"
done
find "$ird" -exec touch -h -d @0 {} +
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --reproducible -R 0:0 --quiet) \
    | gzip -n -9 > "$work/initrd.img"

# --- root file system -----------------------------------------------------------------------
rfs="$work/rootfs"
mkdir -p "$rfs"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root}
chmod 1777 "$rfs/tmp"
cp "$busybox" "$rfs/bin/busybox"
for applet in $("$busybox" --list-full); do
    [ -e "$rfs/$applet" ] || [ -L "$rfs/$applet" ] || ln -s /bin/busybox "$rfs/$applet"
done
rm -f "$rfs/sbin/init" "$rfs/linuxrc"
install -m 0755 "$here/guest/rootfs-init" "$rfs/sbin/init"
cat > "$rfs/etc/motd" <<EOF
Parallax test template: Debian cloud kernel $kver + busybox.
Built by images/build-template.sh; the VM rig (tests/vm/) boots forks of it.
EOF
echo "pxguest" > "$rfs/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rfs/etc/passwd"
printf 'root:x:0:\n' > "$rfs/etc/group"
printf 'NAME="Parallax test template"\nID=parallax-template\nKERNEL=%s\n' "$kver" > "$rfs/etc/os-release"
mkfs_repro "$work/rootfs.img" "$rootfs_size" pxroot 5d1a4a11-0000-4000-8000-70617261786c 1 "$rfs"
e2fsck -fn "$work/rootfs.img" >/dev/null 2>&1 || die "fresh rootfs does not check clean"

cp "$kroot/boot/vmlinuz-$kver" "$work/vmlinuz"
rootfs_sha="$(sha256sum "$work/rootfs.img" | cut -d' ' -f1)"
for f in vmlinuz initrd.img rootfs.img; do
    mv -f "$work/$f" "$out/$f"
done
cat > "$out/template.env" <<EOF
PX_TEMPLATE_KEY=$key
PX_KVER=$kver
PX_KERNEL=$out/vmlinuz
PX_INITRD=$out/initrd.img
PX_ROOTFS=$out/rootfs.img
PX_ROOTFS_SHA256=$rootfs_sha
EOF
log "built $out (modules: ${load_order[*]##*/})"
[ "${1:-}" = "--print-env" ] && cat "$out/template.env"
exit 0
