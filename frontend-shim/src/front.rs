//! The blkfront side of one ring: requests in, responses out, over a local grant table.
//!
//! Each queue owns its ring pages and `depth` request slots; slot `i` has its own data pages
//! (and indirect pages) in the grant table, and request id `i` (as Linux blkfront does, an id
//! is in flight from submission until its response is consumed).
//!
//! Besides the well-behaved path ([`FrontQueue::submit`], [`FrontQueue::push`],
//! [`FrontQueue::wait`], [`FrontQueue::poll`]), the raw accessors ([`FrontQueue::ring`],
//! [`FrontQueue::set_req_prod_pvt`], [`FrontQueue::kick`]) let tests play a hostile guest.

use std::{
    os::fd::{AsFd, BorrowedFd},
    sync::{atomic::fence, atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use parallax::blkif::{
    abi::{
        BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment, GrantRef,
        RingIdx, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
        BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
        BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, PAGE_SIZE,
        SECTOR, SEGMENTS_PER_INDIRECT_PAGE,
    },
    event::poll_readable,
    local::{LocalEvent, LocalGrantTable, LocalPages},
    mem::{copy_from_guest, copy_to_guest},
    ring::{need_notify, SharedRing},
    EventChannel,
};

/// Frontend errors.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("no free request slot")]
    Busy,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("backend sent a bad response: {0}")]
    BadResponse(String),
    #[error("the backend has gone away")]
    BackendGone,
    #[error("{0}")]
    Transport(#[from] parallax::blkif::TransportError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    /// `FLUSH_DISKCACHE`, with or without data.
    Flush,
    /// `WRITE_BARRIER`, with or without data.
    Barrier,
    /// `DISCARD` of `sectors` sectors.
    Discard {
        secure: bool,
    },
}

/// A request to submit.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest<'a> {
    pub kind: IoKind,
    pub sector: u64,
    /// Bytes to read (reads) or sectors to discard (discard, in bytes too: `sectors * 512`).
    pub len: u64,
    /// Data to write (write, flush and barrier with data). `None` with a non-zero `len` writes
    /// whatever the slot's pages hold (benchmarks).
    pub data: Option<&'a [u8]>,
    /// Sector within the first page where the data starts (0..8): exercises `first_sect`.
    pub first_sect: u8,
    /// Use an indirect request even when the segments would fit inline.
    pub force_indirect: bool,
    /// Keep the data of a read in the completion.
    pub want_data: bool,
}

impl<'a> IoRequest<'a> {
    pub fn read(sector: u64, len: u64) -> Self {
        IoRequest {
            kind: IoKind::Read,
            sector,
            len,
            data: None,
            first_sect: 0,
            force_indirect: false,
            want_data: true,
        }
    }

    pub fn write(sector: u64, data: &'a [u8]) -> Self {
        IoRequest {
            kind: IoKind::Write,
            sector,
            len: data.len() as u64,
            data: Some(data),
            first_sect: 0,
            force_indirect: false,
            want_data: false,
        }
    }

    pub fn flush() -> Self {
        IoRequest {
            kind: IoKind::Flush,
            sector: 0,
            len: 0,
            data: None,
            first_sect: 0,
            force_indirect: false,
            want_data: false,
        }
    }

