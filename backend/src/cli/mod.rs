//! The `parallax` command line.
//!
//! Every store command runs either on the store directly (when no daemon holds it) or through
//! the running daemon's control socket — the same operations, the same output. Errors are one
//! line on stderr and a non-zero exit: 1 for errors, 2 for usage, 3 when `check` finds damage.

mod dedup;
mod output;
mod schedule;
mod stream;

use std::{
    fs::{File, OpenOptions},
    io::{self, IsTerminal},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::de::DeserializeOwned;

use crate::{
    cluster::{self, ClusterConfig, ClusterError, RadosStore},
    daemon::{
        addr::ControlAddr,
        config::Config,
        control::{ControlClient, PeerTls, RemoteError, Request},
        control_net::NetClient,
        migrate::{migrate, MigrateOptions, MigrateReport},
    },
    nbd::{
        remote::{NbdRemote, DEFAULT_RECONNECT_DELAY},
        uri::NbdUri,
    },
    store::{
        CheckReport, DeleteReport, DfReport, DiffReport, GcReport, HydrateReport, Kind, ListFilter,
        RollbackReport, Store, StoreError, StoreOptions, TreeNode, VdiInfo, VdiSummary,
    },
    transfer,
    util::{format_size, parse_size},
};

const ABOUT: &str = "Parallax: virtual disk images with instant snapshots and forks";
const LONG_ABOUT: &str = "\
Parallax: virtual disk images (VDIs) with instant snapshots and forks, served over NBD and the
Xen block ring.

A store (a sparse file or a block device) holds many VDIs. Snapshots (NAME@SNAP) are read-only
and O(1); forks are writable O(1) copies of a snapshot. While `parallax serve` runs, these
commands talk to it through its control socket; otherwise they open the store themselves.

Quick start:
  parallax --store s.px init --size 20G
  parallax --store s.px vdi import template disk.raw
  parallax --store s.px vdi snapshot template gold
  parallax --store s.px vdi fork template@gold vm1
  parallax --store s.px serve          # qemu-img info nbd://127.0.0.1:10809/vm1

A store can also live in a Ceph cluster: `--store rados:POOL/NAME` (with --ceph-conf and
--etcd) keeps its blocks in RADOS pool POOL and its owner in etcd; one host at a time serves
it, and another takes it over when that host stops.";

#[derive(Parser, Debug)]
#[command(name = "parallax", version, about = ABOUT, long_about = LONG_ABOUT, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    place: Place,
    #[command(subcommand)]
    command: Command,
}

/// Where commands go: a store of this host, or with `--connect` another host's daemon.
#[derive(clap::Args, Debug)]
struct Place {
    /// The store: a file, a block device, or `rados:POOL/NAME` (a store in a Ceph pool).
    #[arg(long, global = true, env = "PARALLAX_STORE", value_name = "PATH")]
    store: Option<PathBuf>,
    /// Send the command to another host's (or domain's) daemon instead: its control listener,
    /// `HOST[:PORT]` (`serve --control-listen`), over TLS. Commands that hand over a file
    /// (import or export of a file, send, recv) run only on the host itself.
    #[arg(long, global = true, env = "PARALLAX_CONNECT", value_name = "HOST")]
    connect: Option<String>,
    /// With --connect: keys (`identity:hexkey` lines, as `psktool` writes).
    #[arg(long, global = true, value_name = "FILE")]
    connect_psk_file: Option<PathBuf>,
    /// With --connect: the identity whose key to use (default: $USER).
    #[arg(long, global = true, value_name = "NAME")]
    connect_username: Option<String>,
    /// With --connect: a directory with `ca-cert.pem` (and `client-cert.pem`,
    /// `client-key.pem`) for x509.
    #[arg(long, global = true, value_name = "DIR")]
    connect_certificates: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// How to reach the Ceph cluster and etcd that hold a `rados:POOL/NAME` store.
#[derive(clap::Args, Debug, Default)]
struct ClusterArgs {
    /// For a rados: store: Ceph's configuration file (mon addresses, keyring).
    /// Default: /etc/ceph/ceph.conf, or `cluster.ceph_conf` in serve's config.
    #[arg(long, global = true, env = "PARALLAX_CEPH_CONF", value_name = "FILE")]
    ceph_conf: Option<PathBuf>,
    /// For a rados: store: the Ceph user to connect as (client.USER; default admin). It needs
    /// rw on the pool and the mon command `osd blocklist`.
    #[arg(long, global = true, env = "PARALLAX_CEPH_USER", value_name = "USER")]
    ceph_user: Option<String>,
    /// For a rados: store: etcd's client URLs, comma-separated (default: http://127.0.0.1:2379).
    #[arg(
        long,
        global = true,
        env = "PARALLAX_ETCD",
        value_name = "URL[,URL...]",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    /// For a rados: store: this host's name in ownership records (default: the host name).
    #[arg(long, global = true, env = "PARALLAX_HOST", value_name = "NAME")]
    host: Option<String>,
    /// For a rados: store: seconds a host that stopped renewing its lease keeps the store
    /// before another may take it over (default: 5).
    #[arg(long, global = true, env = "PARALLAX_LEASE_TTL", value_name = "SECS")]
    lease_ttl: Option<u64>,
    /// For a rados: store: where this host caches its blocks (a directory per store; default
    /// /var/cache/parallax for root, else ~/.cache/parallax).
    #[arg(long, global = true, env = "PARALLAX_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// For a rados: store: the most its local cache holds (K/M/G/T suffixes; 0: no cache;
    /// default 8G).
    #[arg(long, global = true, env = "PARALLAX_CACHE_SIZE", value_name = "SIZE",
          value_parser = parse_size)]
    cache_size: Option<u64>,
}

impl ClusterArgs {
    /// `base` (defaults, or serve's config file) with what was given on the command line.
    fn over(&self, mut base: ClusterConfig) -> anyhow::Result<ClusterConfig> {
        if let Some(c) = &self.ceph_conf {
            base.ceph_conf = c.clone();
        }
        if let Some(u) = &self.ceph_user {
            base.ceph_user = u.clone();
        }
        if !self.etcd.is_empty() {
            base.etcd = self.etcd.clone();
        }
        if self.host.is_some() {
            base.host = self.host.clone();
        }
        if let Some(t) = self.lease_ttl {
            base.lease_ttl_secs = t;
        }
        if self.cache_dir.is_some() {
            base.cache_dir = self.cache_dir.clone();
        }
        if let Some(b) = self.cache_size {
            base.cache_bytes = b;
        }
        base.validate().map_err(|e| anyhow!(e))?;
        Ok(base)
    }
}

impl Place {
    /// The daemon `--connect` names, if it does.
    fn remote(&self) -> anyhow::Result<Option<NetClient>> {
        let Some(to) = &self.connect else {
            return Ok(None);
        };
        if self.connect_psk_file.is_none() && self.connect_certificates.is_none() {
            bail!(
                "--connect {to}: the other daemon speaks only TLS: give --connect-psk-file (with \
                 --connect-username) or --connect-certificates"
            );
        }
        let tls = PeerTls {
            psk_file: self.connect_psk_file.clone(),
            username: self.connect_username.clone(),
            certificates: self.connect_certificates.clone(),
        };
        Ok(Some(
            NetClient::new(to, &tls).map_err(|e| anyhow!("--connect {to}: {e}"))?,
        ))
    }

