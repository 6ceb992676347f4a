//! The crash-safe copy-on-write block store.