    pub fn discard(sector: u64, sectors: u64) -> Self {
        IoRequest {
            kind: IoKind::Discard { secure: false },
            sector,
            len: sectors * SECTOR,
            data: None,
            first_sect: 0,
            force_indirect: false,
            want_data: false,
        }
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The request id (slot) [`FrontQueue::submit`] returned.
    pub id: u64,
    pub status: i16,
    /// The operation byte the backend echoed.
    pub operation: u8,
    /// Read data, when asked for and successful.
    pub data: Option<Vec<u8>>,
    pub latency: Duration,
}

struct Pending {
    /// Operation expected in the response.
    echo: u8,
    len: usize,
    first_sect: u8,
    want_data: bool,
    submitted: Instant,
}

struct Slot {
    data: LocalPages,
    data_refs: Vec<GrantRef>,
    indirect: Option<LocalPages>,
    indirect_refs: Vec<GrantRef>,
    pending: Option<Pending>,
}

/// The grant references a queue uses, decided when the table is laid out.
#[derive(Debug, Clone)]
pub struct QueueLayout {
    pub ring_refs: Vec<GrantRef>,
    pub slots: Vec<(Vec<GrantRef>, Vec<GrantRef>)>,
}

/// One ring, frontend side.
pub struct FrontQueue {
    index: usize,
    ring: SharedRing,
    event: LocalEvent,
    gone: Arc<dyn AsFd + Send + Sync>,
    size: u32,
    req_prod_pvt: RingIdx,
    req_published: RingIdx,
    rsp_cons: RingIdx,
    slots: Vec<Slot>,
    free: Vec<usize>,
    max_indirect: usize,
}

impl FrontQueue {
    /// Sets up queue `index` on `table` with `layout`, initialising the shared ring.
    pub(crate) fn new(
        index: usize,
        table: &Arc<LocalGrantTable>,
        layout: &QueueLayout,
        order: u32,
        event: LocalEvent,
        gone: Arc<dyn AsFd + Send + Sync>,
        max_indirect: usize,
    ) -> Result<FrontQueue, FrontError> {
        let ring = SharedRing::new(Box::new(table.pages_for(&layout.ring_refs, true)?), order)
            .map_err(|e| FrontError::Invalid(e.to_string()))?;
        ring.init();
        let size = ring.size();
        let mut slots = Vec::with_capacity(layout.slots.len());
        for (data_refs, indirect_refs) in &layout.slots {
            slots.push(Slot {
                data: table.pages_for(data_refs, true)?,
                data_refs: data_refs.clone(),
                indirect: if indirect_refs.is_empty() {
                    None
                } else {
                    Some(table.pages_for(indirect_refs, true)?)
                },
                indirect_refs: indirect_refs.clone(),
                pending: None,
            });
        }
        let free = (0..slots.len()).rev().collect();
        Ok(FrontQueue {
            index,
            ring,
            event,
            gone,
            size,
            req_prod_pvt: 0,
            req_published: 0,
            rsp_cons: 0,
            slots,
            free,
            max_indirect,
        })
    }

