//! `parallax serve`: configuration, the control socket, the export catalogue, and the
//! daemon's lifecycle.

pub mod addr;
pub mod config;
pub mod control;
pub mod control_net;
pub mod deduper;
pub mod hydrator;
pub mod migrate;
pub mod provider;
pub mod serve;
