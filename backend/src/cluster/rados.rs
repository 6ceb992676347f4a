//! A thin, safe wrapper over the parts of librados (Ceph's C client) the cluster store uses.
//!
//! librados is loaded at run time (`dlopen` of `librados.so.2`), not linked: `parallax` builds
//! and runs on hosts without Ceph, and only a `rados:` store needs the library (Debian:
//! `librados2`, which `ceph-common` pulls in). The functions are declared here by hand from
//! `rados/librados.h` (Ceph 16); every call returns a negative errno on failure.
//!
//! ```text
//!   Rados (cluster handle, one per process and cluster) ──► IoCtx (a pool and a namespace)
//!        │ blocklist(), addrs()                                 │ read, write, aio_write,
//!        ▼                                                      ▼ remove, truncate, zero,
//!                                                                 stat, list
//!      mons                                                     OSDs
//! ```

use std::{
    ffi::{c_char, c_int, c_void, CStr, CString},
    io,
    path::Path,
    ptr,
    sync::{Arc, OnceLock},
};

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type CompletionT = *mut c_void;
type ListCtxT = *mut c_void;
type WriteOpT = *mut c_void;
type Callback = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;

/// The librados entry points, resolved once per process.
struct Api {
    create2: unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    connect: unsafe extern "C" fn(RadosT) -> c_int,
    shutdown: unsafe extern "C" fn(RadosT),
    ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoCtxT) -> c_int,
    ioctx_destroy: unsafe extern "C" fn(IoCtxT),
    ioctx_set_namespace: unsafe extern "C" fn(IoCtxT, *const c_char),
    read: unsafe extern "C" fn(IoCtxT, *const c_char, *mut c_char, usize, u64) -> c_int,
    write: unsafe extern "C" fn(IoCtxT, *const c_char, *const c_char, usize, u64) -> c_int,
    write_full: unsafe extern "C" fn(IoCtxT, *const c_char, *const c_char, usize) -> c_int,
    remove: unsafe extern "C" fn(IoCtxT, *const c_char) -> c_int,
    stat: unsafe extern "C" fn(IoCtxT, *const c_char, *mut u64, *mut libc::time_t) -> c_int,
    aio_create_completion2: unsafe extern "C" fn(*mut c_void, Callback, *mut CompletionT) -> c_int,
    aio_write: unsafe extern "C" fn(
        IoCtxT,
        *const c_char,
        CompletionT,
        *const c_char,
        usize,
        u64,
    ) -> c_int,
    aio_wait_for_complete: unsafe extern "C" fn(CompletionT) -> c_int,
    aio_is_complete: unsafe extern "C" fn(CompletionT) -> c_int,
    aio_get_return_value: unsafe extern "C" fn(CompletionT) -> c_int,
    aio_release: unsafe extern "C" fn(CompletionT),
    blocklist_add: unsafe extern "C" fn(RadosT, *mut c_char, u32) -> c_int,
    getaddrs: unsafe extern "C" fn(RadosT, *mut *mut c_char) -> c_int,
    wait_for_latest_osdmap: unsafe extern "C" fn(RadosT) -> c_int,
    list_open: unsafe extern "C" fn(IoCtxT, *mut ListCtxT) -> c_int,
    list_next: unsafe extern "C" fn(
        ListCtxT,
        *mut *const c_char,
        *mut *const c_char,
        *mut *const c_char,
    ) -> c_int,
    list_close: unsafe extern "C" fn(ListCtxT),
    create_write_op: unsafe extern "C" fn() -> WriteOpT,
    release_write_op: unsafe extern "C" fn(WriteOpT),
    write_op_assert_exists: unsafe extern "C" fn(WriteOpT),
    write_op_truncate: unsafe extern "C" fn(WriteOpT, u64),
    write_op_zero: unsafe extern "C" fn(WriteOpT, u64, u64),
    write_op_operate:
        unsafe extern "C" fn(WriteOpT, IoCtxT, *const c_char, *mut libc::time_t, c_int) -> c_int,
}

