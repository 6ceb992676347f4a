//! The fixed-newstyle handshake as a pure state machine: bytes in, reply bytes and
//! [`Step`]s out. It never touches a socket or the [`DiskProvider`](crate::disk::DiskProvider):
//! when it needs to know about exports it returns a [`Query`], and the caller (the event loop,
//! through a worker thread) feeds the [`Answer`] back.
//!
//! ```text
//!   greeting ─► client flags ─► option ─┬─ LIST / INFO / META ─► Query ─► Answer ─► replies ─┐
//!                                       ├─ STRUCTURED_REPLY, unknown ─► reply ───────────────┤
//!                                       ├─ ABORT ─► ACK, Step::Abort                          │
//!                                       └─ GO / EXPORT_NAME ─► Query::Open ─► Step::Transmission
//!                          ▲                                                                  │
//!                          └──────────────────────────── next option ◄────────────────────────┘
//! ```

use crate::disk::{ExportInfo, OpenError};

use super::proto::*;

/// Options longer than this are skipped without being buffered and answered with
/// `NBD_REP_ERR_TOO_BIG`. The largest legitimate option (`NBD_OPT_SET_META_CONTEXT` with a
/// 4096-byte name and a few queries) is far below it.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

use super::meta::Contexts;
pub use super::meta::BASE_ALLOCATION_ID;

/// Minimum and preferred block sizes we advertise.
/// Advertised minimum block size: any byte range works (sub-block writes are read-modify-write
/// in the store), as qemu-nbd offers for raw files; libnbd's strict mode checks against it.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// Limits that protect the server from a hostile client during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Options allowed in one handshake; the next one ends the connection.
    pub max_options: u32,
    /// Options with more data than this are skipped and refused.
    pub max_option_len: u32,
    /// Largest request the transmission phase accepts: the advertised maximum block size.
    pub max_request_bytes: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_options: 256,
            max_option_len: MAX_OPTION_LEN,
            max_request_bytes: 64 << 20,
        }
    }
}

/// What the handshake needs to know from the export catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Every export (`NBD_OPT_LIST`). Answer with [`Answer::List`].
    List,
    /// Facts about one export (`NBD_OPT_INFO`, meta context options). Answer with
    /// [`Answer::Lookup`].
    Lookup(String),
    /// Open an export for transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`): writable unless
    /// the export is read-only. Answer with [`Answer::Open`] describing what was opened.
    Open(String),
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    List(Vec<ExportInfo>),
    Lookup(Option<ExportInfo>),
    Open(Result<ExportInfo, OpenError>),
}

/// What the handshake agreed on, for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`, so it promised to honour
    /// the advertised constraints: misaligned requests are then errors.
    pub block_size_negotiated: bool,
    /// The metadata contexts the client selected for this export (IDs: [`super::meta`]).
    pub contexts: Contexts,
    /// Maximum request length advertised.
    pub max_request_bytes: u32,
}

/// How the caller should continue after [`Handshake::advance`] or [`Handshake::answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Progress was made; call `advance` again with the remaining input.
    Continue,
    /// More input is needed than was given.
    NeedInput,
    /// Look something up and call [`Handshake::answer`]; until then, do not call `advance`.
    Query(Query),
    /// The handshake is over: send the output, then start the transmission phase.
    Transmission(Negotiated),
    /// The client asked to end the session (`NBD_OPT_ABORT`): send the output, then close.
    Abort,
    /// The client broke the protocol or its export could not be opened with
    /// `NBD_OPT_EXPORT_NAME`: close the connection (after sending any output).
    Fail(HandshakeError),
    /// `NBD_OPT_STARTTLS` was acknowledged: send the output, run the TLS handshake on the
    /// socket, then call [`Handshake::tls_started`] and go on.
    StartTls,
}

/// What the server offers for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS configured: STARTTLS is unsupported.
    Unavailable,
    /// STARTTLS is offered; plaintext clients are served too.
    Optional,
    /// Nothing but STARTTLS and ABORT until the client upgrades.
    Required,
}

/// Why the handshake ended the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("more than {0} options")]
    TooManyOptions(u32),
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    BadExportName,
    #[error("NBD_OPT_EXPORT_NAME failed: {0}")]
    ExportNameFailed(OpenError),
    #[error("answer does not match the pending query")]
    UnexpectedAnswer,
    #[error("handshake already finished")]
    Finished,
    #[error("NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    List,
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    ExportName,
    Meta {
        set: bool,
        name: String,
        queries: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    Options,
    Discard { option: u32, remaining: u64 },
    Waiting(Pending),
    Done,
}

