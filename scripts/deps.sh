#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test Parallax. Idempotent and quick
# when everything is there already. Usage: scripts/deps.sh [group...]; groups: base (default),
# vm (guest rig), xen (Xen rig), bench (peer servers), fuzz (cargo-fuzz).
set -euo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(base)

pkgs=()
for g in "${groups[@]}"; do
  case "$g" in
    # Real NBD clients and fio for the integration tests; libxen-dev for the blkif layout probe;
    # xenstored + xenstore-utils for the xenbus tests; e2fsprogs/cpio for the demo template.
    # qemu-system-x86 removes Debian's newer qemu-utils, so both are always named together.
    # libssl-dev: NBD over TLS links the system's OpenSSL; the tests make their certificates
    # with the openssl command and their keys with GnuTLS's psktool (gnutls-bin).
    # A throwaway Ceph (mon + memstore OSDs) and etcd for the cluster tests (scripts/cluster.sh,
    # which also uses uuidgen, bc and curl). parallax loads librados.so.2 (librados2) at run time,
    # only for a rados: store. The Rust etcd-client crate runs protoc at build time
    # (protobuf-compiler, libprotobuf-dev).
    base) pkgs+=(libnbd-bin python3-libnbd fio libxen-dev xen-utils-4.17 xenstore-utils e2fsprogs cpio
                 qemu-utils qemu-system-x86 busybox-static gcc make pkg-config libssl-dev openssl gnutls-bin
                 ceph-mon ceph-osd ceph-common librados2 etcd-server etcd-client uuid-runtime bc curl
                 protobuf-compiler libprotobuf-dev) ;;
    vm) pkgs+=(qemu-system-x86 qemu-utils busybox-static cpio e2fsprogs kmod xz-utils zstd python3) ;;
    xen) pkgs+=(qemu-system-x86 qemu-utils busybox-static cpio xz-utils zstd kmod xen-utils-4.17 xenstore-utils
                e2fsprogs) ;;
    # The bench harness is Python 3 (standard library only); gnuplot draws its plots.
    # qemu-block-extra: qemu-nbd's rbd driver, the RBD peer of the cluster section.
    bench) pkgs+=(fio nbdkit nbd-server libnbd-bin gnuplot-nox qemu-utils qemu-system-x86 qemu-block-extra
                  python3) ;;
    # libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    fuzz) pkgs+=(g++) ;;
    *) echo "deps.sh: unknown group $g" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  # Debian 12's qemu-system-x86 (7.2) conflicts with the newer backported qemu-utils that some
  # machines ship; install the matching qemu-utils from bookworm in the same command.
  args=()
  for p in "${missing[@]}"; do
    case "$p" in
      qemu-utils) ;;
      qemu-system-x86) args+=(qemu-system-x86 qemu-utils/bookworm) ;;
      *) args+=("$p") ;;
    esac
  done
  printf '%s\n' "${missing[@]}" | grep -qx qemu-utils && ! printf '%s\n' "${args[@]}" | grep -q '^qemu-utils' && args+=(qemu-utils)
  missing=("${args[@]}")
  echo "deps: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" >/dev/null
fi
command -v qemu-img >/dev/null || { echo "deps: qemu-img missing after install" >&2; exit 1; }

for g in "${groups[@]}"; do
  if [ "$g" = fuzz ] && ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
  fi
done
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
