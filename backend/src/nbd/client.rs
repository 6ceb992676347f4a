//! A blocking NBD client for one export: what `vdi import` pulls another host's export with
//! (and the fetch path remote-backed VDIs will use). Fixed newstyle; STARTTLS for `nbds`
//! URIs (PSK, or x509 with the server's name checked); `NBD_OPT_GO` with block sizes;
//! structured replies and `base:allocation` when the server has them, so holes need not
//! cross the network. One request at a time.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    time::Duration,
};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslStream, SslVerifyMode, SslVersion};

use super::{
    meta::{HASH_BLOCK, HASH_PARTS, HASH_PREFIX},
    proto::*,
    tls::parse_psk_file,
    uri::{Address, NbdUri},
};

/// A byte stream the client talks over: a socket, or TLS on one.
trait Link: Read + Write + Send {}
impl<T: Read + Write + Send> Link for T {}

/// One extent of an export, from `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Reads as zeros (a hole, or zeros the server knows of): no need to read it.
    pub zero: bool,
}

/// What a Parallax server says of one 4 KiB block (`parallax:hash`, docs/NBD-HASH.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockInfo {
    /// Reads as zeros (`base:allocation`).
    Zero,
    /// Holds data with this hash.
    Hash([u8; 24]),
    /// Data whose hash the server does not offer.
    Unknown,
}

/// A context's ID and its descriptors (length, status) in one block status reply.
type ContextStatus = (u32, Vec<(u32, u32)>);

/// A connection to one export, past the handshake.
pub struct NbdClient {
    link: Box<dyn Link>,
    size: u64,
    read_only: bool,
    /// Largest request the server takes.
    max_request: u32,
    structured: bool,
    /// The id the server gave `base:allocation`, if it has it.
    base_allocation: Option<u32>,
    /// The ids of `parallax:hash:0..5`, if asked for and the server has all six.
    hash_ids: Option<[u32; HASH_PARTS]>,
    next_handle: u64,
}

