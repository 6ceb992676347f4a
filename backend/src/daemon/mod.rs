//! `parallax serve`: configuration, the control socket, and the daemon's lifecycle.

pub mod addr;