/// The contexts selected by the last `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MetaSelection {
    export: String,
    contexts: Contexts,
}

/// One connection's handshake. Create it, send [`Handshake::greeting`], then feed the
/// client's bytes to [`Handshake::advance`] and send what [`Handshake::take_output`] returns.
#[derive(Debug)]
pub struct Handshake {
    limits: HandshakeLimits,
    phase: Phase,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options: u32,
    out: Vec<u8>,
    tls: TlsPolicy,
    /// The TLS handshake finished on this connection.
    in_tls: bool,
}

impl Handshake {
    /// A handshake on a server without TLS.
    pub fn new(limits: HandshakeLimits) -> Self {
        Handshake::with_tls(limits, TlsPolicy::Unavailable)
    }

    pub fn with_tls(limits: HandshakeLimits, tls: TlsPolicy) -> Self {
        Handshake {
            limits,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta: None,
            options: 0,
            out: Vec::new(),
            tls,
            in_tls: false,
        }
    }

    /// The TLS handshake that [`Step::StartTls`] asked for succeeded: haggling starts again,
    /// and nothing negotiated before it counts (the spec's rule against downgrades).
    pub fn tls_started(&mut self) {
        self.in_tls = true;
        self.structured = false;
        self.meta = None;
    }

    /// Options other than STARTTLS and ABORT must wait for TLS.
    fn tls_required(&self) -> bool {
        self.tls == TlsPolicy::Required && !self.in_tls
    }

    /// The bytes the server sends as soon as a client connects.
    pub fn greeting() -> [u8; GREETING_LEN] {
        encode_greeting()
    }