fn protocol(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Reads exactly `n` bytes.
fn read_n(r: &mut dyn Link, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// The text of an error reply's data, for a message.
fn reply_text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

impl NbdClient {
    /// Connects and negotiates; every socket operation gives up after `timeout`.
    pub fn connect(uri: &NbdUri, timeout: Duration) -> io::Result<NbdClient> {
        Self::connect_with(uri, timeout, false)
    }

    /// [`NbdClient::connect`], asking for the block hashes of a Parallax server too
    /// (`hashes`; see [`NbdClient::blocks`]).
    pub fn connect_with(uri: &NbdUri, timeout: Duration, hashes: bool) -> io::Result<NbdClient> {
        let link: Box<dyn Link> = match &uri.address {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Address::Unix(path) => {
                let s = UnixStream::connect(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                s.set_read_timeout(Some(timeout))?;
                s.set_write_timeout(Some(timeout))?;
                Box::new(s)
            }
        };
        Self::start(link, uri, hashes)
    }

    /// The handshake over a connected `link`.
    fn start(mut link: Box<dyn Link>, uri: &NbdUri, hashes: bool) -> io::Result<NbdClient> {
        let greeting = read_n(&mut *link, GREETING_LEN)?;
        if get_u64(&greeting, 0) != Some(NBDMAGIC) || get_u64(&greeting, 8) != Some(IHAVEOPT) {
            return Err(protocol("not a newstyle NBD server"));
        }
        let server_flags = get_u16(&greeting, 16).unwrap_or(0);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("the server does not speak fixed newstyle NBD"));
        }
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            flags |= FLAG_C_NO_ZEROES;
        }
        link.write_all(&flags.to_be_bytes())?;
        if uri.tls {
            let (reply, data) = option(&mut *link, OPT_STARTTLS, &[])?
                .pop()
                .unwrap_or_default();
            if reply != REP_ACK {
                return Err(protocol(format!(
                    "the server does not offer TLS ({})",
                    reply_text(&data)
                )));
            }
            link = start_tls(link, uri)?;
        }
        let mut c = NbdClient {
            link,
            size: 0,
            read_only: true,
            max_request: 32 << 20,
            structured: false,
            base_allocation: None,
            hash_ids: None,
            next_handle: 1,
        };
        c.negotiate(&uri.export, hashes)?;
        Ok(c)
    }

    fn negotiate(&mut self, export: &str, hashes: bool) -> io::Result<()> {
        let replies = option(&mut *self.link, OPT_STRUCTURED_REPLY, &[])?;
        self.structured = replies.last().is_some_and(|r| r.0 == REP_ACK);
        if self.structured {
            let mut names = vec![BASE_ALLOCATION.to_string()];
            if hashes {
                names.extend((0..HASH_PARTS).map(|k| format!("{HASH_PREFIX}{k}")));
            }
            let mut q = name_data(export);
            q.extend_from_slice(&(names.len() as u32).to_be_bytes());
            for n in &names {
                q.extend_from_slice(&(n.len() as u32).to_be_bytes());
                q.extend_from_slice(n.as_bytes());
            }
            let mut ids = [None; HASH_PARTS];
            for (reply, data) in option(&mut *self.link, OPT_SET_META_CONTEXT, &q)? {
                if reply != REP_META_CONTEXT {
                    continue;
                }
                let name = &data[4.min(data.len())..];
                if name == BASE_ALLOCATION.as_bytes() {
                    self.base_allocation = get_u32(&data, 0);
                } else if let Some(k) =
                    (0..HASH_PARTS).find(|k| name == format!("{HASH_PREFIX}{k}").as_bytes())
                {
                    ids[k] = get_u32(&data, 0);
                }
            }
            if ids.iter().all(Option::is_some) {
                self.hash_ids = Some(ids.map(|i| i.unwrap_or_default()));
            }
        }
        let mut go = name_data(export);
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let replies = option(&mut *self.link, OPT_GO, &go)?;
        let (last, data) = replies.last().cloned().unwrap_or_default();
        if last != REP_ACK {
            let what = match last {
                REP_ERR_UNKNOWN => "no such export".to_string(),
                REP_ERR_POLICY => "denied by the server".to_string(),
                REP_ERR_TLS_REQD => "the server requires TLS: use an nbds:// URI".to_string(),
                r => format!("refused (reply {r:#x})"),
            };
            let msg = reply_text(&data);
            return Err(protocol(if msg.is_empty() {
                format!("export {export:?}: {what}")
            } else {
                format!("export {export:?}: {what}: {msg}")
            }));
        }
        let mut have_size = false;
        for (reply, data) in &replies {
            if *reply != REP_INFO {
                continue;
            }
            match get_u16(data, 0) {
                Some(INFO_EXPORT) => {
                    self.size =
                        get_u64(data, 2).ok_or_else(|| protocol("short NBD_INFO_EXPORT"))?;
                    self.read_only = get_u16(data, 10).unwrap_or(0) & FLAG_READ_ONLY != 0;
                    have_size = true;
                }
                Some(INFO_BLOCK_SIZE) => {
                    if let Some(max) = get_u32(data, 10) {
                        self.max_request = max.clamp(4096, 32 << 20);
                    }
                }
                _ => {}
            }
        }
        if !have_size {
            return Err(protocol("the server did not say the export's size"));
        }
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let h = RequestHeader {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        self.link.write_all(&h.encode())?;
        Ok(handle)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_request as usize);
            let at = offset + done as u64;
            self.read_one(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    fn read_one(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let handle = self.request(CMD_READ, 0, offset, buf.len() as u32)?;
        if !self.structured {
            let h = read_n(&mut *self.link, SIMPLE_REPLY_LEN)?;
            check_simple(&h, handle)?;
            return self.link.read_exact(buf);
        }
        loop {
            let (flags, kind, payload_len) = self.chunk_header(handle)?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = self.payload_u64(payload_len)?;
                    let len = payload_len as usize - 8;
                    let start = in_range(at, len as u64, offset, buf.len())?;
                    self.link.read_exact(&mut buf[start..start + len])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let p = read_n(&mut *self.link, payload_len as usize)?;
                    let (at, len) = (get_u64(&p, 0), get_u32(&p, 8));
                    let (Some(at), Some(len)) = (at, len) else {
                        return Err(protocol("short OFFSET_HOLE chunk"));
                    };
                    let start = in_range(at, len.into(), offset, buf.len())?;
                    buf[start..start + len as usize].fill(0);
                }
                _ => self.other_chunk(kind, payload_len)?,
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
    }

    /// The extents of `offset..offset+len` (up to the first few the server reports; at least
    /// one). Without `base:allocation`, all of it is data.
    pub fn extents(&mut self, offset: u64, len: u32) -> io::Result<Vec<Extent>> {
        let Some(id) = self.base_allocation else {
            return Ok(vec![Extent {
                len: len.into(),
                zero: false,
            }]);
        };
        let status = self.status(offset, len)?;
        let out: Vec<Extent> = status
            .iter()
            .filter(|c| c.0 == id)
            .flat_map(|c| &c.1)
            .filter(|d| d.0 > 0)
            .map(|&(len, state)| Extent {
                len: len.into(),
                zero: state & STATE_ZERO != 0,
            })
            .collect();
        if out.is_empty() {
            return Err(protocol("NBD_CMD_BLOCK_STATUS reply without extents"));
        }
        Ok(out)
    }

    /// Whether the server gives block hashes (asked for with [`NbdClient::connect_with`]).
    pub fn has_hashes(&self) -> bool {
        self.hash_ids.is_some()
    }

    /// What the server says of each 4 KiB block from `offset` (block aligned), for at most
    /// `len` bytes (at least the first block): zeros, its hash, or neither.
    pub fn blocks(&mut self, offset: u64, len: u32) -> io::Result<Vec<BlockInfo>> {
        const B: u64 = HASH_BLOCK;
        let Some(ids) = self.hash_ids else {
            return Ok(vec![
                BlockInfo::Unknown;
                u64::from(len).div_ceil(B) as usize
            ]);
        };
        let status = self.status(offset, len)?;
        // Per context, the status of each block the reply covers (a descriptor may end
        // inside a block: the block takes the status it starts with).
        let per_block = |id: u32| -> Vec<u32> {
            let mut v = Vec::new();
            let mut pos = 0u64;
            for &(l, st) in status.iter().filter(|c| c.0 == id).flat_map(|c| &c.1) {
                // Never past what was asked, whatever the server says.
                let end = (pos + u64::from(l)).min(u64::from(len));
                while (v.len() as u64) * B < end {
                    v.push(st);
                }
                pos = end;
            }
            v
        };
        let parts: Vec<Vec<u32>> = ids.iter().map(|&id| per_block(id)).collect();
        let zero = self.base_allocation.map(per_block);
        let n = parts.iter().map(Vec::len).min().unwrap_or(0);
        if n == 0 {
            return Err(protocol("NBD_CMD_BLOCK_STATUS reply without hashes"));
        }
        Ok((0..n)
            .map(|i| {
                if zero
                    .as_ref()
                    .and_then(|z| z.get(i))
                    .is_some_and(|s| s & STATE_ZERO != 0)
                {
                    return BlockInfo::Zero;
                }
                let mut h = [0u8; 24];
                for (k, p) in parts.iter().enumerate() {
                    h[4 * k..4 * k + 4].copy_from_slice(&p[i].to_be_bytes());
                }
                if h == [0; 24] {
                    BlockInfo::Unknown
                } else {
                    BlockInfo::Hash(h)
                }
            })
            .collect())
    }

    /// One `NBD_CMD_BLOCK_STATUS`: the descriptors of each context the server answered for.
    fn status(&mut self, offset: u64, len: u32) -> io::Result<Vec<ContextStatus>> {
        let handle = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out = Vec::new();
        loop {
            let (flags, kind, payload_len) = self.chunk_header(handle)?;
            if kind == REPLY_TYPE_BLOCK_STATUS {
                let p = read_n(&mut *self.link, payload_len as usize)?;
                let id = get_u32(&p, 0).ok_or_else(|| protocol("short block status chunk"))?;
                let descs = p[4..]
                    .chunks_exact(8)
                    .map(|d| (get_u32(d, 0).unwrap_or(0), get_u32(d, 4).unwrap_or(0)))
                    .collect();
                out.push((id, descs));
            } else {
                self.other_chunk(kind, payload_len)?;
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(out);
            }
        }
    }

    /// Reads a structured reply chunk header for `handle`: (flags, type, payload length).
    fn chunk_header(&mut self, handle: u64) -> io::Result<(u16, u16, u32)> {
        let magic = read_n(&mut *self.link, 4)?;
        match get_u32(&magic, 0) {
            Some(STRUCTURED_REPLY_MAGIC) => {}
            Some(SIMPLE_REPLY_MAGIC) => {
                // A server may still answer an error with a simple reply.
                let h = read_n(&mut *self.link, SIMPLE_REPLY_LEN - 4)?;
                if get_u64(&h, 4) != Some(handle) {
                    return Err(protocol("reply for a request not sent"));
                }
                return Err(match get_u32(&h, 0) {
                    Some(0) | None => protocol("simple reply to a structured request"),
                    Some(e) => io::Error::from_raw_os_error(e as i32),
                });
            }
            _ => return Err(protocol("bad reply magic")),
        }
        let h = read_n(&mut *self.link, CHUNK_HEADER_LEN - 4)?;
        if get_u64(&h, 4) != Some(handle) {
            return Err(protocol("reply for a request not sent"));
        }
        let len = get_u32(&h, 12).unwrap_or(0);
        if len > self.max_request + 64 {
            return Err(protocol("reply chunk too long"));
        }
        Ok((
            get_u16(&h, 0).unwrap_or(0),
            get_u16(&h, 2).unwrap_or(0),
            len,
        ))
    }

    fn payload_u64(&mut self, payload_len: u32) -> io::Result<u64> {
        if payload_len < 8 {
            return Err(protocol("short reply chunk"));
        }
        let b = read_n(&mut *self.link, 8)?;
        Ok(get_u64(&b, 0).unwrap_or(0))
    }

    /// NONE, errors, and chunk types this client does not use.
    fn other_chunk(&mut self, kind: u16, payload_len: u32) -> io::Result<()> {
        let p = read_n(&mut *self.link, payload_len as usize)?;
        if kind & (1 << 15) != 0 {
            let err = get_u32(&p, 0).unwrap_or(EIO);
            let n = get_u16(&p, 4).unwrap_or(0) as usize;
            let msg = p.get(6..6 + n).map(reply_text).unwrap_or_default();
            let os = io::Error::from_raw_os_error(err as i32);
            return Err(io::Error::new(os.kind(), format!("server: {os}: {msg}")));
        }
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // NBD_CMD_DISC: the polite goodbye; the connection is closed either way.
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}

fn check_simple(h: &[u8], handle: u64) -> io::Result<()> {
    if get_u32(h, 0) != Some(SIMPLE_REPLY_MAGIC) || get_u64(h, 8) != Some(handle) {
        return Err(protocol("bad simple reply"));
    }
    match get_u32(h, 4) {
        Some(0) => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e as i32)),
        None => Err(protocol("short reply")),
    }
}

/// Where a chunk for `at..at+len` goes in a read of `buf_len` bytes at `offset`.
fn in_range(at: u64, len: u64, offset: u64, buf_len: usize) -> io::Result<usize> {
    let start = at
        .checked_sub(offset)
        .ok_or_else(|| protocol("chunk before the request"))?;
    if start
        .checked_add(len)
        .is_none_or(|end| end > buf_len as u64)
    {
        return Err(protocol("chunk past the request"));
    }
    Ok(start as usize)
}

/// `u32 length, name` as INFO, GO and META_CONTEXT options start.
fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// Sends an option and reads its replies up to the final one (ACK or an error).
fn option(link: &mut dyn Link, option: u32, data: &[u8]) -> io::Result<Vec<(u32, Vec<u8>)>> {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    link.write_all(&h.encode())?;
    link.write_all(data)?;
    let mut replies = Vec::new();
    loop {
        let h = read_n(link, OPTION_REPLY_HEADER_LEN)?;
        if get_u64(&h, 0) != Some(OPT_REPLY_MAGIC) || get_u32(&h, 8) != Some(option) {
            return Err(protocol("bad option reply"));
        }
        let reply = get_u32(&h, 12).unwrap_or(0);
        let len = get_u32(&h, 16).unwrap_or(0);
        if len > 1 << 20 {
            return Err(protocol("option reply too long"));
        }
        let data = read_n(link, len as usize)?;
        let last = reply == REP_ACK || reply & (1 << 31) != 0;
        replies.push((reply, data));
        if last {
            return Ok(replies);
        }
    }
}

/// Wraps `link` in TLS with the URI's credentials: PSK keys, or x509 (checking the server's
/// certificate against the CA and its name against the host).
fn start_tls(link: Box<dyn Link>, uri: &NbdUri) -> io::Result<Box<dyn Link>> {
    Ok(Box::new(tls_client(link, uri)?))
}

/// The client side of a TLS session over `link` with `uri`'s credentials (`tls-psk-file` and
/// `tls-username`, or `tls-certificates`), as for an `nbds://` URI; also what the control
/// protocol uses between hosts.
pub fn tls_client<S: Read + Write>(link: S, uri: &NbdUri) -> io::Result<SslStream<S>> {
    let err = |e: openssl::error::ErrorStack| io::Error::other(format!("TLS: {e}"));
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(err)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(err)?;
    let host = match &uri.address {
        Address::Tcp { host, .. } => host.clone(),
        Address::Unix(_) => "localhost".into(),
    };
    let mut verify_host = true;
    // The identity a PSK handshake presents, to name in an error.
    let mut psk_identity = None;
    if let Some(path) = &uri.psk_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let keys = parse_psk_file(&text)
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        let user = match &uri.username {
            Some(u) => u.clone(),
            None => std::env::var("USER").unwrap_or_default(),
        };
        let key = keys
            .get(&user)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("{}: no key for {user:?}", path.display())))?;
        psk_identity = Some(user.clone());
        b.set_cipher_list("ECDHEPSK:PSK").map_err(err)?;
        b.set_verify(SslVerifyMode::NONE);
        verify_host = false;
        b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
            let id = user.as_bytes();
            if id.len() >= identity.len() || key.len() > psk.len() {
                return Ok(0);
            }
            identity[..id.len()].copy_from_slice(id);
            identity[id.len()] = 0;
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
    } else if let Some(dir) = &uri.certificates {
        b.set_ca_file(dir.join("ca-cert.pem")).map_err(err)?;
        let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        if cert.exists() {
            b.set_certificate_chain_file(&cert).map_err(err)?;
            b.set_private_key_file(&key, SslFiletype::PEM)
                .map_err(err)?;
        }
    }
    let mut cfg = b.build().configure().map_err(err)?;
    if !verify_host {
        cfg.set_verify_hostname(false);
        cfg.set_use_server_name_indication(false);
    }
    let ssl = cfg.into_ssl(&host).map_err(err)?;
    let mut s = SslStream::new(ssl, link).map_err(err)?;
    s.connect().map_err(|e| {
        // A server that does not know the identity, or has another key for it, ends the
        // handshake with an alert; OpenSSL's words for that do not say which.
        let refused = e.ssl_error().is_some() && e.to_string().contains("alert");
        match psk_identity {
            Some(id) if refused => io::Error::other(format!(
                "TLS handshake refused: the server does not accept the key of {id:?} \
                 (it knows another key, or not this identity)"
            )),
            _ => io::Error::other(format!("TLS handshake: {e}")),
        }
    })?;
    Ok(s)
}

/// A server that answers with `data`, whatever it is asked; what the client sends is dropped.
struct Scripted(io::Cursor<Vec<u8>>);

impl Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the client against a server that sends `data` (the handshake, then a block status
/// and a read of the first 64 KiB). A fuzz target's entry point: whatever the server sends,
/// the client returns an error or data, and never panics or allocates without bound.
pub fn fuzz_client(data: &[u8]) {
    let uri = NbdUri {
        address: Address::Unix(Default::default()),
        export: "disk".into(),
        tls: false,
        psk_file: None,
        username: None,
        certificates: None,
    };
    let link = Box::new(Scripted(io::Cursor::new(data.to_vec())));
    let Ok(mut c) = NbdClient::start(link, &uri, true) else {
        return;
    };
    let n = c.size().min(64 << 10);
    let _ = c.extents(0, n as u32);
    let _ = c.blocks(0, n as u32);
    let mut buf = vec![0u8; n as usize];
    let _ = c.read(&mut buf, 0);
}