/// The library's file name (the runtime package's soname, not the `-dev` symlink).
const LIBRARY: &str = "librados.so.2";

fn api() -> io::Result<&'static Api> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))
}

fn load() -> Result<Api, String> {
    // SAFETY: loading librados runs its static initialisers, which have no preconditions; the
    // library is leaked below, so it stays mapped for as long as any pointer into it exists.
    let lib = unsafe { libloading::Library::new(LIBRARY) }.map_err(|e| {
        format!("cannot load {LIBRARY} ({e}): a rados: store needs Ceph's client library (Debian: apt-get install librados2)")
    })?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol's type is the one `rados/librados.h` (Ceph 16) declares for it,
            // and the library it points into is never unloaded (leaked above).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{LIBRARY} lacks {}: {e}", $name))?
        };
    }
    Ok(Api {
        create2: sym!("rados_create2"),
        conf_read_file: sym!("rados_conf_read_file"),
        conf_set: sym!("rados_conf_set"),
        connect: sym!("rados_connect"),
        shutdown: sym!("rados_shutdown"),
        ioctx_create: sym!("rados_ioctx_create"),
        ioctx_destroy: sym!("rados_ioctx_destroy"),
        ioctx_set_namespace: sym!("rados_ioctx_set_namespace"),
        read: sym!("rados_read"),
        write: sym!("rados_write"),
        write_full: sym!("rados_write_full"),
        remove: sym!("rados_remove"),
        stat: sym!("rados_stat"),
        aio_create_completion2: sym!("rados_aio_create_completion2"),
        aio_write: sym!("rados_aio_write"),
        aio_wait_for_complete: sym!("rados_aio_wait_for_complete"),
        aio_is_complete: sym!("rados_aio_is_complete"),
        aio_get_return_value: sym!("rados_aio_get_return_value"),
        aio_release: sym!("rados_aio_release"),
        blocklist_add: sym!("rados_blocklist_add"),
        getaddrs: sym!("rados_getaddrs"),
        wait_for_latest_osdmap: sym!("rados_wait_for_latest_osdmap"),
        list_open: sym!("rados_nobjects_list_open"),
        list_next: sym!("rados_nobjects_list_next"),
        list_close: sym!("rados_nobjects_list_close"),
        create_write_op: sym!("rados_create_write_op"),
        release_write_op: sym!("rados_release_write_op"),
        write_op_assert_exists: sym!("rados_write_op_assert_exists"),
        write_op_truncate: sym!("rados_write_op_truncate"),
        write_op_zero: sym!("rados_write_op_zero"),
        write_op_operate: sym!("rados_write_op_operate"),
    })
}