    /// Bytes to send to the client, accumulated since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// True while a [`Query`] is outstanding.
    pub fn waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting(_))
    }

    /// Consumes at most one client message from the front of `input`. Returns how many bytes
    /// were consumed and what to do next. Never panics, whatever the input.
    pub fn advance(&mut self, input: &[u8]) -> (usize, Step) {
        match &mut self.phase {
            Phase::ClientFlags => {
                let Some(flags) = get_u32(input, 0) else {
                    return (0, Step::NeedInput);
                };
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    self.phase = Phase::Done;
                    return (
                        CLIENT_FLAGS_LEN,
                        Step::Fail(HandshakeError::BadClientFlags(flags)),
                    );
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.phase = Phase::Options;
                (CLIENT_FLAGS_LEN, Step::Continue)
            }
            Phase::Options => {
                if input.len() < OPTION_HEADER_LEN {
                    return (0, Step::NeedInput);
                }
                let header = match OptionHeader::decode(input) {
                    Ok(h) => h,
                    Err(WireError::BadMagic(m)) => {
                        self.phase = Phase::Done;
                        return (0, Step::Fail(HandshakeError::BadOptionMagic(m)));
                    }
                    Err(WireError::Short) => return (0, Step::NeedInput),
                };
                let oversized = header.len > self.limits.max_option_len;
                let total = OPTION_HEADER_LEN + header.len as usize;
                if !oversized && input.len() < total {
                    return (0, Step::NeedInput);
                }
                self.options += 1;
                if self.options > self.limits.max_options {
                    self.phase = Phase::Done;
                    let max = self.limits.max_options;
                    return (
                        OPTION_HEADER_LEN,
                        Step::Fail(HandshakeError::TooManyOptions(max)),
                    );
                }
                if oversized {
                    if header.option == OPT_EXPORT_NAME {
                        // This option cannot be answered with an error.
                        self.phase = Phase::Done;
                        return (OPTION_HEADER_LEN, Step::Fail(HandshakeError::BadExportName));
                    }
                    self.phase = Phase::Discard {
                        option: header.option,
                        remaining: header.len.into(),
                    };
                    return (OPTION_HEADER_LEN, Step::Continue);
                }
                let step = self.option(header.option, &input[OPTION_HEADER_LEN..total]);
                (total, step)
            }
            Phase::Discard { option, remaining } => {
                if input.is_empty() {
                    return (0, Step::NeedInput);
                }
                let n = (input.len() as u64).min(*remaining);
                *remaining -= n;
                if *remaining == 0 {
                    let option = *option;
                    self.phase = Phase::Options;
                    self.error(option, REP_ERR_TOO_BIG, "option data too long");
                }
                (n as usize, Step::Continue)
            }
            Phase::Waiting(_) => (0, Step::NeedInput),
            Phase::Done => (0, Step::Fail(HandshakeError::Finished)),
        }
    }

    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        put_option_reply(&mut self.out, option, reply, data);
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(option, reply, message.as_bytes());
    }

    fn wait(&mut self, pending: Pending, query: Query) -> Step {
        self.phase = Phase::Waiting(pending);
        Step::Query(query)
    }

    /// Handles one complete option with its data.
    fn option(&mut self, option: u32, data: &[u8]) -> Step {
        if self.tls_required() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                // This option cannot be answered with an error.
                self.phase = Phase::Done;
                return Step::Fail(HandshakeError::TlsRequired);
            }
            self.error(
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            );
            return Step::Continue;
        }
        match option {
            OPT_STARTTLS => {
                if self.tls == TlsPolicy::Unavailable {
                    self.error(
                        option,
                        REP_ERR_UNSUP,
                        "TLS is not configured on this server",
                    );
                } else if self.in_tls {
                    self.error(option, REP_ERR_INVALID, "TLS is already on");
                } else if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else {
                    self.reply(option, REP_ACK, &[]);
                    return Step::StartTls;
                }
                Step::Continue
            }
            OPT_EXPORT_NAME => match parse_string(data) {
                Some(name) => self.wait(Pending::ExportName, Query::Open(name)),
                None => {
                    self.phase = Phase::Done;
                    Step::Fail(HandshakeError::BadExportName)
                }
            },
            OPT_ABORT => {
                // The spec asks servers to ignore any data sent with ABORT.
                self.reply(option, REP_ACK, &[]);
                self.phase = Phase::Done;
                Step::Abort
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Step::Continue;
                }
                self.wait(Pending::List, Query::List)
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                Ok((name, requests)) => {
                    let go = option == OPT_GO;
                    let query = if go {
                        Query::Open(name.clone())
                    } else {
                        Query::Lookup(name.clone())
                    };
                    self.wait(Pending::Info { go, name, requests }, query)
                }
                Err(why) => {
                    self.error(option, REP_ERR_INVALID, why);
                    Step::Continue
                }
            },
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                } else {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection even when it fails.
                    self.meta = None;
                }
                if !self.structured {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    );
                    return Step::Continue;
                }
                match parse_meta_request(data) {
                    Ok((name, queries)) => self.wait(
                        Pending::Meta {
                            set,
                            name: name.clone(),
                            queries,
                        },
                        Query::Lookup(name),
                    ),
                    Err(why) => {
                        self.error(option, REP_ERR_INVALID, why);
                        Step::Continue
                    }
                }
            }
            _ => {
                // EXTENDED_HEADERS and anything unknown.
                self.error(option, REP_ERR_UNSUP, "option not supported");
                Step::Continue
            }
        }
    }

    /// Feeds the answer to the outstanding [`Query`].
    pub fn answer(&mut self, answer: Answer) -> Step {
        let Phase::Waiting(pending) = std::mem::replace(&mut self.phase, Phase::Options) else {
            self.phase = Phase::Done;
            return Step::Fail(HandshakeError::UnexpectedAnswer);
        };
        match (pending, answer) {
            (Pending::List, Answer::List(exports)) => {
                for e in &exports {
                    let name = clamp_str(&e.name);
                    let mut data = Vec::with_capacity(4 + name.len() + e.description.len());
                    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    data.extend_from_slice(name.as_bytes());
                    data.extend_from_slice(clamp_str(&e.description).as_bytes());
                    self.reply(OPT_LIST, REP_SERVER, &data);
                }
                self.reply(OPT_LIST, REP_ACK, &[]);
                Step::Continue
            }
            (
                Pending::Info {
                    go: false,
                    requests,
                    ..
                },
                Answer::Lookup(found),
            ) => match found {
                Some(export) => {
                    self.info_replies(OPT_INFO, &export, &requests);
                    self.reply(OPT_INFO, REP_ACK, &[]);
                    Step::Continue
                }
                None => {
                    self.error(OPT_INFO, REP_ERR_UNKNOWN, "no such export");
                    Step::Continue
                }
            },
            (
                Pending::Info {
                    go: true,
                    name,
                    requests,
                },
                Answer::Open(opened),
            ) => match opened {
                Ok(export) => {
                    self.info_replies(OPT_GO, &export, &requests);
                    self.reply(OPT_GO, REP_ACK, &[]);
                    let block_size_negotiated = requests.contains(&INFO_BLOCK_SIZE);
                    self.enter(export, &name, block_size_negotiated)
                }
                Err(e) => {
                    let (code, msg) = open_error_reply(&e);
                    self.error(OPT_GO, code, &msg);
                    Step::Continue
                }
            },
            (Pending::ExportName, Answer::Open(opened)) => match opened {
                Ok(export) => {
                    let flags = transmission_flags(export.read_only, self.structured);
                    self.out.extend_from_slice(&export.size.to_be_bytes());
                    self.out.extend_from_slice(&flags.to_be_bytes());
                    if !self.no_zeroes {
                        self.out.extend_from_slice(&[0u8; 124]);
                    }
                    let name = export.name.clone();
                    self.enter(export, &name, false)
                }
                Err(e) => {
                    self.phase = Phase::Done;
                    Step::Fail(HandshakeError::ExportNameFailed(e))
                }
            },
            (Pending::Meta { set, name, queries }, Answer::Lookup(found)) => {
                let option = if set {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                };
                if found.is_none() {
                    self.error(option, REP_ERR_UNKNOWN, "no such export");
                    return Step::Continue;
                }
                let selected = Contexts::from_queries(&queries, set);
                for (id, context) in selected.named() {
                    let mut data = if set { id } else { 0 }.to_be_bytes().to_vec();
                    data.extend_from_slice(context.as_bytes());
                    self.reply(option, REP_META_CONTEXT, &data);
                }
                if set {
                    self.meta = Some(MetaSelection {
                        export: name,
                        contexts: selected,
                    });
                }
                self.reply(option, REP_ACK, &[]);
                Step::Continue
            }
            _ => {
                self.phase = Phase::Done;
                Step::Fail(HandshakeError::UnexpectedAnswer)
            }
        }
    }

    fn enter(&mut self, export: ExportInfo, name: &str, block_size_negotiated: bool) -> Step {
        self.phase = Phase::Done;
        let contexts = match &self.meta {
            Some(m) if m.export == name => m.contexts,
            _ => Contexts::default(),
        };
        Step::Transmission(Negotiated {
            flags: transmission_flags(export.read_only, self.structured),
            export,
            structured: self.structured,
            block_size_negotiated,
            contexts,
            max_request_bytes: self.limits.max_request_bytes,
        })
    }

    /// `NBD_REP_INFO` replies for INFO/GO: the export (always), its name and description when
    /// asked, and our block size constraints (always; clients may ignore them).
    fn info_replies(&mut self, option: u32, export: &ExportInfo, requests: &[u16]) {
        let flags = transmission_flags(export.read_only, self.structured);
        let mut data = INFO_EXPORT.to_be_bytes().to_vec();
        data.extend_from_slice(&export.size.to_be_bytes());
        data.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, REP_INFO, &data);
        if requests.contains(&INFO_NAME) {
            let mut data = INFO_NAME.to_be_bytes().to_vec();
            data.extend_from_slice(clamp_str(&export.name).as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut data = INFO_DESCRIPTION.to_be_bytes().to_vec();
            data.extend_from_slice(clamp_str(&export.description).as_bytes());
            self.reply(option, REP_INFO, &data);
        }
        let mut data = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        data.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        data.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        data.extend_from_slice(&self.limits.max_request_bytes.to_be_bytes());
        self.reply(option, REP_INFO, &data);
    }
}

