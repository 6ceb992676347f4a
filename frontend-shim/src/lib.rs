//! `frontend-shim`: plays the guest (blkfront) side of the Xen block ring on any Linux host.
//!
//! Not built yet: the ring engine and the local transport land with the ring issue.
