//! Shared helpers for the integration tests: temporary stores, running the `parallax` binary.
pub mod cluster;
pub mod daemon;
pub mod fixtures;
pub mod nbd;
pub mod xenstored;