/// The transmission flags for an export.
pub fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_CACHE
        // A Disk flush covers writes acknowledged on every handle (see disk.rs).
        | FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn open_error_reply(e: &OpenError) -> (u32, String) {
    let code = match e {
        OpenError::NotFound(_) => REP_ERR_UNKNOWN,
        OpenError::Busy { .. } | OpenError::ReadOnly(_) | OpenError::Denied(_) => REP_ERR_POLICY,
        OpenError::Other(_) => REP_ERR_UNKNOWN,
    };
    let mut msg = e.to_string();
    msg.truncate(floor_char_boundary(&msg, MAX_STRING));
    (code, msg)
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// A string cut to the protocol's 4096-byte limit at a character boundary.
fn clamp_str(s: &str) -> &str {
    &s[..floor_char_boundary(s, MAX_STRING)]
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn parse_string(b: &[u8]) -> Option<String> {
    if b.len() > MAX_STRING || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok().map(str::to_owned)
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: name length, name, request count,
/// requests. The lengths must account for every byte.
pub fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), &'static str> {
    let name_len = get_u32(data, 0).ok_or("option too short")? as usize;
    let name_end = 4usize.checked_add(name_len).ok_or("bad name length")?;
    let name = data
        .get(4..name_end)
        .ok_or("name length exceeds the option")?;
    let name = parse_string(name).ok_or("invalid export name")?;
    let count = get_u16(data, name_end).ok_or("option too short")? as usize;
    let reqs = &data[name_end + 2..];
    if reqs.len() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let requests = reqs
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, requests))
}

