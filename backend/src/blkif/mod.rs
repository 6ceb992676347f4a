//! The Xen block-ring (blkif) backend: ABI, ring engine, grant/event-channel transports.