    /// Replaces what signals "backend gone".
    pub(crate) fn set_gone(&mut self, gone: Arc<dyn AsFd + Send + Sync>) {
        self.gone = gone;
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Ring entries.
    pub fn ring_size(&self) -> u32 {
        self.size
    }

    /// Request slots (the most requests in flight).
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Largest request in bytes (starting at sector 0 of a page).
    pub fn max_request_bytes(&self) -> u64 {
        (self.slots.first().map_or(0, |s| s.data_refs.len()) * PAGE_SIZE) as u64
    }

    /// Whether another request can be submitted now.
    pub fn can_submit(&self) -> bool {
        !self.free.is_empty() && self.req_prod_pvt.wrapping_sub(self.rsp_cons) < self.size
    }

    /// Writes a request into the ring (not yet visible: see [`FrontQueue::push`]).
    /// Returns its id.
    pub fn submit(&mut self, req: &IoRequest<'_>) -> Result<u64, FrontError> {
        if !self.can_submit() {
            return Err(FrontError::Busy);
        }
        let slot_no = *self.free.last().expect("checked non-empty");
        let id = slot_no as u64;
        let (entry, echo) = match req.kind {
            IoKind::Discard { secure } => {
                if req.len % SECTOR != 0 {
                    return Err(FrontError::Invalid(
                        "discard length is not whole sectors".into(),
                    ));
                }
                let d = BlkifRequestDiscard {
                    operation: BLKIF_OP_DISCARD,
                    flag: if secure { BLKIF_DISCARD_SECURE } else { 0 },
                    handle: 0,
                    id,
                    sector_number: req.sector,
                    nr_sectors: req.len / SECTOR,
                };
                (d.encode(), BLKIF_OP_DISCARD)
            }
            kind => self.data_request(slot_no, kind, req)?,
        };
        self.slots[slot_no].pending = Some(Pending {
            echo,
            len: req.len as usize,
            first_sect: req.first_sect,
            want_data: req.want_data && req.kind == IoKind::Read,
            submitted: Instant::now(),
        });
        self.free.pop();
        self.ring.write_entry(self.req_prod_pvt, &entry);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(id)
    }

    fn data_request(
        &mut self,
        slot_no: usize,
        kind: IoKind,
        req: &IoRequest<'_>,
    ) -> Result<([u8; 112], u8), FrontError> {
        let op = match kind {
            IoKind::Read => BLKIF_OP_READ,
            IoKind::Write => BLKIF_OP_WRITE,
            IoKind::Flush => BLKIF_OP_FLUSH_DISKCACHE,
            IoKind::Barrier => BLKIF_OP_WRITE_BARRIER,
            IoKind::Discard { .. } => unreachable!("handled by the caller"),
        };
        if req.first_sect >= 8 || req.len % SECTOR != 0 {
            return Err(FrontError::Invalid(
                "data must be whole sectors, first_sect < 8".into(),
            ));
        }
        if let Some(d) = req.data {
            if d.len() as u64 != req.len {
                return Err(FrontError::Invalid("data length differs from len".into()));
            }
        }
        if matches!(kind, IoKind::Read | IoKind::Write) && req.len == 0 {
            return Err(FrontError::Invalid("empty read or write".into()));
        }
        let start = usize::from(req.first_sect) * SECTOR as usize;
        let total = start + req.len as usize;
        let npages = total.div_ceil(PAGE_SIZE);
        let slot = &self.slots[slot_no];
        if npages > slot.data_refs.len() {
            return Err(FrontError::Invalid(format!(
                "{} bytes do not fit a request",
                req.len
            )));
        }
        // Segments: page i covers [max(start, i*4K), min(total, (i+1)*4K)).
        let mut segs = Vec::with_capacity(npages);
        for i in 0..npages {
            let lo = start.max(i * PAGE_SIZE) - i * PAGE_SIZE;
            let hi = total.min((i + 1) * PAGE_SIZE) - i * PAGE_SIZE;
            segs.push(BlkifRequestSegment {
                gref: slot.data_refs[i],
                first_sect: (lo / SECTOR as usize) as u8,
                last_sect: (hi / SECTOR as usize - 1) as u8,
            });
            if let Some(d) = req.data {
                let from = i * PAGE_SIZE + lo - start;
                copy_to_guest(&slot.data, i, lo, &d[from..from + (hi - lo)]);
            }
        }
        let indirect = req.force_indirect || segs.len() > BLKIF_MAX_SEGMENTS_PER_REQUEST;
        if !indirect {
            let mut r = BlkifRequest {
                operation: op,
                nr_segments: segs.len() as u8,
                handle: 0,
                id: slot_no as u64,
                sector_number: req.sector,
                ..Default::default()
            };
            r.seg[..segs.len()].copy_from_slice(&segs);
            return Ok((r.encode(), op));
        }
        if !matches!(kind, IoKind::Read | IoKind::Write) || segs.len() > self.max_indirect {
            return Err(FrontError::Invalid(
                "request needs an indirect request the backend does not offer".into(),
            ));
        }
        let ind_pages = slot
            .indirect
            .as_ref()
            .ok_or_else(|| FrontError::Invalid("no indirect pages".into()))?;
        let mut grefs = [0; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        for (p, chunk) in segs.chunks(SEGMENTS_PER_INDIRECT_PAGE).enumerate() {
            let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.encode()).collect();
            copy_to_guest(ind_pages, p, 0, &bytes);
            grefs[p] = slot.indirect_refs[p];
        }
        let r = BlkifRequestIndirect {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: op,
            nr_segments: segs.len() as u16,
            id: slot_no as u64,
            sector_number: req.sector,
            handle: 0,
            indirect_grefs: grefs,
        };
        Ok((r.encode(), op))
    }

    /// Publishes submitted requests and kicks the backend if it asked
    /// (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`). Returns whether it kicked.
    pub fn push(&mut self) -> Result<bool, FrontError> {
        let old = self.req_published;
        let new = self.req_prod_pvt;
        if old == new {
            return Ok(false);
        }
        self.ring.set_req_prod(new);
        self.req_published = new;
        fence(Ordering::SeqCst);
        if need_notify(new, old, self.ring.req_event()) {
            self.kick()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Kicks the backend unconditionally.
    pub fn kick(&self) -> Result<(), FrontError> {
        self.event.notify().map_err(FrontError::from)
    }

    /// Arms `rsp_event` and reports whether responses are waiting
    /// (`RING_FINAL_CHECK_FOR_RESPONSES`). When false, sleeping on [`FrontQueue::event_fd`] is
    /// safe.
    pub fn prepare_wait(&self) -> bool {
        if self.ring.rsp_prod() != self.rsp_cons {
            return true;
        }
        self.ring.set_rsp_event(self.rsp_cons.wrapping_add(1));
        fence(Ordering::SeqCst);
        self.ring.rsp_prod() != self.rsp_cons
    }

    /// Readable when the backend notified us.
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.event.incoming().as_fd()
    }

    /// Readable when the backend is going away.
    pub fn gone_fd(&self) -> BorrowedFd<'_> {
        self.gone.as_fd()
    }

    /// Waits until responses are available (true), `timeout` passes (false), or the backend
    /// goes away (error).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<bool, FrontError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.prepare_wait() {
                return Ok(true);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(false);
            }
            let ready = poll_readable(&[self.event_fd(), self.gone_fd()], left)?;
            if ready[0] {
                self.event.incoming().drain()?;
            } else if ready[1] {
                // One last look: the backend answers what it saw before leaving.
                if self.ring.rsp_prod() != self.rsp_cons {
                    return Ok(true);
                }
                return Err(FrontError::BackendGone);
            }
        }
    }

    /// Consumes the responses available now.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, FrontError> {
        let prod = self.ring.rsp_prod();
        if prod.wrapping_sub(self.rsp_cons) > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(FrontError::BadResponse(format!(
                "rsp_prod {prod} is past the requests produced ({})",
                self.req_prod_pvt
            )));
        }
        let mut n = 0;
        while self.rsp_cons != prod {
            let rsp = self.ring.read_response(self.rsp_cons);
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
            let slot_no = rsp.id as usize;
            let pending = self
                .slots
                .get_mut(slot_no)
                .and_then(|s| s.pending.take())
                .ok_or_else(|| {
                    FrontError::BadResponse(format!("response for id {} not in flight", rsp.id))
                })?;
            if rsp.operation != pending.echo {
                return Err(FrontError::BadResponse(format!(
                    "response to op {} echoes op {}",
                    pending.echo, rsp.operation
                )));
            }
            let data = (pending.want_data && rsp.status == 0)
                .then(|| self.read_slot(slot_no, pending.first_sect, pending.len));
            self.free.push(slot_no);
            out.push(Completion {
                id: rsp.id,
                status: rsp.status,
                operation: rsp.operation,
                data,
                latency: pending.submitted.elapsed(),
            });
            n += 1;
        }
        Ok(n)
    }

    fn read_slot(&self, slot_no: usize, first_sect: u8, len: usize) -> Vec<u8> {
        let slot = &self.slots[slot_no];
        let start = usize::from(first_sect) * SECTOR as usize;
        let mut out = vec![0u8; len];
        let mut pos = 0;
        while pos < len {
            let abs = start + pos;
            let (page, off) = (abs / PAGE_SIZE, abs % PAGE_SIZE);
            let n = (PAGE_SIZE - off).min(len - pos);
            copy_from_guest(&slot.data, page, off, &mut out[pos..pos + n]);
            pos += n;
        }
        out
    }

    /// Submits one request, pushes it, and waits for its completion (other completions that
    /// arrive meanwhile are dropped: use this only with nothing else in flight).
    pub fn run(&mut self, req: &IoRequest<'_>) -> Result<Completion, FrontError> {
        let id = self.submit(req)?;
        self.push()?;
        let mut out = Vec::new();
        loop {
            self.wait(None)?;
            self.poll(&mut out)?;
            if let Some(c) = out.iter().position(|c| c.id == id) {
                return Ok(out.swap_remove(c));
            }
        }
    }

    // --- raw access, for tests that play a misbehaving guest ---

    /// The shared ring: write any bytes into any slot, set any index.
    pub fn ring(&self) -> &SharedRing {
        &self.ring
    }

    /// The private producer index (the next slot [`FrontQueue::submit`] fills).
    pub fn req_prod_pvt(&self) -> RingIdx {
        self.req_prod_pvt
    }

    /// Moves the private producer index; the next [`FrontQueue::push`] publishes it.
    pub fn set_req_prod_pvt(&mut self, v: RingIdx) {
        self.req_prod_pvt = v;
    }

    /// The response consumer index.
    pub fn rsp_cons(&self) -> RingIdx {
        self.rsp_cons
    }

    /// Grant references of slot `slot`'s data and indirect pages.
    pub fn slot_refs(&self, slot: usize) -> (&[GrantRef], &[GrantRef]) {
        let s = &self.slots[slot];
        (&s.data_refs, &s.indirect_refs)
    }
}