/// Parses the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export name
/// and queries. The lengths must account for every byte.
pub fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), &'static str> {
    let name_len = get_u32(data, 0).ok_or("option too short")? as usize;
    let name_end = 4usize.checked_add(name_len).ok_or("bad name length")?;
    let name = data
        .get(4..name_end)
        .ok_or("name length exceeds the option")?;
    let name = parse_string(name).ok_or("invalid export name")?;
    let count = get_u32(data, name_end).ok_or("option too short")?;
    let mut at = name_end + 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = get_u32(data, at).ok_or("query count exceeds the option")? as usize;
        let end = (at + 4).checked_add(len).ok_or("bad query length")?;
        let q = data
            .get(at + 4..end)
            .ok_or("query length exceeds the option")?;
        queries.push(parse_string(q).ok_or("invalid query")?);
        at = end;
    }
    if at != data.len() {
        return Err("trailing data after the queries");
    }
    Ok((name, queries))
}

/// Runs a whole handshake over `data` against a fixed catalogue (`disk` read-write,
/// `disk@snap` read-only), answering every query, until the handshake ends or the input runs
/// out. A fuzz target's entry point; never panics.
pub fn fuzz_handshake(data: &[u8]) {
    let exports = vec![
        ExportInfo {
            name: "disk".into(),
            description: "d".into(),
            size: 1 << 20,
            read_only: false,
        },
        ExportInfo {
            name: "disk@snap".into(),
            description: String::new(),
            size: 4096,
            read_only: true,
        },
    ];
    // TLS offered: a STARTTLS "succeeds" at once, so the options after it are explored too.
    let mut hs = Handshake::with_tls(
        HandshakeLimits {
            max_options: 64,
            ..Default::default()
        },
        TlsPolicy::Optional,
    );
    let mut at = 0usize;
    loop {
        let (n, step) = hs.advance(&data[at..]);
        at += n;
        let step = match step {
            Step::Query(q) => hs.answer(fuzz_answer(&exports, q)),
            Step::StartTls => {
                hs.tls_started();
                Step::Continue
            }
            other => other,
        };
        let _ = hs.take_output();
        // Every `Continue` consumed input or finished a query, so this loop ends.
        if step != Step::Continue {
            return;
        }
    }
}

