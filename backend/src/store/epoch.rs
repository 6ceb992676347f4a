//! A two-phase reader epoch: lets a commit wait until every read that might still be using a
//! block freed before the commit has finished, before that block can be reused.
//!
//! Readers enter the current epoch (one of two counters, by parity) before they look a block up
//! and leave after they have read it. A commit flips the epoch and waits for the old parity's
//! counter to drain: any reader that could have seen a freed block's address entered before
//! the flip, so it is counted there.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Epoch {
    current: AtomicU64,
    readers: [AtomicU64; 2],
}

/// Held by a reader for the duration of one lookup-and-read.
pub struct ReadGuard<'a> {
    epoch: &'a Epoch,
    parity: usize,
}

impl Epoch {
    pub fn enter(&self) -> ReadGuard<'_> {
        loop {
            let e = self.current.load(Ordering::SeqCst);
            let parity = (e & 1) as usize;
            self.readers[parity].fetch_add(1, Ordering::SeqCst);
            if self.current.load(Ordering::SeqCst) == e {
                return ReadGuard {
                    epoch: self,
                    parity,
                };
            }
            // The epoch flipped under us: retry in the new one.
            self.readers[parity].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Flips the epoch and waits for every reader of the previous one to leave. Callers
    /// serialise flips (the commit lock).
    pub fn flip_and_wait(&self) {
        let old = self.current.fetch_add(1, Ordering::SeqCst);
        let parity = (old & 1) as usize;
        let mut spins = 0u32;
        while self.readers[parity].load(Ordering::SeqCst) != 0 {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        self.epoch.readers[self.parity].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{atomic::AtomicBool, Arc};

    #[test]
    fn flip_waits_for_old_readers_only() {
        let e = Arc::new(Epoch::default());
        let g = e.enter();
        let done = Arc::new(AtomicBool::new(false));
        let (e2, d2) = (e.clone(), done.clone());
        let t = std::thread::spawn(move || {
            e2.flip_and_wait();
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !done.load(Ordering::SeqCst),
            "flip must wait for the old reader"
        );
        let _new_reader = e.enter(); // a reader of the new epoch does not block the flip
        drop(g);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }
}