    /// Where a command that reads or changes VDIs goes.
    fn target(&self) -> anyhow::Result<Target> {
        match self.remote()? {
            Some(c) => Ok(Target::Net(c)),
            None => target(
                store_path(&self.store)?,
                &self.cluster.over(ClusterConfig::default())?,
            ),
        }
    }

    /// What to call the store in messages.
    fn store_label(&self) -> PathBuf {
        match (&self.connect, &self.store) {
            (Some(to), _) => PathBuf::from(format!("{to} (over --connect)")),
            (None, Some(p)) => p.clone(),
            (None, None) => PathBuf::new(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// List every VDI and snapshot of every store in a RADOS pool, with the host serving its
    /// store now. Reads the directory the stores' owners keep in etcd (it follows each store
    /// within seconds); opens no store and needs no Ceph access.
    List {
        /// The pool. Default: the one `--store rados:POOL/NAME` names.
        #[arg(long)]
        pool: Option<String>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty store (a sparse file, or on a block device).
    Init {
        /// Size of a store file (K/M/G/T suffixes). Default: 64G, or 90% of the free space of
        /// its file system if that is less. A block device is used whole.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a store in RADOS (`--store rados:POOL/NAME`) with every VDI and snapshot in it:
    /// all its objects, and its records in etcd. Not while a host serves it. (A store file is
    /// removed with rm.)
    Destroy {
        /// Say that everything in the store is to go.
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Stores in a Ceph cluster: what every store of a pool holds, from the directory in etcd.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Create, import, export, snapshot, fork, list, inspect and delete VDIs.
    #[command(subcommand)]
    Vdi(VdiCommand),
    /// Take snapshots periodically and prune them by a keep policy (run by the daemon).
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Verify the store: structure, checksums, leaks and double ownership. Exit status 3 if
    /// anything is damaged.
    Check {
        /// Check metadata only; skip reading every data block.
        #[arg(long)]
        metadata_only: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Reclaim the space of deleted VDIs and snapshots and of discarded blocks.
    Gc {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Store identical blocks once: a dedup pass, or the dedup settings.
    Dedup(dedup::DedupArgs),
    /// Show space usage and what snapshots, forks and dedup save.
    Df {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Move a store made by an older parallax to the current format (2: the intent log that
    /// makes flushes and snapshots fast; 3: rollback, send/recv; 4: snapshot schedules), one
    /// version at a time. Crash-safe; only with no daemon serving the store. Older parallax
    /// versions cannot open the store afterwards.
    Upgrade {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon: serve VDIs over NBD and the block ring, and take CLI requests.
    Serve(ServeArgs),
    /// Print a shell completion script (`make install` puts them in place).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (`man -l <(parallax man)` reads it).
    Man,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Configuration file (RON); every field is optional. See parallax.ron.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// NBD address to listen on, instead of the configured ones (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<String>,
    /// Unix socket to serve NBD on, instead of the configured one.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`metrics.listen`), e.g. 127.0.0.1:9810.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<String>,
    /// NBD over TLS: `require` (the default when credentials are given) refuses clients that
    /// do not send STARTTLS; `allow` serves them in plaintext too (`nbd.tls.mode`).
    #[arg(long, value_enum, value_name = "MODE")]
    tls: Option<crate::nbd::TlsMode>,
    /// The server's TLS certificate chain, PEM (`nbd.tls.cert`).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert, PEM (`nbd.tls.key`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates, PEM: clients must present a certificate one of them signed; its
    /// common name is the client's identity (`nbd.tls.ca`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Pre-shared keys, `identity:hexkey` per line as `psktool -u NAME -p FILE` writes them
    /// (the format qemu-nbd and nbdkit read) (`nbd.tls.psk`).
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
    /// Serve NBD without TLS on addresses other hosts can reach (refused otherwise: anyone
    /// who can connect could read and write every VDI) (`nbd.insecure`).
    #[arg(long)]
    insecure: bool,
    /// Serve the control protocol to other hosts on this address (`HOST[:PORT]`, port 10810
    /// by default), inside TLS with the NBD credentials: what `vdi migrate --to` reaches
    /// (`control.listen`).
    #[arg(long, value_name = "ADDR")]
    control_listen: Option<String>,
    /// A client identity the control listener serves (`psk:NAME`, `cert:NAME`, with `*` and
    /// `?`); repeat for more (`control.clients`).
    #[arg(long, value_name = "ID")]
    control_client: Vec<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Subcommand, Debug)]
enum VdiCommand {
    /// Create an empty VDI, or one backed by a remote NBD export.
    ///
    /// With --backing, the VDI starts as a copy-on-write layer over the export: what it
    /// never wrote is read from there the first time, then kept in the store (shared by its
    /// snapshots and forks, kept across restarts). `vdi hydrate` copies the rest and cuts it
    /// loose. The export should not change (export a snapshot).
    ///
    /// In a store in RADOS, the backing can be a snapshot of another store of the same
    /// cluster, `rados:POOL/STORE/VDI@SNAP`: it is read straight from RADOS (its owner need
    /// not run), and a hold in etcd keeps that store from deleting it until nothing here reads
    /// through it any more.
    Create {
        /// The new VDI's name: letters, digits and `. _ + - :`, up to 200 bytes, not starting
        /// with `-` or `.`.
        name: String,
        /// Size (K/M/G/T suffixes), a multiple of 512 bytes; with --backing, the export's
        /// size if not given.
        #[arg(long, value_parser = parse_size, required_unless_present = "backing")]
        size: Option<u64>,
        /// An NBD export to read through: `nbd://HOST[:PORT]/EXPORT`,
        /// `nbd+unix:///EXPORT?socket=PATH`, or over TLS
        /// `nbds://USER@HOST/EXPORT?tls-psk-file=KEYS` or `nbds://HOST/EXPORT?tls-certificates=DIR`;
        /// or a snapshot of another store in the cluster, `rados:POOL/STORE/VDI@SNAP`.
        #[arg(long, value_name = "URI")]
        backing: Option<String>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Move a VDI to another Parallax host, whose daemon serves `--control-listen`.
    ///
    /// The VDI is copied while its clients keep using it here; then, at the switch-over, its
    /// clients here are detached (stop or pause the VM first), only what changed since the
    /// copy is sent, and the destination owns it. The time without a writer is reported. If
    /// anything fails, the VDI stays whole and owned by one host: here unless the destination
    /// has taken it; if the destination cannot say, the VDI stays parked here until the same
    /// command is run again. Snapshots do not move: send them with `vdi send`.
    Migrate {
        /// The VDI.
        name: String,
        /// The destination's control listener, `HOST[:PORT]` (port 10810 by default).
        #[arg(long, value_name = "HOST")]
        to: String,
        /// Keys (`identity:hexkey` lines, as `psktool` writes) to prove this host's identity.
        #[arg(long, value_name = "FILE")]
        tls_psk_file: Option<PathBuf>,
        /// The identity whose key to use (default: $USER).
        #[arg(long, value_name = "NAME")]
        tls_username: Option<String>,
        /// A directory with `ca-cert.pem` (and `client-cert.pem`, `client-key.pem`) for x509.
        #[arg(long, value_name = "DIR")]
        tls_certificates: Option<PathBuf>,
        /// Delete the VDI's snapshots here once it has moved (without it, a VDI with
        /// snapshots is refused).
        #[arg(long)]
        delete_snapshots: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Copy everything a remote-backed VDI still reads through its backing into the store,
    /// then cut it loose from the backing (clients may use the VDI meanwhile).
    Hydrate {
        /// The VDI (not a snapshot: fork it and hydrate the fork).
        name: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Create a VDI from a raw image; all-zero blocks stay unallocated.
    Import {
        /// The new VDI's name: letters, digits and `. _ + - :`, up to 200 bytes, not starting
        /// with `-` or `.`.
        name: String,
        /// A raw image (convert others with qemu-img convert -O raw), `-` for stdin, or an NBD
        /// export: `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, or over TLS
        /// `nbds://USER@HOST/EXPORT?tls-psk-file=KEYS` or
        /// `nbds://HOST/EXPORT?tls-certificates=DIR` (another Parallax host, qemu-nbd, nbdkit;
        /// only what its block status shows as data is read).
        file: PathBuf,
        /// VDI size, if larger than the image (required when reading a pipe).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Write a VDI or snapshot to a raw file (sparse), a block device, or `-` for stdout.
    Export {
        /// NAME or NAME@SNAP.
        name: String,
        /// Where to write the image: a file (created; see --force), a block device, or `-`.
        file: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON, for scripts (not with `-`: the image is the output).
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot as a stream for `vdi recv`, here or on another host.
    ///
    /// Every block the snapshot holds, or with --from only what changed since an older
    /// snapshot of the same VDI. The stream is self-describing and checksummed
    /// (docs/STREAM.md).
    Send {
        /// NAME@SNAP: the snapshot to send.
        snapshot: String,
        /// Send only the changes since this older snapshot of the same VDI (the receiver needs
        /// it: received earlier, or this is the same store).
        #[arg(long, value_name = "NAME@OLDER")]
        from: Option<String>,
        /// Write the stream to FILE instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print the result as JSON, for scripts (needs --output).
        #[arg(long)]
        json: bool,
    },
    /// Make a new VDI from a stream `vdi send` wrote.
    ///
    /// Makes NAME and NAME@SNAP, holding exactly the sent snapshot. An incremental stream needs
    /// its base here; NAME becomes a fork of it. NAME appears only once the whole stream
    /// arrived and checked out.
    Recv {
        /// The new VDI's name (letters, digits and `. _ + - :`, up to 200 bytes, not starting
        /// with `-` or `.`).
        name: String,
        /// The stream: a file, or `-` for stdin.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Freeze a VDI as NAME@SNAP (read-only, instant, durable when this returns).
    Snapshot {
        /// The VDI, or NAME@SNAP in one word.
        name: String,
        /// The snapshot's name, unless NAME@SNAP was given: letters, digits and `. _ + - :`, up
        /// to 200 bytes, not starting with `-` or `.`.
        snap: Option<String>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Make NEWNAME, a writable copy of snapshot NAME@SNAP (instant).
    Fork {
        /// The snapshot to copy: NAME@SNAP.
        source: String,
        /// The new VDI's name: letters, digits and `. _ + - :`, up to 200 bytes, not starting
        /// with `-` or `.`.
        new_name: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List VDIs and snapshots: VDIs by name, each followed by its snapshots by name. Printed
    /// as read, so the first line of a list of millions comes at once.
    List {
        /// Only names starting with PREFIX (a snapshot is listed as NAME@SNAP).
        #[arg(long)]
        prefix: Option<String>,
        /// Only forks of this snapshot (NAME@SNAP).
        #[arg(long, value_name = "NAME@SNAP")]
        origin: Option<String>,
        /// Only VDIs, or only snapshots.
        #[arg(long = "type", short = 't', value_name = "TYPE")]
        kind: Option<KindArg>,
        /// Columns to show, comma-separated. `used` (data the map points at) and `unique`
        /// (of that, what nothing else shares) walk each map, which takes longer.
        #[arg(
            short = 'o',
            value_delimiter = ',',
            value_name = "COLUMNS",
            default_value = "name,kind,size,created,origin"
        )]
        columns: Vec<Column>,
        /// Scripted mode: no header, columns separated by one tab.
        #[arg(short = 'H')]
        no_header: bool,
        /// Exact numbers: sizes in bytes, times in Unix seconds.
        #[arg(short = 'p')]
        parsable: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Size, allocation (unique vs shared), origin, snapshots of a VDI or snapshot.
    Info {
        /// NAME or NAME@SNAP.
        name: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The byte ranges whose content differs between FROM and TO, usually two points of one
    /// VDI's history (NAME@SNAP, or NAME for its current content), older first. Costs time in
    /// proportion to what changed, not to the size of the VDI. Writes to a VDI named here wait
    /// while the walk runs.
    Diff {
        /// The older point: NAME@SNAP or NAME.
        from: String,
        /// The newer point: NAME@SNAP or NAME.
        to: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show the snapshot-and-fork tree, or the part of it that starts at NAME.
    Tree {
        /// A VDI or snapshot (NAME@SNAP): show it and what descends from it.
        name: Option<String>,
        /// Graphviz output.
        #[arg(long, conflicts_with = "json")]
        dot: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Rename a VDI (its snapshots follow), or NAME@A to NAME@B.
    Rename {
        /// NAME or NAME@SNAP.
        old: String,
        /// The new name: a VDI name (letters, digits and `. _ + - :`, up to 200 bytes, not
        /// starting with `-` or `.`), or NAME@NEWSNAP for a snapshot.
        new: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Roll a VDI back to one of its snapshots.
    ///
    /// Afterwards it reads exactly as the snapshot (contents and size). Its snapshots, older
    /// and newer, all stay. Refused while the VDI is open, unless --force.
    Rollback {
        /// NAME@SNAP: the snapshot of VDI NAME to go back to.
        snapshot: String,
        /// Roll back even while clients have the VDI open: they are detached, and their I/O
        /// fails until they reconnect.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Grow a VDI.
    Resize {
        /// The VDI (snapshots never change).
        name: String,
        /// The new size, or +SIZE to grow by that much (K/M/G/T suffixes; a multiple of 512).
        #[arg(value_parser = parse_new_size, allow_hyphen_values = true)]
        size: NewSize,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Delete a VDI or snapshot and reclaim its space. Forks of a deleted snapshot keep
    /// everything they share with it.
    Delete {
        /// NAME or NAME@SNAP.
        name: String,
        /// Also delete the VDI's snapshots.
        #[arg(long, short)]
        recursive: bool,
        /// Say what would be deleted (or why it would be refused), and delete nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

use output::Column;

/// `vdi list --type`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum KindArg {
    Vdi,
    Snapshot,
}

/// `vdi resize`'s size: absolute, or `+SIZE` relative to the current one.
#[derive(Debug, Clone, Copy)]
enum NewSize {
    To(u64),
    By(u64),
}

fn parse_new_size(text: &str) -> Result<NewSize, String> {
    match text.strip_prefix('+') {
        Some(rest) => parse_size(rest).map(NewSize::By),
        None if text.starts_with('-') => {
            Err("VDIs only grow (shrinking could cut off a guest's data)".into())
        }
        None => parse_size(text).map(NewSize::To),
    }
}

/// Entry point of the `parallax` binary; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let serving = matches!(cli.command, Command::Serve(_));
    if let Err(e) = init_logging(&if serving {
        "info".to_string()
    } else {
        // The command reports a data error itself, as its one error line.
        format!("warn,{}=off", crate::store::DATA_ERROR_TARGET)
    }) {
        eprintln!("parallax: error: {e}");
        return 2;
    }
    let json = cli.command.wants_json();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let message = chain(&e);
            eprintln!("parallax: error: {message}");
            if json {
                // Scripts read stdout: the error, in the shape the control socket uses.
                let kind = error_kind(&e);
                let _ = print_json(&serde_json::json!({
                    "error": { "kind": kind, "message": message }
                }));
            }
            1
        }
    }
}

/// The machine-readable kind of a failure (`StoreError::kind`, also across the control
/// socket), or `error` for anything else.
fn error_kind(e: &anyhow::Error) -> String {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<StoreError>()
                .map(|s| s.kind().to_string())
                .or_else(|| c.downcast_ref::<RemoteError>().map(|r| r.kind.clone()))
        })
        .unwrap_or_else(|| "error".into())
}

impl Command {
    /// Whether the command was asked for `--json` output (its errors then come as JSON too).
    fn wants_json(&self) -> bool {
        match self {
            Command::Init { json, .. }
            | Command::Check { json, .. }
            | Command::Gc { json }
            | Command::Df { json }
            | Command::Destroy { json, .. }
            | Command::Cluster(ClusterCommand::List { json, .. })
            | Command::Upgrade { json } => *json,
            Command::Vdi(v) => match v {
                VdiCommand::Create { json, .. }
                | VdiCommand::Import { json, .. }
                | VdiCommand::Export { json, .. }
                | VdiCommand::Snapshot { json, .. }
                | VdiCommand::Fork { json, .. }
                | VdiCommand::List { json, .. }
                | VdiCommand::Info { json, .. }
                | VdiCommand::Tree { json, .. }
                | VdiCommand::Diff { json, .. }
                | VdiCommand::Rename { json, .. }
                | VdiCommand::Rollback { json, .. }
                | VdiCommand::Send { json, .. }
                | VdiCommand::Recv { json, .. }
                | VdiCommand::Resize { json, .. }
                | VdiCommand::Delete { json, .. }
                | VdiCommand::Hydrate { json, .. }
                | VdiCommand::Migrate { json, .. } => *json,
            },
            Command::Schedule(s) => s.wants_json(),
            Command::Dedup(d) => d.wants_json(),
            Command::Serve(_) | Command::Completions { .. } | Command::Man => false,
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Logging to stderr: `RUST_LOG` if set (a malformed one is an error, not silence), else
/// `default`.
fn init_logging(default: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| anyhow!("RUST_LOG={spec:?} is not a log filter: {e}"))?,
        _ => tracing_subscriber::EnvFilter::new(default),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    Ok(())
}

fn store_path(p: &Option<PathBuf>) -> anyhow::Result<&Path> {
    p.as_deref()
        .ok_or_else(|| anyhow!("no store given: pass --store PATH or set PARALLAX_STORE"))
}

/// Where commands go: the store itself, the daemon holding it, or another host's daemon.
enum Target {
    Direct(Arc<Store>),
    Daemon(ControlAddr),
    Net(NetClient),
}

/// The size of the VDI an image sent over the network makes: `--size`, or the image's own
/// (rounded up to 512 bytes) when it is a file; a pipe needs `--size`.
fn streamed_import_size(f: &File, size: Option<u64>) -> anyhow::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_dir() {
        bail!("the source is a directory, not a raw disk image");
    }
    let image = if meta.is_file() {
        Some(meta.len())
    } else if meta.file_type().is_block_device() {
        Some(transfer::file_size(f)?)
    } else {
        None
    };
    match (image, size) {
        (Some(n), Some(s)) if s < n => {
            bail!("--size {s} is smaller than the image ({n} bytes)")
        }
        (_, Some(s)) => Ok(s),
        (Some(0), None) => bail!("the image is empty"),
        (Some(n), None) => Ok(n.div_ceil(512) * 512),
        (None, None) => {
            bail!("importing from a pipe needs --size (the image's size cannot be known up front)")
        }
    }
}

impl Target {
    /// Refuses `what` (a command that hands over a file) before it touches any file, when
    /// the daemon is on another host.
    fn needs_host(&self, what: &str) -> anyhow::Result<()> {
        if let Target::Net(c) = self {
            bail!(
                "`{what}` hands over a file, which cannot cross a network: run it on {} itself \
                 (VDIs move between hosts with `vdi migrate`)",
                c.addr()
            );
        }
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // A store the CLI opened itself is closed cleanly (committed, marked clean).
        if let Target::Direct(s) = self {
            if let Err(e) = s.close() {
                eprintln!("parallax: warning: closing the store: {e}");
            } else if let Err(e) = cluster::publish(s) {
                // A store in RADOS: the pool's directory in etcd follows its registry.
                eprintln!("parallax: warning: updating the pool's directory: {e}");
            }
        }
    }
}

fn target(path: &Path, cluster: &ClusterConfig) -> anyhow::Result<Target> {
    if let Some(rs) = RadosStore::parse(path) {
        return cluster_target(path, rs.map_err(|e| anyhow!(e))?, cluster);
    }
    if !path.exists() {
        bail!(
            "store {} does not exist (create it with `parallax --store {} init`)",
            path.display(),
            path.display()
        );
    }
    let addr = ControlAddr::for_client(path)?;
    if ControlClient::connect(&addr).is_ok() {
        return Ok(Target::Daemon(addr));
    }
    match Store::open(path, StoreOptions::default()) {
        Ok(s) => {
            s.set_remote(cluster::remote(
                &s,
                cluster,
                Arc::new(NbdRemote::new(DEFAULT_RECONNECT_DELAY)),
            ));
            Ok(Target::Direct(s))
        }
        Err(StoreError::InUse { pid }) => bail!(
            "store {} is in use by {} and no parallax daemon answers on {addr}",
            path.display(),
            pid.map_or("another process".to_string(), |p| format!("PID {p}"))
        ),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot open store {}", path.display())))
        }
    }
}

/// A store in RADOS: through the daemon on this host that holds it, or opened here if nobody
/// holds it.
fn cluster_target(path: &Path, rs: RadosStore, cluster: &ClusterConfig) -> anyhow::Result<Target> {
    let addr = ControlAddr::for_client(path)?;
    if ControlClient::connect(&addr).is_ok() {
        return Ok(Target::Daemon(addr));
    }
    match cluster::open(&rs, cluster, StoreOptions::default(), false, &mut |_| {}) {
        Ok(s) => {
            s.set_remote(cluster::remote(
                &s,
                cluster,
                Arc::new(NbdRemote::new(DEFAULT_RECONNECT_DELAY)),
            ));
            Ok(Target::Direct(s))
        }
        Err(ClusterError::Held { holder, .. }) => bail!(
            "store {rs} is held by {holder}, and no parallax daemon answers here on {addr}: run \
             the command on {}, or send it to its daemon with --connect",
            holder.host
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot open store {rs}"))),
    }
}

/// A progress bar on stderr, drawn only on a terminal.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn new(what: &str, bytes: bool, quiet: bool) -> Bar {
        if quiet || !io::stderr().is_terminal() {
            return Bar(None);
        }
        let b = indicatif::ProgressBar::new(0);
        // The bar takes what the terminal's width leaves; the message is cut to 20 columns,
        // so that the line fits 80 columns without wrapping.
        let tmpl = if bytes {
            "{msg:20!} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg:20!} [{wide_bar}] {pos}/{len} {per_sec} eta {eta}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(tmpl) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(what.to_string());
        Bar(Some(b))
    }

    fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Target {
    /// Runs `req` on the daemon, or `direct` on the store.
    fn call<T: DeserializeOwned>(
        &self,
        req: Request,
        file: Option<&File>,
        bar: Option<&Bar>,
        direct: impl FnOnce(&Arc<Store>, &mut dyn FnMut(u64, u64)) -> Result<T, StoreError>,
    ) -> anyhow::Result<T> {
        let mut progress = |d: u64, t: u64| {
            if let Some(b) = bar {
                b.update(d, t);
            }
        };
        let r = match self {
            Target::Direct(s) => direct(s, &mut progress).map_err(anyhow::Error::new),
            Target::Daemon(addr) => {
                let client = ControlClient::connect(addr)
                    .with_context(|| format!("cannot reach the daemon on {addr}"))?;
                match client.call(&req, file, &mut progress)? {
                    Ok(v) => serde_json::from_value(v).context("unexpected answer from the daemon"),
                    Err(e) => Err(anyhow::Error::new(e)),
                }
            }
            // Only an import gets here with a file: its image follows the request.
            Target::Net(c) if file.is_some() => {
                let total = match &req {
                    Request::Import { size, .. } => size.unwrap_or(0),
                    _ => bail!("`{req}` cannot cross a network: run it on {}", c.addr()),
                };
                let mut body = file.expect("checked");
                c.request_with_body(
                    &req,
                    &mut body,
                    &mut |sent| {
                        if let Some(b) = bar {
                            b.update(sent, total);
                        }
                    },
                    &mut |_, _| {},
                )
                .map_err(anyhow::Error::new)
                .and_then(|v| {
                    serde_json::from_value(v).context("unexpected answer from the daemon")
                })
            }
            Target::Net(c) => c
                .request(&req, &mut progress, &mut |_| {
                    Err(std::io::Error::other("an item in an answer that has none"))
                })
                .map_err(anyhow::Error::new)
                .and_then(|v| {
                    serde_json::from_value(v).context("unexpected answer from the daemon")
                }),
        };
        if let Some(b) = bar {
            b.finish();
        }
        r
    }
}

impl Target {
    /// `vdi list`: each entry to `each` as soon as it is read (streamed by the daemon).
    fn list(
        &self,
        filter: &ListFilter,
        each: &mut dyn FnMut(VdiSummary) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        match self {
            Target::Direct(s) => {
                // An output error stops the walk; it is reported as itself, not as the store's.
                let mut failed = None;
                let r = s.list_each(filter, &mut |v| {
                    each(v).map_err(|e| {
                        failed = Some(e);
                        StoreError::Invalid("output failed".into())
                    })
                });
                match failed {
                    Some(e) => Err(e.into()),
                    None => r.map_err(anyhow::Error::new),
                }
            }
            Target::Daemon(_) | Target::Net(_) => {
                let req = Request::List {
                    prefix: filter.prefix.clone(),
                    origin: filter.origin.clone(),
                    kind: filter.kind,
                    usage: filter.usage,
                    stream: true,
                };
                let mut item = |v: serde_json::Value| {
                    each(serde_json::from_value(v).map_err(std::io::Error::other)?)
                };
                match self {
                    Target::Daemon(addr) => ControlClient::connect(addr)
                        .with_context(|| format!("cannot reach the daemon on {addr}"))?
                        .call_each(&req, None, &mut |_, _| {}, &mut item)?
                        .map(drop)
                        .map_err(anyhow::Error::new),
                    Target::Net(c) => c
                        .request(&req, &mut |_, _| {}, &mut item)
                        .map(drop)
                        .map_err(anyhow::Error::new),
                    Target::Direct(_) => unreachable!("handled above"),
                }
            }
        }
    }
}

/// A reader that stopped reading (`parallax vdi list | head`) is not an error.
fn quiet_broken_pipe(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// A duplicate of our own standard input or output, as a file to hand on (to a transfer
/// here, or to the daemon with the request).
fn dup_std(fd: i32) -> io::Result<File> {
    // SAFETY: dup of one of our own standard descriptors; the File owns the duplicate.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a freshly duplicated descriptor nobody else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// A progress callback for a transfer run here: nothing stops it but an interrupt.
fn quiet(p: &mut dyn FnMut(u64, u64)) -> impl FnMut(u64, u64) -> Result<(), StoreError> + '_ {
    move |d, t| {
        p(d, t);
        Ok(())
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints what a command did: `value` as JSON for scripts, else the line `text` makes.
fn report(
    json: bool,
    value: serde_json::Value,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        print_json(&value)
    } else {
        println!("{}", text());
        Ok(())
    }
}

/// Default size of a new store in RADOS: its objects are made as blocks are written, so the
/// size is only the most it can hold.
const DEFAULT_RADOS_SIZE: u64 = 64 << 30;

/// Default size of a new store file: 64 GiB, or 90% of the free space where it goes.
fn default_store_size(path: &Path) -> u64 {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let free = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| {
            // SAFETY: statvfs is plain data, filled in by the call; `c` is a valid C string.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid for the duration of the call.
            (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
                .then(|| st.f_bavail as u64 * st.f_frsize as u64)
        });
    let cap = 64u64 << 30;
    let size = free.map_or(cap, |f| cap.min(f / 10 * 9));
    size / (1 << 20) * (1 << 20)
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let Cli { place, command } = cli;
    if place.connect.is_some()
        && matches!(
            command,
            Command::Init { .. } | Command::Upgrade { .. } | Command::Serve(_)
        )
    {
        bail!("init, upgrade and serve work on a store of this host; --connect cannot reach them");
    }
    match command {
        Command::Serve(args) => serve(place.store, &place.cluster, args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "parallax", &mut io::stdout());
            Ok(0)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut io::stdout())?;
            Ok(0)
        }
        Command::Init { size, json } => {
            let path = store_path(&place.store)?;
            if let Some(rs) = RadosStore::parse(path) {
                let rs = rs.map_err(|e| anyhow!(e))?;
                let cfg = place.cluster.over(ClusterConfig::default())?;
                let store = cluster::create(
                    &rs,
                    &cfg,
                    size.unwrap_or(DEFAULT_RADOS_SIZE),
                    StoreOptions::default(),
                )
                .with_context(|| format!("cannot create store {rs}"))?;
                let total = store.geometry().total_blocks * 4096;
                let capacity = store.geometry().data_blocks() * 4096;
                store.close().context("closing the new store")?;
                if json {
                    print_json(&serde_json::json!({
                        "store": rs.to_string(),
                        "size": total,
                        "capacity": capacity,
                    }))?;
                } else {
                    println!(
                        "created store {rs}: {} ({} for blocks; RADOS objects are made as blocks are written)",
                        format_size(total),
                        format_size(capacity),
                    );
                }
                return Ok(0);
            }
            let is_dev = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
            let size = if is_dev {
                size
            } else {
                Some(size.unwrap_or_else(|| default_store_size(path)))
            };
            let store = Store::create(path, size, StoreOptions::default())
                .with_context(|| format!("cannot create store {}", path.display()))?;
            let geo = store.geometry();
            let total = geo.total_blocks * 4096;
            if json {
                print_json(&serde_json::json!({
                    "store": path.display().to_string(),
                    "size": total,
                    "capacity": geo.data_blocks() * 4096,
                }))?;
            } else {
                println!(
                    "created store {}: {} ({} for blocks{})",
                    path.display(),
                    format_size(total),
                    format_size(geo.data_blocks() * 4096),
                    if is_dev { "" } else { "; the file is sparse" }
                );
            }
            Ok(0)
        }
        Command::Vdi(cmd) => vdi(place.target()?, cmd),
        Command::Schedule(cmd) => schedule::schedule(place.target()?, cmd),
        Command::Dedup(args) => dedup::dedup(place.target()?, args),
        Command::Check {
            metadata_only,
            json,
        } => {
            let t = place.target()?;
            let bar = Bar::new("checking", false, json);
            let r: CheckReport = t.call(
                Request::Check {
                    verify_data: !metadata_only,
                },
                None,
                Some(&bar),
                |s, p| s.check(!metadata_only, &mut |c| p(c.blocks_visited, c.blocks_total)),
            )?;
            if json {
                print_json(&r)?;
            } else {
                output::check(&r);
            }
            Ok(if r.ok { 0 } else { 3 })
        }
        Command::Gc { json } => {
            let t = place.target()?;
            let bar = Bar::new("reclaiming", false, json);
            let r: GcReport = t.call(Request::Gc, None, Some(&bar), |s, p| {
                s.gc(&mut |left| p(0, left))
            })?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "reclaimed {} ({} map nodes taken apart); {} free",
                    format_size(r.freed_bytes),
                    r.orphan_nodes_processed,
                    format_size(r.free_bytes)
                );
                if r.swept_bytes > 0 {
                    println!(
                        "gave {} of free space back to RADOS",
                        format_size(r.swept_bytes)
                    );
                }
                if r.holds_released > 0 {
                    println!(
                        "released {} hold(s) on other stores' snapshots that nothing here reads",
                        r.holds_released
                    );
                }
            }
            Ok(0)
        }
        Command::Destroy { yes, json } => {
            let path = store_path(&place.store)?;
            let Some(rs) = RadosStore::parse(path) else {
                bail!(
                    "destroy removes stores in RADOS (--store rados:POOL/NAME); a store file is \
                     removed with rm once no daemon serves it"
                );
            };
            let rs = rs.map_err(|e| anyhow!(e))?;
            if !yes {
                bail!("destroy removes every VDI and snapshot in {rs}: pass --yes to do so");
            }
            let cfg = place.cluster.over(ClusterConfig::default())?;
            let objects = cluster::destroy(&rs, &cfg).map_err(|e| match e {
                ClusterError::Held { holder, .. } => {
                    anyhow!("store {rs} is held by {holder}: stop its daemon first")
                }
                e => anyhow::Error::new(e).context(format!("cannot destroy store {rs}")),
            })?;
            if json {
                print_json(&serde_json::json!({ "store": rs.to_string(), "objects": objects }))?;
            } else {
                println!("destroyed store {rs} ({objects} objects removed)");
            }
            Ok(0)
        }
        Command::Cluster(ClusterCommand::List { pool, json }) => {
            let from_store = place
                .store
                .as_deref()
                .and_then(RadosStore::parse)
                .and_then(Result::ok)
                .map(|rs| rs.pool);
            let Some(pool) = pool.or(from_store) else {
                bail!("which pool? pass --pool POOL (or --store rados:POOL/NAME)");
            };
            let cfg = place.cluster.over(ClusterConfig::default())?;
            let listed = cluster::list(&pool, &cfg)
                .with_context(|| format!("cannot read the directory of pool {pool}"))?;
            if json {
                print_json(&listed)?;
            } else {
                output::cluster_list(&listed);
            }
            Ok(0)
        }
        Command::Upgrade { json } => {
            let path = store_path(&place.store)?;
            let t = target(path, &place.cluster.over(ClusterConfig::default())?)?;
            let Target::Direct(s) = &t else {
                bail!(
                    "stop the daemon serving {} first: `upgrade` works on a closed store",
                    path.display()
                );
            };
            let from = s.format_version();
            let changed = s.upgrade().context("upgrade failed")?;
            let to = s.format_version();
            if json {
                print_json(&serde_json::json!({ "from": from, "to": to, "upgraded": changed }))?;
            } else if changed {
                println!(
                    "upgraded {} from format {from} to format {to}",
                    path.display()
                );
            } else {
                println!("{} is already format {to}", path.display());
            }
            Ok(0)
        }
        Command::Df { json } => {
            let t = place.target()?;
            let r: DfReport = t.call(Request::Df, None, None, |s, _| s.df())?;
            if json {
                print_json(&r)?;
            } else {
                output::df(&place.store_label(), &r);
            }
            Ok(0)
        }
    }
}

fn vdi(t: Target, cmd: VdiCommand) -> anyhow::Result<i32> {
    match cmd {
        VdiCommand::Create {
            name,
            size,
            backing: None,
            json,
        } => {
            let size = size.expect("clap requires --size without --backing");
            t.call::<()>(
                Request::Create {
                    name: name.clone(),
                    size,
                },
                None,
                None,
                |s, _| s.create_vdi(&name, size),
            )?;
            report(
                json,
                serde_json::json!({ "created": name, "size": size }),
                || format!("created {name} ({})", format_size(size)),
            )?;
        }
        VdiCommand::Create {
            name,
            size,
            backing: Some(uri),
            json,
        } => {
            // A snapshot of another store in the cluster: the store checks the rest.
            let uri = if uri.starts_with(cluster::SCHEME) {
                uri
            } else {
                if !NbdUri::is_uri(&uri) {
                    bail!(
                        "--backing takes an NBD URI (nbd://, nbds://, nbd+unix://) or a snapshot                          in RADOS (rados:POOL/STORE/VDI@SNAP), not {uri:?}"
                    );
                }
                NbdUri::parse(&uri).map_err(|e| anyhow!("--backing {uri}: {e}"))?;
                // Kept in the store and used by the daemon: key files by absolute path.
                let cwd = std::env::current_dir().context("cannot find the current directory")?;
                NbdUri::with_absolute_paths(&uri, &cwd)
            };
            let size: u64 = t.call(
                Request::CreateBacked {
                    name: name.clone(),
                    size,
                    uri: uri.clone(),
                },
                None,
                None,
                |s, _| s.create_backed(&name, size, &uri),
            )?;
            report(
                json,
                serde_json::json!({ "created": name, "size": size, "backing": uri }),
                || format!("created {name} ({}), backed by {uri}", format_size(size)),
            )?;
        }
        VdiCommand::Migrate {
            name,
            to,
            tls_psk_file,
            tls_username,
            tls_certificates,
            delete_snapshots,
            json,
        } => {
            if tls_psk_file.is_none() && tls_certificates.is_none() {
                bail!(
                    "the destination speaks only TLS: give --tls-psk-file (with --tls-username) \
                     or --tls-certificates"
                );
            }
            // The daemon reads the key files: by absolute path.
            let cwd = std::env::current_dir().context("cannot find the current directory")?;
            let tls = PeerTls {
                psk_file: tls_psk_file.map(|p| cwd.join(p)),
                username: tls_username,
                certificates: tls_certificates.map(|p| cwd.join(p)),
            };
            let bar = Bar::new(&format!("migrating {name} to {to}"), true, json);
            let req = Request::Migrate {
                name: name.clone(),
                to: to.clone(),
                tls: tls.clone(),
                delete_snapshots,
            };
            let opts = MigrateOptions { delete_snapshots };
            let r: MigrateReport = t.call(req, None, Some(&bar), |s, p| {
                let mut dest = NetClient::new(&to, &tls)?;
                migrate(s, &name, &mut dest, &opts, &mut quiet(p))
            })?;
            bar.finish();
            report(json, serde_json::to_value(&r)?, || {
                let mut out = String::new();
                if let Some(why) = &r.resumed {
                    out.push_str(why);
                    out.push('\n');
                }
                out.push_str(&format!(
                    "migrated {name} to {}: {} copied, then {} during the switch-over; no \
                     writer for {} ms ({} client(s) detached here); {} holds what arrived",
                    r.to,
                    format_size(r.bulk_bytes),
                    format_size(r.delta_bytes),
                    r.downtime_ms,
                    r.detached,
                    r.arrived
                ));
                if !r.deleted_snapshots.is_empty() {
                    out.push_str(&format!(
                        "\ndeleted here: {}",
                        r.deleted_snapshots.join(", ")
                    ));
                }
                if let Some(t) = &r.removed_schedule {
                    out.push_str(&format!("\nremoved the snapshot schedule of {t} here"));
                }
                out
            })?;
        }
        VdiCommand::Hydrate { name, json } => {
            let bar = Bar::new(&format!("hydrating {name}"), true, json);
            let r: HydrateReport = t.call(
                Request::Hydrate { name: name.clone() },
                None,
                Some(&bar),
                |s, p| s.hydrate(&name, &mut quiet(p)),
            )?;
            bar.finish();
            report(json, serde_json::to_value(&r)?, || {
                format!(
                    "hydrated {name}: {} copied in; it no longer reads through {}",
                    format_size(r.hydrated_bytes),
                    r.uri
                )
            })?;
        }
        VdiCommand::Import {
            name,
            file,
            size,
            json,
        } => {
            let uri = file.to_str().filter(|s| NbdUri::is_uri(s));
            let bar = Bar::new(&format!("importing {name}"), true, false);
            let vsize: u64 = if let Some(uri) = uri {
                // The daemon connects itself: the key files the URI names must not depend on
                // this process's directory.
                let cwd = std::env::current_dir().context("cannot find the current directory")?;
                let uri = NbdUri::with_absolute_paths(uri, &cwd);
                t.call(
                    Request::Import {
                        name: name.clone(),
                        size,
                        source: Some(uri.clone()),
                    },
                    None,
                    Some(&bar),
                    |s, p| transfer::import_nbd(s, &name, &uri, size, &mut quiet(p)),
                )?
            } else {
                let f = if file.as_os_str() == "-" {
                    dup_std(0)?
                } else {
                    File::open(&file).with_context(|| format!("cannot open {}", file.display()))?
                };
                // Over the network the image follows the request: its size goes first.
                let sent_size = match &t {
                    Target::Net(_) => Some(streamed_import_size(&f, size)?),
                    _ => size,
                };
                t.call(
                    Request::Import {
                        name: name.clone(),
                        size: sent_size,
                        source: None,
                    },
                    Some(&f),
                    Some(&bar),
                    |s, p| transfer::import(s, &name, &f, size, &mut quiet(p)),
                )?
            };
            let info: VdiInfo =
                t.call(Request::Info { name: name.clone() }, None, None, |s, _| {
                    s.info(&name)
                })?;
            let value = serde_json::json!({
                "imported": name,
                "from": file.display().to_string(),
                "size": vsize,
                "allocated": info.allocated,
            });
            report(json, value, || {
                format!(
                    "imported {} as {name}: {}, {} allocated",
                    file.display(),
                    format_size(vsize),
                    format_size(info.allocated)
                )
            })?;
        }
        VdiCommand::Export {
            name,
            file,
            force,
            json,
        } => {
            t.needs_host(&format!("vdi export {name}"))?;
            if json && file.as_os_str() == "-" {
                bail!("--json cannot go with `-`: the image itself is written to stdout");
            }
            let bar = Bar::new(&format!("exporting {name}"), true, file.as_os_str() == "-");
            let written: u64 = if file.as_os_str() == "-" {
                let stdout = io::stdout();
                if stdout.is_terminal() {
                    bail!("refusing to write a disk image to a terminal; redirect stdout or give a file");
                }
                let out = dup_std(1)?;
                let mut w = &out;
                t.call(
                    Request::Export {
                        name: name.clone(),
                        stream: true,
                    },
                    Some(&out),
                    None,
                    |s, p| {
                        transfer::export(s, &name, transfer::Sink::Stream(&mut w), &mut quiet(p))
                    },
                )?
            } else {
                let out = open_export_target(&file, force)?;
                let r = t.call(
                    Request::Export {
                        name: name.clone(),
                        stream: false,
                    },
                    Some(&out),
                    Some(&bar),
                    |s, p| transfer::export(s, &name, transfer::Sink::File(&out), &mut quiet(p)),
                );
                if r.is_err() && !force {
                    let _ = std::fs::remove_file(&file);
                }
                let n = r?;
                if json {
                    print_json(&serde_json::json!({
                        "exported": name,
                        "to": file.display().to_string(),
                        "data_bytes": n,
                    }))?;
                } else {
                    eprintln!(
                        "exported {name} to {} ({} of data)",
                        file.display(),
                        format_size(n)
                    );
                }
                n
            };
            let _ = written;
        }
        VdiCommand::Send {
            snapshot,
            from,
            output,
            json,
        } => {
            t.needs_host(&format!("vdi send {snapshot}"))?;
            stream::send(&t, snapshot, from, output.as_deref(), json)?
        }
        VdiCommand::Recv { name, file, json } => {
            t.needs_host(&format!("vdi recv {name}"))?;
            stream::recv(&t, name, &file, json)?
        }
        VdiCommand::Snapshot { name, snap, json } => {
            let split = name
                .split_once('@')
                .map(|(v, s)| (v.to_string(), s.to_string()));
            let (name, snap) = match (snap, split) {
                (Some(snap), None) => (name, snap),
                (None, Some(vdi_snap)) => vdi_snap,
                (Some(_), Some(_)) => {
                    bail!("give the snapshot's name once: `vdi snapshot {name}` or `vdi snapshot NAME SNAP`")
                }
                (None, None) => bail!(
                    "name the snapshot: `vdi snapshot {name} SNAP` or `vdi snapshot {name}@SNAP`"
                ),
            };
            t.call::<()>(
                Request::Snapshot {
                    vdi: name.clone(),
                    snap: snap.clone(),
                },
                None,
                None,
                |s, _| s.snapshot(&name, &snap),
            )?;
            let full = format!("{name}@{snap}");
            report(json, serde_json::json!({ "snapshot": full }), || {
                format!("snapshot {full} taken")
            })?;
        }
        VdiCommand::Fork {
            source,
            new_name,
            json,
        } => {
            t.call::<()>(
                Request::Fork {
                    src: source.clone(),
                    new: new_name.clone(),
                },
                None,
                None,
                |s, _| s.fork(&source, &new_name),
            )?;
            let value = serde_json::json!({ "forked": new_name, "origin": source });
            report(json, value, || format!("forked {source} as {new_name}"))?;
        }
        VdiCommand::List {
            prefix,
            origin,
            kind,
            columns,
            no_header,
            parsable,
            json,
        } => {
            let filter = ListFilter {
                prefix,
                origin,
                kind: kind.map(|k| match k {
                    KindArg::Vdi => Kind::Vdi,
                    KindArg::Snapshot => Kind::Snapshot,
                }),
                usage: columns
                    .iter()
                    .any(|c| matches!(c, Column::Used | Column::Unique)),
            };
            let filtered =
                filter.prefix.is_some() || filter.origin.is_some() || filter.kind.is_some();
            let style = output::ListStyle {
                columns: &columns,
                header: !no_header,
                exact: parsable,
                filtered,
            };
            // Entries are printed as they come: a list of a million starts at once.
            let out = std::io::BufWriter::new(std::io::stdout().lock());
            let printed = if json {
                let mut p = output::JsonArrayPrinter::new(out);
                t.list(&filter, &mut |v| p.push(&v))
                    .and_then(|()| Ok(p.finish()?))
            } else {
                let mut p = output::ListPrinter::new(out, &style);
                t.list(&filter, &mut |v| p.push(&v))
                    .and_then(|()| Ok(p.finish()?))
            };
            quiet_broken_pipe(printed)?;
        }
        VdiCommand::Info { name, json } => {
            let v: VdiInfo = t.call(Request::Info { name: name.clone() }, None, None, |s, _| {
                s.info(&name)
            })?;
            if json {
                print_json(&v)?;
            } else {
                output::info(&v);
            }
        }
        VdiCommand::Diff { from, to, json } => {
            let req = Request::Diff {
                from: from.clone(),
                to: to.clone(),
            };
            let v: DiffReport = t.call(req, None, None, |s, _| s.diff(&from, &to))?;
            if json {
                print_json(&v)?;
            } else {
                output::diff(&v);
            }
        }
        VdiCommand::Tree { name, dot, json } => {
            let req = Request::Tree { name: name.clone() };
            let v: Vec<TreeNode> = t.call(req, None, None, |s, _| match &name {
                Some(n) => Ok(vec![s.subtree(n)?]),
                None => s.tree(),
            })?;
            if json {
                print_json(&v)?;
            } else if dot {
                print!("{}", output::tree_dot(&v));
            } else {
                print!("{}", output::tree_text(&v));
            }
        }
        VdiCommand::Rename { old, new, json } => {
            t.call::<()>(
                Request::Rename {
                    old: old.clone(),
                    new: new.clone(),
                },
                None,
                None,
                |s, _| s.rename(&old, &new),
            )?;
            let value = serde_json::json!({ "renamed": old, "to": new });
            report(json, value, || format!("renamed {old} to {new}"))?;
        }
        VdiCommand::Rollback {
            snapshot,
            force,
            json,
        } => {
            let r: RollbackReport = t.call(
                Request::Rollback {
                    snapshot: snapshot.clone(),
                    force,
                },
                None,
                None,
                |s, _| s.rollback(&snapshot, force),
            )?;
            let value = serde_json::to_value(&r)?;
            report(json, value, || {
                let mut line = format!(
                    "rolled {} back to {} ({})",
                    r.vdi,
                    r.snapshot,
                    format_size(r.size)
                );
                if r.detached > 0 {
                    line.push_str(&format!(
                        "; detached {} open handle(s): their clients get I/O errors until they reconnect",
                        r.detached
                    ));
                }
                line
            })?;
        }
        VdiCommand::Resize { name, size, json } => {
            let size = match size {
                NewSize::To(n) => n,
                NewSize::By(n) => {
                    let req = Request::Stat { name: name.clone() };
                    let v: VdiSummary = t.call(req, None, None, |s, _| s.stat(&name))?;
                    v.size
                        .checked_add(n)
                        .ok_or_else(|| anyhow!("{name} cannot grow by {n} bytes"))?
                }
            };
            t.call::<()>(
                Request::Resize {
                    name: name.clone(),
                    size,
                },
                None,
                None,
                |s, _| s.resize(&name, size),
            )?;
            report(
                json,
                serde_json::json!({ "resized": name, "size": size }),
                || format!("{name} is now {}", format_size(size)),
            )?;
        }
        VdiCommand::Delete {
            name,
            recursive,
            dry_run,
            json,
        } => {
            let r: DeleteReport = t.call(
                Request::Delete {
                    name: name.clone(),
                    recursive,
                    dry_run,
                },
                None,
                None,
                |s, _| {
                    if dry_run {
                        return s.delete_dry_run(&name, recursive);
                    }
                    let r = s.delete(&name, recursive)?;
                    s.gc(&mut |_| {})?;
                    Ok(r)
                },
            )?;
            if json {
                print_json(&r)?;
            } else if dry_run {
                println!("would delete {}", r.deleted.join(", "));
            } else {
                println!("deleted {}", r.deleted.join(", "));
            }
        }
    }
    Ok(0)
}

/// Opens an export destination: a new file, an existing one with `force`, or a block device.
fn open_export_target(file: &Path, force: bool) -> anyhow::Result<File> {
    match std::fs::metadata(file) {
        Ok(m) if m.file_type().is_block_device() => OpenOptions::new()
            .write(true)
            .open(file)
            .with_context(|| format!("cannot open {}", file.display())),
        Ok(_) if !force => bail!("{} exists; pass --force to overwrite it", file.display()),
        Ok(_) => OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(file)
            .with_context(|| format!("cannot open {}", file.display())),
        Err(_) => OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(file)
            .with_context(|| format!("cannot create {}", file.display())),
    }
}

fn serve(store: Option<PathBuf>, cluster: &ClusterArgs, args: ServeArgs) -> anyhow::Result<i32> {
    let mut cfg = match &args.config {
        Some(p) => Config::load(p).map_err(|e| anyhow!(e))?,
        None => Config::default(),
    };
    cfg.cluster = cluster.over(cfg.cluster)?;
    if store.is_some() {
        cfg.store = store;
    }
    if !args.listen.is_empty() {
        cfg.nbd.listen = args.listen;
    }
    if let Some(u) = args.unix {
        cfg.nbd.unix = Some(u);
    }
    if let Some(a) = args.metrics_listen {
        cfg.metrics.listen = Some(a);
    }
    let tls = &mut cfg.nbd.tls;
    for (from, to) in [
        (args.tls_cert, &mut tls.cert),
        (args.tls_key, &mut tls.key),
        (args.tls_ca, &mut tls.ca),
        (args.tls_psk, &mut tls.psk),
    ] {
        if from.is_some() {
            *to = from;
        }
    }
    if args.tls.is_some() {
        tls.mode = args.tls;
    }
    cfg.nbd.insecure |= args.insecure;
    if args.control_listen.is_some() {
        cfg.control.listen = args.control_listen;
    }
    if !args.control_client.is_empty() {
        cfg.control.clients = args.control_client;
    }
    if args.print_config {
        println!("{}", cfg.to_ron());
        return Ok(0);
    }
    crate::daemon::serve::run(cfg)?;
    Ok(0)
}
