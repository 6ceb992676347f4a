//! Checks the Rust ABI definitions against the C headers from Debian's `libxen-dev`
//! (`xen/io/blkif.h`, `xen/sys/gntdev.h`, `xen/sys/evtchn.h`): a small C program prints every
//! size, offset and ioctl number, and each is compared with ours. Fails, rather than skips,
//! when `gcc` or the headers are missing (`scripts/deps.sh base` installs them).

use std::{collections::HashMap, mem::offset_of, mem::size_of, process::Command};

use super::{abi::*, xen::*};

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/event_channel.h>
#include <xen/io/blkif.h>
#include <xen/sys/gntdev.h>
#include <xen/sys/evtchn.h>
#define SZ(t) printf("sizeof %s %zu\n", #t, sizeof(t))
#define OFF(t, f) printf("offsetof %s.%s %zu\n", #t, #f, offsetof(t, f))
#define VAL(v) printf("value %s %lld\n", #v, (long long)(v))
int main(void) {
    SZ(struct blkif_request_segment);
    OFF(struct blkif_request_segment, gref);
    OFF(struct blkif_request_segment, first_sect);
    OFF(struct blkif_request_segment, last_sect);
    SZ(struct blkif_request);
    OFF(struct blkif_request, operation);
    OFF(struct blkif_request, nr_segments);
    OFF(struct blkif_request, handle);
    OFF(struct blkif_request, id);
    OFF(struct blkif_request, sector_number);
    OFF(struct blkif_request, seg);
    SZ(struct blkif_request_discard);
    OFF(struct blkif_request_discard, operation);
    OFF(struct blkif_request_discard, flag);
    OFF(struct blkif_request_discard, handle);
    OFF(struct blkif_request_discard, id);
    OFF(struct blkif_request_discard, sector_number);
    OFF(struct blkif_request_discard, nr_sectors);
    SZ(struct blkif_request_indirect);
    OFF(struct blkif_request_indirect, operation);
    OFF(struct blkif_request_indirect, indirect_op);
    OFF(struct blkif_request_indirect, nr_segments);
    OFF(struct blkif_request_indirect, id);
    OFF(struct blkif_request_indirect, sector_number);
    OFF(struct blkif_request_indirect, handle);
    OFF(struct blkif_request_indirect, indirect_grefs);
    SZ(struct blkif_response);
    OFF(struct blkif_response, id);
    OFF(struct blkif_response, operation);
    OFF(struct blkif_response, status);
    SZ(union blkif_sring_entry);
    OFF(struct blkif_sring, req_prod);
    OFF(struct blkif_sring, req_event);
    OFF(struct blkif_sring, rsp_prod);
    OFF(struct blkif_sring, rsp_event);
    OFF(struct blkif_sring, ring);
    SZ(grant_ref_t);
    VAL(BLKIF_OP_READ); VAL(BLKIF_OP_WRITE); VAL(BLKIF_OP_WRITE_BARRIER);
    VAL(BLKIF_OP_FLUSH_DISKCACHE); VAL(BLKIF_OP_RESERVED_1); VAL(BLKIF_OP_DISCARD);
    VAL(BLKIF_OP_INDIRECT); VAL(BLKIF_RSP_OKAY); VAL(BLKIF_RSP_ERROR); VAL(BLKIF_RSP_EOPNOTSUPP);
    VAL(BLKIF_DISCARD_SECURE); VAL(BLKIF_MAX_SEGMENTS_PER_REQUEST);
    VAL(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    VAL(VDISK_CDROM); VAL(VDISK_REMOVABLE); VAL(VDISK_READONLY);
    for (int order = 0; order <= 4; order++)
        printf("ringsize %d %u\n", order, (unsigned)__CONST_RING_SIZE(blkif, 4096 << order));
    SZ(struct ioctl_gntdev_grant_ref);
    OFF(struct ioctl_gntdev_grant_ref, domid);
    OFF(struct ioctl_gntdev_grant_ref, ref);
    SZ(struct ioctl_gntdev_map_grant_ref);
    OFF(struct ioctl_gntdev_map_grant_ref, count);
    OFF(struct ioctl_gntdev_map_grant_ref, pad);
    OFF(struct ioctl_gntdev_map_grant_ref, index);
    OFF(struct ioctl_gntdev_map_grant_ref, refs);
    SZ(struct ioctl_gntdev_unmap_grant_ref);
    OFF(struct ioctl_gntdev_unmap_grant_ref, index);
    OFF(struct ioctl_gntdev_unmap_grant_ref, count);
    OFF(struct ioctl_gntdev_unmap_grant_ref, pad);
    SZ(struct ioctl_evtchn_bind_interdomain);
    OFF(struct ioctl_evtchn_bind_interdomain, remote_domain);
    OFF(struct ioctl_evtchn_bind_interdomain, remote_port);
    SZ(struct ioctl_evtchn_unbind);
    SZ(struct ioctl_evtchn_notify);
    SZ(domid_t);
    SZ(evtchn_port_t);
    VAL(IOCTL_GNTDEV_MAP_GRANT_REF); VAL(IOCTL_GNTDEV_UNMAP_GRANT_REF);
    VAL(IOCTL_EVTCHN_BIND_INTERDOMAIN); VAL(IOCTL_EVTCHN_UNBIND); VAL(IOCTL_EVTCHN_NOTIFY);
    return 0;
}
"#;

fn run_probe() -> HashMap<String, i64> {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("probe.c");
    let bin = dir.path().join("probe");
    std::fs::write(&src, PROBE).unwrap();
    assert!(
        std::path::Path::new("/usr/include/xen/io/blkif.h").exists(),
        "/usr/include/xen/io/blkif.h is missing: install libxen-dev (scripts/deps.sh base)"
    );
    let out = Command::new("gcc")
        .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("running gcc (install gcc: scripts/deps.sh base)");
    assert!(
        out.status.success(),
        "probe did not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|l| {
            // "<kind> <name, may contain spaces> <value>"
            let (key, val) = l.rsplit_once(' ').unwrap();
            (key.to_string(), val.parse().unwrap())
        })
        .collect()
}

