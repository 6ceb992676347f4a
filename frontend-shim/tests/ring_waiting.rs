//! Requests that wait for a device: one queue keeps many of them in flight against the disk,
//! and a write barrier still orders what comes before and after it.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use frontend_shim::{Completion, Frontend, FrontendConfig, IoKind, IoRequest};
use parallax::{
    blkif::{abi::BLKIF_RSP_OKAY, Features},
    disk::{Disk, DiskError, Extent, MemDisk},
};

/// A disk whose reads always wait (nothing is "in memory") and record what they overlap.
struct SlowDisk {
    inner: MemDisk,
    state: Mutex<State>,
    changed: Condvar,
    /// A read waits until this many have been in progress at once (or a timeout passes).
    gather: usize,
}

#[derive(Default)]
struct State {
    reading: usize,
    most_reading: usize,
    /// ("read"/"write", sector, start or end), in the order they happened.
    events: Vec<(&'static str, u64, &'static str)>,
}

impl SlowDisk {
    fn new(gather: usize) -> SlowDisk {
        SlowDisk {
            inner: MemDisk::new(8 << 20),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            gather,
        }
    }
}

impl Disk for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let mut st = self.state.lock().unwrap();
        st.reading += 1;
        st.most_reading = st.most_reading.max(st.reading);
        st.events.push(("read", offset / 512, "start"));
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_millis(500);
        while st.most_reading < self.gather && Instant::now() < deadline {
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        st.reading -= 1;
        st.events.push(("read", offset / 512, "end"));
        drop(st);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.state
            .lock()
            .unwrap()
            .events
            .push(("write", offset / 512, "start"));
        let r = self.inner.write_at(buf, offset, fua);
        self.state
            .lock()
            .unwrap()
            .events
            .push(("write", offset / 512, "end"));
        r
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.inner.write_zeroes(offset, len, no_hole, fua)
    }
    fn block_status(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, DiskError> {
        self.inner.block_status(offset, len, max)
    }
}

fn submit_all(f: &mut Frontend, reqs: &[IoRequest<'_>]) -> Vec<Completion> {
    let q = f.queue(0);
    for r in reqs {
        q.submit(r).unwrap();
    }
    q.push().unwrap();
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.len() < reqs.len() {
        assert!(Instant::now() < deadline, "requests left unanswered");
        q.wait(Some(Duration::from_millis(100))).unwrap();
        q.poll(&mut done).unwrap();
    }
    done
}

fn front(disk: Arc<SlowDisk>) -> Frontend {
    let cfg = FrontendConfig {
        depth: Some(32),
        ..Default::default()
    };
    Frontend::in_process(disk, Features::default(), &cfg).unwrap()
}

#[test]
fn one_queue_keeps_many_waiting_reads_in_flight() {
    let disk = Arc::new(SlowDisk::new(8));
    let mut f = front(disk.clone());
    let reads: Vec<IoRequest> = (0..16u64).map(|i| IoRequest::read(i * 8, 4096)).collect();
    let done = submit_all(&mut f, &reads);
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    let most = disk.state.lock().unwrap().most_reading;
    // One request at a time would never see more than one read in progress.
    assert!(most >= 8, "at most {most} reads were in progress at once");
    assert_eq!(f.detach().unwrap(), "stopped");
}

#[test]
fn a_barrier_orders_the_requests_around_it() {
    let disk = Arc::new(SlowDisk::new(4));
    let mut f = front(disk.clone());
    let data = vec![7u8; 4096];
    let mut reqs: Vec<IoRequest> = (0..4u64).map(|i| IoRequest::read(i * 8, 4096)).collect();
    reqs.push(IoRequest {
        kind: IoKind::Barrier,
        ..IoRequest::write(1000, &data)
    });
    reqs.extend((4..8u64).map(|i| IoRequest::read(i * 8, 4096)));
    let done = submit_all(&mut f, &reqs);
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    let events = disk.state.lock().unwrap().events.clone();
    let at = |e: (&'static str, u64, &'static str)| events.iter().position(|x| *x == e).unwrap();
    let barrier_start = at(("write", 1000, "start"));
    let barrier_end = at(("write", 1000, "end"));
    for i in 0..4u64 {
        assert!(at(("read", i * 8, "end")) < barrier_start, "{events:?}");
    }
    for i in 4..8u64 {
        assert!(at(("read", i * 8, "start")) > barrier_end, "{events:?}");
    }
    assert_eq!(f.detach().unwrap(), "stopped");
}
