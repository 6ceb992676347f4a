//! What the store reports to whoever watches it (the daemon's metrics), without knowing who
//! that is: how long checkpoints take, and how much metadata waits for the next one.

use std::time::Duration;

use super::store::Store;

/// Called after every checkpoint with the time it took.
pub(super) type CheckpointHook = Box<dyn Fn(Duration) + Send + Sync>;

impl Store {
    /// Has `hook` called after every checkpoint with the time from its cut to its commit record
    /// being synced (and the blocks it freed released). One hook per store: returns false, and
    /// installs nothing, if one is already set.
    pub fn on_checkpoint(&self, hook: impl Fn(Duration) + Send + Sync + 'static) -> bool {
        self.checkpoint_hook.set(Box::new(hook)).is_ok()
    }

    /// Map nodes changed in memory and waiting for the next checkpoint (4 KiB each).
    pub fn dirty_map_nodes(&self) -> usize {
        self.nodes.dirty_count()
    }

    pub(super) fn checkpoint_done(&self, took: Duration) {
        if let Some(hook) = self.checkpoint_hook.get() {
            hook(took);
        }
    }
}