#[test]
fn layout_matches_libxen_headers() {
    let c = run_probe();
    let mut checked = 0;
    let mut check = |key: &str, ours: usize| {
        let theirs = *c
            .get(key)
            .unwrap_or_else(|| panic!("probe did not print {key}"));
        assert_eq!(ours as i64, theirs, "{key}: ours {ours}, C header {theirs}");
        checked += 1;
    };
    macro_rules! sz {
        ($c:literal, $t:ty) => {
            check(concat!("sizeof ", $c), size_of::<$t>())
        };
    }
    macro_rules! off {
        ($c:literal, $t:ty, $f:ident, $cf:literal) => {
            check(concat!("offsetof ", $c, ".", $cf), offset_of!($t, $f))
        };
    }
    sz!("struct blkif_request_segment", BlkifRequestSegment);
    off!(
        "struct blkif_request_segment",
        BlkifRequestSegment,
        gref,
        "gref"
    );
    off!(
        "struct blkif_request_segment",
        BlkifRequestSegment,
        first_sect,
        "first_sect"
    );
    off!(
        "struct blkif_request_segment",
        BlkifRequestSegment,
        last_sect,
        "last_sect"
    );
    sz!("struct blkif_request", BlkifRequest);
    off!("struct blkif_request", BlkifRequest, operation, "operation");
    off!(
        "struct blkif_request",
        BlkifRequest,
        nr_segments,
        "nr_segments"
    );
    off!("struct blkif_request", BlkifRequest, handle, "handle");
    off!("struct blkif_request", BlkifRequest, id, "id");
    off!(
        "struct blkif_request",
        BlkifRequest,
        sector_number,
        "sector_number"
    );
    off!("struct blkif_request", BlkifRequest, seg, "seg");
    sz!("struct blkif_request_discard", BlkifRequestDiscard);
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        operation,
        "operation"
    );
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        flag,
        "flag"
    );
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        handle,
        "handle"
    );
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        id,
        "id"
    );
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        sector_number,
        "sector_number"
    );
    off!(
        "struct blkif_request_discard",
        BlkifRequestDiscard,
        nr_sectors,
        "nr_sectors"
    );
    sz!("struct blkif_request_indirect", BlkifRequestIndirect);
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        operation,
        "operation"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        indirect_op,
        "indirect_op"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        nr_segments,
        "nr_segments"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        id,
        "id"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        sector_number,
        "sector_number"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        handle,
        "handle"
    );
    off!(
        "struct blkif_request_indirect",
        BlkifRequestIndirect,
        indirect_grefs,
        "indirect_grefs"
    );
    sz!("struct blkif_response", BlkifResponse);
    off!("struct blkif_response", BlkifResponse, id, "id");
    off!(
        "struct blkif_response",
        BlkifResponse,
        operation,
        "operation"
    );
    off!("struct blkif_response", BlkifResponse, status, "status");
    sz!("union blkif_sring_entry", BlkifSringEntry);
    check("offsetof struct blkif_sring.req_prod", SRING_REQ_PROD);
    check("offsetof struct blkif_sring.req_event", SRING_REQ_EVENT);
    check("offsetof struct blkif_sring.rsp_prod", SRING_RSP_PROD);
    check("offsetof struct blkif_sring.rsp_event", SRING_RSP_EVENT);
    check("offsetof struct blkif_sring.ring", SRING_ENTRIES_OFFSET);
    sz!("grant_ref_t", GrantRef);
    check("value BLKIF_OP_READ", BLKIF_OP_READ.into());
    check("value BLKIF_OP_WRITE", BLKIF_OP_WRITE.into());
    check(
        "value BLKIF_OP_WRITE_BARRIER",
        BLKIF_OP_WRITE_BARRIER.into(),
    );
    check(
        "value BLKIF_OP_FLUSH_DISKCACHE",
        BLKIF_OP_FLUSH_DISKCACHE.into(),
    );
    check("value BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1.into());
    check("value BLKIF_OP_DISCARD", BLKIF_OP_DISCARD.into());
    check("value BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT.into());
    check("value BLKIF_RSP_OKAY", BLKIF_RSP_OKAY as usize);
    assert_eq!(c["value BLKIF_RSP_ERROR"], i64::from(BLKIF_RSP_ERROR));
    assert_eq!(
        c["value BLKIF_RSP_EOPNOTSUPP"],
        i64::from(BLKIF_RSP_EOPNOTSUPP)
    );
    check("value BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE.into());
    check(
        "value BLKIF_MAX_SEGMENTS_PER_REQUEST",
        BLKIF_MAX_SEGMENTS_PER_REQUEST,
    );
    check(
        "value BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    );
    check("value VDISK_CDROM", VDISK_CDROM as usize);
    check("value VDISK_REMOVABLE", VDISK_REMOVABLE as usize);
    check("value VDISK_READONLY", VDISK_READONLY as usize);
    for order in 0..=MAX_RING_PAGE_ORDER {
        check(&format!("ringsize {order}"), ring_size(order) as usize);
    }
    sz!("struct ioctl_gntdev_grant_ref", IoctlGntdevGrantRef);
    off!(
        "struct ioctl_gntdev_grant_ref",
        IoctlGntdevGrantRef,
        domid,
        "domid"
    );
    off!(
        "struct ioctl_gntdev_grant_ref",
        IoctlGntdevGrantRef,
        ref_,
        "ref"
    );
    sz!("struct ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef);
    off!(
        "struct ioctl_gntdev_map_grant_ref",
        IoctlGntdevMapGrantRef,
        count,
        "count"
    );
    off!(
        "struct ioctl_gntdev_map_grant_ref",
        IoctlGntdevMapGrantRef,
        pad,
        "pad"
    );
    off!(
        "struct ioctl_gntdev_map_grant_ref",
        IoctlGntdevMapGrantRef,
        index,
        "index"
    );
    off!(
        "struct ioctl_gntdev_map_grant_ref",
        IoctlGntdevMapGrantRef,
        refs,
        "refs"
    );
    sz!(
        "struct ioctl_gntdev_unmap_grant_ref",
        IoctlGntdevUnmapGrantRef
    );
    off!(
        "struct ioctl_gntdev_unmap_grant_ref",
        IoctlGntdevUnmapGrantRef,
        index,
        "index"
    );
    off!(
        "struct ioctl_gntdev_unmap_grant_ref",
        IoctlGntdevUnmapGrantRef,
        count,
        "count"
    );
    off!(
        "struct ioctl_gntdev_unmap_grant_ref",
        IoctlGntdevUnmapGrantRef,
        pad,
        "pad"
    );
    sz!(
        "struct ioctl_evtchn_bind_interdomain",
        IoctlEvtchnBindInterdomain
    );
    off!(
        "struct ioctl_evtchn_bind_interdomain",
        IoctlEvtchnBindInterdomain,
        remote_domain,
        "remote_domain"
    );
    off!(
        "struct ioctl_evtchn_bind_interdomain",
        IoctlEvtchnBindInterdomain,
        remote_port,
        "remote_port"
    );
    sz!("struct ioctl_evtchn_unbind", IoctlEvtchnPort);
    sz!("struct ioctl_evtchn_notify", IoctlEvtchnPort);
    sz!("domid_t", xen_sys::domid_t);
    sz!("evtchn_port_t", xen_sys::evtchn_port_t);
    check(
        "value IOCTL_GNTDEV_MAP_GRANT_REF",
        IOCTL_GNTDEV_MAP_GRANT_REF as usize,
    );
    check(
        "value IOCTL_GNTDEV_UNMAP_GRANT_REF",
        IOCTL_GNTDEV_UNMAP_GRANT_REF as usize,
    );
    check(
        "value IOCTL_EVTCHN_BIND_INTERDOMAIN",
        IOCTL_EVTCHN_BIND_INTERDOMAIN as usize,
    );
    check("value IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND as usize);
    check("value IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY as usize);
    assert_eq!(checked, c.len() - 2, "every probed value is compared");
}