/// A librados return value as a result: negative values are `-errno`.
fn check(r: c_int, what: &str) -> io::Result<c_int> {
    if r < 0 {
        let e = io::Error::from_raw_os_error(-r);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// A connection to a Ceph cluster.
pub struct Rados {
    api: &'static Api,
    handle: RadosT,
}

// SAFETY: a `rados_t` is documented thread-safe (librados serialises internally); the handle is
// only shut down in `drop`, when no `IoCtx` (each holds an `Arc<Rados>`) is left.
unsafe impl Send for Rados {}
// SAFETY: as above.
unsafe impl Sync for Rados {}

impl Rados {
    /// Connects as `client.USER` (its key from the keyring the configuration names) using the
    /// configuration file `conf` (mon addresses, keyring).
    pub fn connect(conf: &Path, user: &str) -> io::Result<Arc<Rados>> {
        let api = api()?;
        let mut handle: RadosT = ptr::null_mut();
        let cluster = cstr("ceph")?;
        let user = cstr(&format!("client.{user}"))?;
        // SAFETY: `handle` is a valid out-pointer; the strings are NUL-terminated and outlive
        // the call.
        let r = unsafe { (api.create2)(&mut handle, cluster.as_ptr(), user.as_ptr(), 0) };
        check(r, "rados_create2")?;
        let rados = Rados { api, handle };
        let path = cstr(&conf.to_string_lossy())?;
        // SAFETY: `handle` was created above and is not yet connected; `path` is a C string.
        let r = unsafe { (api.conf_read_file)(handle, path.as_ptr()) };
        check(r, &format!("reading {}", conf.display()))?;
        // Fail rather than hang when the cluster is not there.
        for (k, v) in [
            ("client_mount_timeout", "10"),
            ("rados_mon_op_timeout", "30"),
        ] {
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: as above; both strings are NUL-terminated.
            let r = unsafe { (api.conf_set)(handle, k.as_ptr(), v.as_ptr()) };
            check(r, "rados_conf_set")?;
        }
        // SAFETY: `handle` is configured and not yet connected.
        let r = unsafe { (api.connect)(handle) };
        check(r, "connecting to the Ceph cluster")?;
        Ok(Arc::new(rados))
    }

    /// Opens `pool`, its objects in `namespace` ("" for the default one).
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: &str) -> io::Result<IoCtx> {
        let mut io: IoCtxT = ptr::null_mut();
        let p = cstr(pool)?;
        // SAFETY: `self.handle` is connected; `io` is a valid out-pointer.
        let r = unsafe { (self.api.ioctx_create)(self.handle, p.as_ptr(), &mut io) };
        check(r, &format!("opening pool {pool}"))?;
        let ns = cstr(namespace)?;
        // SAFETY: `io` was just created; librados copies the namespace string.
        unsafe { (self.api.ioctx_set_namespace)(io, ns.as_ptr()) };
        Ok(IoCtx {
            rados: self.clone(),
            io,
        })
    }

    /// This client's addresses as the mons know them, in the form `blocklist` takes.
    pub fn addrs(&self) -> io::Result<String> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: `out` is a valid out-pointer; on success librados sets it to a malloc'd C
        // string (`strdup`), freed below with `free`.
        let r = unsafe { (self.api.getaddrs)(self.handle, &mut out) };
        check(r, "rados_getaddrs")?;
        // SAFETY: on success `out` is a NUL-terminated string that we own.
        let s = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: `out` came from librados' strdup and is freed exactly once.
        unsafe { libc::free(out.cast()) };
        Ok(s)
    }

    /// Fences the client at `addr` (as [`Rados::addrs`] gave it): the OSDs refuse every
    /// operation it sends from the OSD map that records this on, for `expire_secs` (0: the
    /// cluster's default, an hour). Waits until this client holds that map, so that whatever
    /// it sends afterwards is ordered after the fence.
    pub fn blocklist(&self, addr: &str, expire_secs: u32) -> io::Result<()> {
        // An address vector ("[v2:1.2.3.4:0/123,v1:…]") lists one client several times; the
        // command takes one entry, and fences the client's instance whichever it names.
        let one = addr
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .next()
            .unwrap_or("")
            .trim_start_matches("v2:")
            .trim_start_matches("v1:")
            .trim_start_matches("any:");
        let a = cstr(one)?;
        // SAFETY: librados takes a `char *` but does not write through it; `a` outlives the call.
        let r = unsafe {
            (self.api.blocklist_add)(self.handle, a.as_ptr() as *mut c_char, expire_secs)
        };
        check(r, &format!("blocklisting {one}"))?;
        // SAFETY: `self.handle` is connected.
        let r = unsafe { (self.api.wait_for_latest_osdmap)(self.handle) };
        check(r, "rados_wait_for_latest_osdmap")?;
        Ok(())
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the last reference is going; every IoCtx held one, so none is left.
        unsafe { (self.api.shutdown)(self.handle) };
    }
}

/// A pool (and namespace) of a [`Rados`] connection: the objects' I/O.
pub struct IoCtx {
    rados: Arc<Rados>,
    io: IoCtxT,
}

