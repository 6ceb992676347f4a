//! `frontend-shim`: plays Xen blkfront against a Parallax ring backend.
//!
//! ```text
//! frontend-shim [--store PATH] verify NAME [--ops N] [--seed S] [--ring-order K] [--queues Q] [--indirect N]
//! frontend-shim [--store PATH] bench NAME --rw randread --bs 4k --depth 32 --queues 1 --seconds 10 [--json]
//! ```
//! `--mem SIZE` serves an in-memory disk from this process instead of attaching to a daemon.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use frontend_shim::{bench, verify, Frontend, FrontendConfig};
use parallax::{blkif::Features, disk::MemDisk, util::parse_size};

#[derive(Parser)]
#[command(
    name = "frontend-shim",
    version,
    about = "Plays Xen blkfront against a Parallax ring backend"
)]
struct Cli {
    /// The store whose running daemon to attach to.
    #[arg(long, env = "PARALLAX_STORE", global = true)]
    store: Option<PathBuf>,
    /// Instead of a daemon, serve an in-memory disk of this size from this process.
    #[arg(long, global = true, value_parser = parse_size)]
    mem: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct RingArgs {
    /// ring-page-order: rings of 2^K pages (0..=4).
    #[arg(long, default_value_t = 0)]
    ring_order: u32,
    /// Number of queues (rings).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Segments per indirect request (0: none).
    #[arg(long, default_value_t = 0)]
    indirect: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Random reads, writes, flushes and discards, checked against a model.
    Verify {
        /// The VDI to attach to.
        name: String,
        #[arg(long, default_value_t = 5000)]
        ops: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Bytes of the disk to exercise (default: up to 64 MiB).
        #[arg(long, value_parser = parse_size)]
        span: Option<u64>,
        /// Request slots per queue (default: the ring size, at most 64).
        #[arg(long)]
        depth: Option<usize>,
        #[command(flatten)]
        ring: RingArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure IOPS, bandwidth and latency.
    Bench {
        name: String,
        /// randread, randwrite, read or write.
        #[arg(long, default_value = "randread")]
        rw: bench::Pattern,
        /// Bytes per request.
        #[arg(long, default_value = "4k", value_parser = parse_size)]
        bs: u64,
        /// Requests in flight per queue.
        #[arg(long, default_value_t = 32)]
        depth: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Bytes of the disk to use (default: all).
        #[arg(long, value_parser = parse_size)]
        span: Option<u64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        ring: RingArgs,
        #[arg(long)]
        json: bool,
    },
}

fn connect(cli: &Cli, name: &str, cfg: &FrontendConfig) -> Result<Frontend> {
    if let Some(size) = cli.mem {
        let disk = Arc::new(MemDisk::new(size / 512 * 512));
        return Ok(Frontend::in_process(disk, Features::default(), cfg)?);
    }
    let Some(store) = &cli.store else {
        bail!("no store: pass --store PATH or set PARALLAX_STORE (or --mem SIZE for an in-memory disk)");
    };
    Frontend::attach_store(store, name, cfg).with_context(|| format!("attaching to {name}"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Verify {
            name,
            ops,
            seed,
            span,
            depth,
            ring,
            json,
        } => {
            let cfg = FrontendConfig {
                ring_order: ring.ring_order,
                queues: ring.queues,
                indirect_segments: ring.indirect,
                depth: *depth,
                ..FrontendConfig::default()
            };
            let mut front = connect(&cli, name, &cfg)?;
            let report = verify::run(
                &mut front,
                &verify::VerifyConfig {
                    ops: *ops,
                    seed: *seed,
                    span: *span,
                },
            )
            .with_context(|| format!("verify of {name} failed"))?;
            front.detach()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "verify {name}: OK, {} ops ({} reads, {} writes, {} flushes, {} barriers, {} discards, {} indirect, {} expected errors), {} read, {} written, per queue {:?}",
                    report.ops,
                    report.reads,
                    report.writes,
                    report.flushes,
                    report.barriers,
                    report.discards,
                    report.indirect,
                    report.expected_errors,
                    parallax::util::format_size(report.bytes_read),
                    parallax::util::format_size(report.bytes_written),
                    report.per_queue,
                );
            }
        }
        Cmd::Bench {
            name,
            rw,
            bs,
            depth,
            seconds,
            span,
            seed,
            ring,
            json,
        } => {
            // Enough slots for the depth, and pages for the block size.
            let pages = bs.div_ceil(4096) as usize;
            let indirect = if pages > 11 {
                ring.indirect.max(pages)
            } else {
                ring.indirect
            };
            let cfg = FrontendConfig {
                ring_order: ring.ring_order,
                queues: ring.queues,
                indirect_segments: indirect,
                depth: Some(*depth),
                read_only: !matches!(rw, bench::Pattern::RandWrite | bench::Pattern::Write),
                ..FrontendConfig::default()
            };
            let mut front = connect(&cli, name, &cfg)?;
            if front.queues()[0].depth() < *depth {
                bail!(
                    "depth {depth} needs a bigger ring: --ring-order {}",
                    (*depth as f64 / 32.0).log2().ceil() as u32
                );
            }
            let report = bench::run(
                &mut front,
                &bench::BenchConfig {
                    pattern: *rw,
                    block_size: *bs,
                    depth: *depth,
                    duration: Duration::from_secs(*seconds),
                    span: *span,
                    seed: *seed,
                },
            )?;
            let reason = front.detach()?;
            if report.interrupted {
                eprintln!("frontend-shim: the backend went away during the run: {reason}");
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.table());
            }
        }
    }
    Ok(())
}
