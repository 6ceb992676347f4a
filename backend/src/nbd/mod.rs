//! The NBD server (fixed-newstyle handshake, structured replies, `base:allocation`).