fn fuzz_answer(exports: &[ExportInfo], q: Query) -> Answer {
    let find = |n: &str| exports.iter().find(|e| e.name == n).cloned();
    match q {
        Query::List => Answer::List(exports.to_vec()),
        Query::Lookup(n) => Answer::Lookup(find(&n)),
        Query::Open(n) => Answer::Open(find(&n).ok_or(OpenError::NotFound(n))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn export(name: &str, ro: bool) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: format!("{name} desc"),
            size: 1 << 20,
            read_only: ro,
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Decoded option replies: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(get_u64(out, 0), Some(OPT_REPLY_MAGIC));
            let len = get_u32(out, 16).unwrap() as usize;
            v.push((
                get_u32(out, 8).unwrap(),
                get_u32(out, 12).unwrap(),
                out[20..20 + len].to_vec(),
            ));
            out = &out[20 + len..];
        }
        v
    }

    /// Drives `input` through a handshake, answering queries from `exports`.
    fn run(hs: &mut Handshake, input: &[u8], exports: &[ExportInfo]) -> (Vec<u8>, Step) {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            let (n, step) = hs.advance(&input[at..]);
            at += n;
            let step = match step {
                Step::Query(q) => hs.answer(fuzz_answer(exports, q)),
                s => s,
            };
            out.extend(hs.take_output());
            match step {
                Step::Continue => continue,
                s => return (out, s),
            }
        }
    }

    fn started(flags: u32) -> Handshake {
        let mut hs = Handshake::new(HandshakeLimits::default());
        assert_eq!(hs.advance(&flags.to_be_bytes()), (4, Step::Continue));
        hs
    }

    fn started_tls(policy: TlsPolicy) -> Handshake {
        let mut hs = Handshake::with_tls(HandshakeLimits::default(), policy);
        let flags = FLAG_C_FIXED_NEWSTYLE.to_be_bytes();
        assert_eq!(hs.advance(&flags), (4, Step::Continue));
        hs
    }

    #[test]
    fn required_tls_refuses_everything_but_starttls_and_abort() {
        let exports = [export("vm1", false)];
        let mut hs = started_tls(TlsPolicy::Required);
        let mut input = opt(OPT_LIST, &[]);
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_GO, &go_data("vm1", &[])));
        input.extend(opt(OPT_STARTTLS, &[1]));
        input.extend(opt(OPT_STARTTLS, &[]));
        let (out, step) = run(&mut hs, &input, &exports);
        assert_eq!(step, Step::StartTls);
        let r: Vec<(u32, u32)> = replies(&out).iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(
            r,
            [
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_STARTTLS, REP_ACK),
            ]
        );
        // Inside TLS: haggling starts again and a second STARTTLS is refused.
        hs.tls_started();
        let mut input = opt(OPT_STARTTLS, &[]);
        input.extend(opt(OPT_GO, &go_data("vm1", &[])));
        let (out, step) = run(&mut hs, &input, &exports);
        assert!(
            matches!(step, Step::Transmission(ref n) if !n.structured),
            "{step:?}"
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        // EXPORT_NAME cannot be refused with an error: the connection ends.
        let mut hs = started_tls(TlsPolicy::Required);
        let (_, step) = run(&mut hs, &opt(OPT_EXPORT_NAME, b"vm1"), &exports);
        assert_eq!(step, Step::Fail(HandshakeError::TlsRequired));
    }

    #[test]
    fn starttls_forgets_what_was_negotiated_before() {
        let exports = [export("vm1", false)];
        let mut hs = started_tls(TlsPolicy::Optional);
        let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(OPT_STARTTLS, &[]));
        let (out, step) = run(&mut hs, &input, &exports);
        assert_eq!(step, Step::StartTls);
        assert_eq!(replies(&out).len(), 2);
        hs.tls_started();
        let (_, step) = run(&mut hs, &opt(OPT_GO, &go_data("vm1", &[])), &exports);
        assert!(
            matches!(step, Step::Transmission(ref n) if !n.structured),
            "{step:?}"
        );
        // Without TLS configured, STARTTLS is unsupported and plaintext goes on.
        let mut hs = started(FLAG_C_FIXED_NEWSTYLE);
        let (out, _) = run(&mut hs, &opt(OPT_STARTTLS, &[]), &exports);
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
    }

    #[test]
    fn client_flags() {
        let mut hs = Handshake::new(HandshakeLimits::default());
        assert_eq!(hs.advance(&[0, 0, 0]), (0, Step::NeedInput));
        assert!(matches!(
            hs.advance(&[0, 0, 0, 4]),
            (4, Step::Fail(HandshakeError::BadClientFlags(4)))
        ));
    }

    #[test]
    fn go_negotiates_everything() {
        let exports = [export("vm1", false)];
        let mut hs = started(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data("vm1", &["base:allocation", "qemu:x"]),
        ));
        input.extend(opt(
            OPT_GO,
            &go_data("vm1", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        ));
        let (out, step) = run(&mut hs, &input, &exports);
        let Step::Transmission(n) = step else {
            panic!("{step:?}")
        };
        assert!(n.structured && n.block_size_negotiated);
        assert!(n.contexts.base_allocation);
        assert_eq!(n.contexts.hash_parts, 0);
        assert_eq!(n.flags & FLAG_READ_ONLY, 0);
        assert_ne!(n.flags & FLAG_SEND_DF, 0);
        let r = replies(&out);
        assert_eq!(r[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
        assert_eq!(r[1].1, REP_META_CONTEXT);
        assert_eq!(&r[1].2[4..], b"base:allocation");
        assert_eq!(r[2], (OPT_SET_META_CONTEXT, REP_ACK, vec![]));
        let infos: Vec<_> = r[3..r.len() - 1]
            .iter()
            .map(|x| get_u16(&x.2, 0).unwrap())
            .collect();
        assert!(infos.contains(&INFO_EXPORT) && infos.contains(&INFO_BLOCK_SIZE));
        assert!(infos.contains(&INFO_NAME) && infos.contains(&INFO_DESCRIPTION));
        let exp = r
            .iter()
            .find(|x| x.1 == REP_INFO && get_u16(&x.2, 0) == Some(INFO_EXPORT))
            .unwrap();
        assert_eq!(exp.2.len(), 12);
        assert_eq!(get_u64(&exp.2, 2), Some(1 << 20));
        let bs = r
            .iter()
            .find(|x| x.1 == REP_INFO && get_u16(&x.2, 0) == Some(INFO_BLOCK_SIZE))
            .unwrap();
        assert_eq!(bs.2.len(), 14);
        assert_eq!(get_u32(&bs.2, 2), Some(1));
        assert_eq!(get_u32(&bs.2, 6), Some(4096));
        assert_eq!(get_u32(&bs.2, 10), Some(64 << 20));
        assert_eq!(*r.last().unwrap(), (OPT_GO, REP_ACK, vec![]));
    }

    #[test]
    fn meta_context_for_another_export_is_not_used() {
        let exports = [export("a", false), export("b", false)];
        let mut hs = started(1);
        let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data("a", &["base:allocation"]),
        ));
        input.extend(opt(OPT_GO, &go_data("b", &[])));
        let (_, step) = run(&mut hs, &input, &exports);
        let Step::Transmission(n) = step else {
            panic!()
        };
        assert!(n.contexts.is_empty());
        assert!(!n.block_size_negotiated);
    }

    #[test]
    fn meta_needs_structured_replies() {
        let mut hs = started(1);
        let input = opt(OPT_SET_META_CONTEXT, &meta_data("a", &["base:allocation"]));
        let (out, step) = run(&mut hs, &input, &[export("a", false)]);
        assert_eq!(step, Step::NeedInput);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn list_meta_context_wildcards() {
        let exports = [export("a", false)];
        let listed = |queries: &[&str]| -> Vec<String> {
            let mut hs = started(1);
            let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
            input.extend(opt(OPT_LIST_META_CONTEXT, &meta_data("a", queries)));
            let (out, _) = run(&mut hs, &input, &exports);
            let r = replies(&out);
            assert_eq!(r.last().unwrap().1, REP_ACK);
            r[1..r.len() - 1]
                .iter()
                .map(|(_, kind, data)| {
                    assert_eq!(*kind, REP_META_CONTEXT);
                    assert_eq!(data[..4], [0, 0, 0, 0], "LIST gives no IDs");
                    String::from_utf8(data[4..].to_vec()).unwrap()
                })
                .collect()
        };
        let hashes: Vec<String> = (0..6).map(|k| format!("parallax:hash:{k}")).collect();
        let mut all = vec!["base:allocation".to_string()];
        all.extend(hashes.clone());
        assert_eq!(listed(&[]), all);
        assert_eq!(listed(&["base:"]), ["base:allocation"]);
        assert_eq!(listed(&["base:allocation"]), ["base:allocation"]);
        assert_eq!(listed(&["parallax:"]), hashes);
        assert_eq!(listed(&["parallax:hash:3"]), ["parallax:hash:3"]);
        let mut hs = started(1);
        let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            OPT_LIST_META_CONTEXT,
            &meta_data("a", &["x-other:thing"]),
        ));
        let (out, _) = run(&mut hs, &input, &exports);
        assert_eq!(replies(&out)[1], (OPT_LIST_META_CONTEXT, REP_ACK, vec![]));
    }

    #[test]
    fn list_info_abort_and_unknown() {
        let exports = [export("a", false), export("a@s", true)];
        let mut hs = started(1);
        let mut input = opt(OPT_LIST, &[]);
        input.extend(opt(OPT_LIST, &[1]));
        input.extend(opt(OPT_INFO, &go_data("a@s", &[])));
        input.extend(opt(OPT_INFO, &go_data("nope", &[])));
        input.extend(opt(OPT_GO, &go_data("nope", &[])));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(0xdead, &[1, 2, 3]));
        input.extend(opt(OPT_INFO, &[0, 0, 0, 9, b'a']));
        input.extend(opt(OPT_ABORT, &[]));
        let (out, step) = run(&mut hs, &input, &exports);
        assert_eq!(step, Step::Abort);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            [
                REP_SERVER,
                REP_SERVER,
                REP_ACK,
                REP_ERR_INVALID,
                REP_INFO,
                REP_INFO,
                REP_ACK,
                REP_ERR_UNKNOWN,
                REP_ERR_UNKNOWN,
                REP_ERR_UNSUP,
                REP_ERR_UNSUP,
                REP_ERR_UNSUP,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
        assert_eq!(r[0].2, [&[0u8, 0, 0, 1][..], b"a", b"a desc"].concat());
        let exp = &r[4].2;
        assert_eq!(get_u16(exp, 10).unwrap() & FLAG_READ_ONLY, FLAG_READ_ONLY);
        assert_eq!(r[11].0, 0xdead);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, len) in [(1u32, 134usize), (3, 10)] {
            let mut hs = started(flags);
            let (out, step) = run(&mut hs, &opt(OPT_EXPORT_NAME, b"a"), &[export("a", false)]);
            assert!(matches!(step, Step::Transmission(_)));
            assert_eq!(out.len(), len);
            assert_eq!(get_u64(&out, 0), Some(1 << 20));
        }
        let mut hs = started(1);
        let (_, step) = run(&mut hs, &opt(OPT_EXPORT_NAME, b"x"), &[]);
        assert!(matches!(
            step,
            Step::Fail(HandshakeError::ExportNameFailed(_))
        ));
    }

    #[test]
    fn oversized_option_is_skipped_then_refused() {
        let mut hs = started(1);
        let header = OptionHeader {
            option: OPT_LIST,
            len: MAX_OPTION_LEN + 10,
        }
        .encode();
        assert_eq!(hs.advance(&header), (16, Step::Continue));
        let junk = vec![7u8; MAX_OPTION_LEN as usize];
        assert_eq!(hs.advance(&junk), (junk.len(), Step::Continue));
        assert!(hs.take_output().is_empty());
        assert_eq!(hs.advance(&junk[..10]), (10, Step::Continue));
        assert_eq!(replies(&hs.take_output())[0].1, REP_ERR_TOO_BIG);
        let (_, step) = run(
            &mut hs,
            &opt(OPT_GO, &go_data("a", &[])),
            &[export("a", true)],
        );
        let Step::Transmission(n) = step else {
            panic!()
        };
        assert_ne!(n.flags & FLAG_READ_ONLY, 0);
        assert_eq!(n.flags & FLAG_SEND_TRIM, 0);
    }

    #[test]
    fn option_flood_and_bad_magic() {
        let mut hs = Handshake::new(HandshakeLimits {
            max_options: 3,
            ..Default::default()
        });
        hs.advance(&1u32.to_be_bytes());
        let input: Vec<u8> = (0..4)
            .flat_map(|_| opt(OPT_STRUCTURED_REPLY, &[]))
            .collect();
        let (_, step) = run(&mut hs, &input, &[]);
        assert_eq!(step, Step::Fail(HandshakeError::TooManyOptions(3)));
        let mut hs = started(1);
        let mut bad = opt(OPT_LIST, &[]);
        bad[0] = b'X';
        assert!(matches!(
            hs.advance(&bad),
            (0, Step::Fail(HandshakeError::BadOptionMagic(_)))
        ));
    }

    #[test]
    fn parsers_reject_inconsistent_lengths() {
        assert!(parse_info_request(&go_data("a", &[1, 2])).is_ok());
        let mut d = go_data("a", &[1]);
        d.push(0);
        assert!(parse_info_request(&d).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        assert!(parse_meta_request(&meta_data("a", &["base:allocation"])).is_ok());
        let mut d = meta_data("a", &["x:y"]);
        d.push(1);
        assert!(parse_meta_request(&d).is_err());
        let d = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_meta_request(&d).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_handshake(&data);
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
        }

        #[test]
        fn random_option_sequences_never_panic(
            opts in proptest::collection::vec(
                (0u32..13, proptest::collection::vec(any::<u8>(), 0..40)), 0..12),
            flags in 0u32..4,
        ) {
            let mut data = flags.to_be_bytes().to_vec();
            for (o, d) in &opts {
                data.extend(opt(*o, d));
            }
            fuzz_handshake(&data);
        }
    }
}