// SAFETY: librados' I/O context functions are thread-safe for I/O (the namespace is set once,
// before the context is shared); the context is destroyed only in `drop`.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    pub fn rados(&self) -> &Arc<Rados> {
        &self.rados
    }

    fn api(&self) -> &'static Api {
        self.rados.api
    }

    /// Reads up to `buf.len()` bytes of `oid` from `off`: how many there were (an object that
    /// does not exist has none).
    pub fn read(&self, oid: &str, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let o = cstr(oid)?;
        // SAFETY: `buf` is valid for writes of its length for the duration of this synchronous
        // call.
        let r = unsafe {
            (self.api().read)(self.io, o.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), off)
        };
        if r == -libc::ENOENT {
            return Ok(0);
        }
        Ok(check(r, &format!("reading {oid}"))? as usize)
    }

    /// Writes `buf` into `oid` at `off`, creating the object; durable on every replica when it
    /// returns.
    pub fn write(&self, oid: &str, buf: &[u8], off: u64) -> io::Result<()> {
        let o = cstr(oid)?;
        // SAFETY: `buf` is valid for reads of its length for the duration of this synchronous
        // call.
        let r =
            unsafe { (self.api().write)(self.io, o.as_ptr(), buf.as_ptr().cast(), buf.len(), off) };
        check(r, &format!("writing {oid}")).map(drop)
    }

    /// Replaces the whole of `oid` with `buf`.
    pub fn write_full(&self, oid: &str, buf: &[u8]) -> io::Result<()> {
        let o = cstr(oid)?;
        // SAFETY: as in `write`.
        let r =
            unsafe { (self.api().write_full)(self.io, o.as_ptr(), buf.as_ptr().cast(), buf.len()) };
        check(r, &format!("writing {oid}")).map(drop)
    }

    /// Starts writing `buf` into `oid` at `off`; the returned [`AioWrite`] owns the buffer
    /// until librados is done with it.
    pub fn aio_write(&self, oid: &str, buf: Vec<u8>, off: u64) -> io::Result<AioWrite> {
        let o = cstr(oid)?;
        let api = self.api();
        let mut c: CompletionT = ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; no callback, so no argument is needed.
        let r = unsafe { (api.aio_create_completion2)(ptr::null_mut(), None, &mut c) };
        check(r, "rados_aio_create_completion2")?;
        let w = AioWrite { api, c, buf };
        // SAFETY: the buffer is owned by `w`, which waits for the completion before it frees
        // the buffer (in `drop`), so librados may read it until then; `o` is copied by librados.
        let r = unsafe {
            (api.aio_write)(
                self.io,
                o.as_ptr(),
                w.c,
                w.buf.as_ptr().cast(),
                w.buf.len(),
                off,
            )
        };
        check(r, &format!("writing {oid}"))?;
        Ok(w)
    }

    /// Removes `oid`; one that is not there is not an error.
    pub fn remove(&self, oid: &str) -> io::Result<()> {
        let o = cstr(oid)?;
        // SAFETY: `o` is a C string that outlives the call.
        let r = unsafe { (self.api().remove)(self.io, o.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, &format!("removing {oid}")).map(drop)
    }

    /// Cuts `oid` short at `size` bytes; one that is not there stays absent.
    pub fn truncate(&self, oid: &str, size: u64) -> io::Result<()> {
        // SAFETY: `op` is the write op `existing_op` made, live for the call.
        self.existing_op(oid, |api, op| unsafe { (api.write_op_truncate)(op, size) })
    }

    /// Zeroes `len` bytes of `oid` at `off` (the OSD frees what it can); one that is not there
    /// stays absent.
    pub fn zero(&self, oid: &str, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: `op` is the write op `existing_op` made, live for the call.
        self.existing_op(oid, |api, op| unsafe { (api.write_op_zero)(op, off, len) })
    }

    /// Runs one write op on `oid` built by `build`, if `oid` exists (the op asserts it does,
    /// so that it never creates an object).
    fn existing_op(&self, oid: &str, build: impl FnOnce(&Api, WriteOpT)) -> io::Result<()> {
        let api = self.api();
        let o = cstr(oid)?;
        // SAFETY: plain constructor; a null result is checked.
        let op = unsafe { (api.create_write_op)() };
        if op.is_null() {
            return Err(io::Error::other("rados_create_write_op failed"));
        }
        // SAFETY: `op` is live until released below.
        unsafe { (api.write_op_assert_exists)(op) };
        build(api, op);
        // SAFETY: `op`, the context and `o` are live for the call; a null mtime means now.
        let r = unsafe { (api.write_op_operate)(op, self.io, o.as_ptr(), ptr::null_mut(), 0) };
        // SAFETY: released once, after its last use.
        unsafe { (api.release_write_op)(op) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, &format!("shrinking {oid}")).map(drop)
    }

    /// The size of `oid`, or `None` if it does not exist.
    pub fn stat(&self, oid: &str) -> io::Result<Option<u64>> {
        let o = cstr(oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: both out-pointers are valid for the call.
        let r = unsafe { (self.api().stat)(self.io, o.as_ptr(), &mut size, &mut mtime) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check(r, &format!("stat of {oid}"))?;
        Ok(Some(size))
    }

    /// The names of every object in this context's namespace.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let api = self.api();
        let mut ctx: ListCtxT = ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer.
        let r = unsafe { (api.list_open)(self.io, &mut ctx) };
        check(r, "listing objects")?;
        let mut names = Vec::new();
        let result = loop {
            let (mut entry, mut key, mut ns): (*const c_char, *const c_char, *const c_char) =
                (ptr::null(), ptr::null(), ptr::null());
            // SAFETY: `ctx` is open; the out-pointers are valid; the strings they receive stay
            // valid until the next call on `ctx`, and are copied before it.
            let r = unsafe { (api.list_next)(ctx, &mut entry, &mut key, &mut ns) };
            if r == -libc::ENOENT {
                break Ok(());
            }
            if let Err(e) = check(r, "listing objects") {
                break Err(e);
            }
            // SAFETY: on success `entry` is a NUL-terminated string (see above).
            names.push(
                unsafe { CStr::from_ptr(entry) }
                    .to_string_lossy()
                    .into_owned(),
            );
        };
        // SAFETY: `ctx` is open and closed exactly once.
        unsafe { (api.list_close)(ctx) };
        result.map(|()| names)
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the context is destroyed once; every AioWrite issued through it waited for
        // its completion (or is waited for before its buffer goes, independent of the context).
        unsafe { (self.api().ioctx_destroy)(self.io) };
    }
}

/// A write in flight. Dropping it waits for it (librados may still read its buffer).
pub struct AioWrite {
    api: &'static Api,
    c: CompletionT,
    buf: Vec<u8>,
}

// SAFETY: a completion may be waited for and released from any thread.
unsafe impl Send for AioWrite {}

impl AioWrite {
    /// Bytes being written.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Whether the write has finished (successfully or not).
    pub fn is_done(&self) -> bool {
        // SAFETY: `c` is a live completion until `drop`.
        unsafe { (self.api.aio_is_complete)(self.c) != 0 }
    }

    /// Waits for the write; its outcome.
    pub fn wait(self) -> io::Result<()> {
        // SAFETY: `c` is a live completion until `drop`.
        unsafe { (self.api.aio_wait_for_complete)(self.c) };
        // SAFETY: as above; the write is complete.
        let r = unsafe { (self.api.aio_get_return_value)(self.c) };
        check(r, "writing to the Ceph cluster").map(drop)
    }
}

impl Drop for AioWrite {
    fn drop(&mut self) {
        // SAFETY: `c` is live; waiting first means librados no longer touches the buffer, which
        // is freed after this, and the completion is released exactly once.
        unsafe {
            (self.api.aio_wait_for_complete)(self.c);
            (self.api.aio_release)(self.c);
        }
    }
}
