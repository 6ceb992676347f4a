//! `parallax dedup [status|set]`: the command-line side of the store's dedup (`store::sharing`).

use clap::{Args, Subcommand, ValueEnum};

use super::{report, Bar, Target};
use crate::{
    daemon::control::Request,
    store::{DedupReport, DedupStatus},
    util::format_size,
};

const ABOUT: &str = "\
Store identical blocks once. With no subcommand, runs a dedup pass: walks every VDI and
snapshot, enters into the dedup index the blocks it does not know yet, and points map entries
at an existing copy of their data, comparing bytes first (unless the store trusts the hash),
then reclaims the copies. A pass only rewrites map nodes that one VDI or snapshot alone
reaches, so it never undoes the sharing of snapshots and forks.

Writes dedup inline by default: a block whose data the store already holds is not written
again. A pass is for data that inline dedup did not see: stores from before format 7, and
writes made with inline dedup off. A daemon also runs passes by itself while clients are not
writing (`dedup.background` in parallax.ron).";

#[derive(Args, Debug)]
#[command(long_about = ABOUT, args_conflicts_with_subcommands = true)]
pub(super) struct DedupArgs {
    #[command(subcommand)]
    cmd: Option<DedupCommand>,
    /// Print the result as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum DedupCommand {
    /// Show the store's dedup settings and index.
    Status {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Change the store's dedup settings (kept in the store).
    Set {
        /// Look for an existing copy of each block a client writes (default: on).
        #[arg(long, value_name = "on|off")]
        inline: Option<OnOff>,
        /// Share a block whose hash matches without comparing bytes (default: off). Faster;
        /// two different blocks with the same 192-bit blake3 prefix would then be mixed up.
        #[arg(long, value_name = "on|off")]
        trust_hash: Option<OnOff>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OnOff {
    On,
    Off,
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        matches!(v, OnOff::On)
    }
}

impl DedupArgs {
    pub(super) fn wants_json(&self) -> bool {
        match &self.cmd {
            None => self.json,
            Some(DedupCommand::Status { json } | DedupCommand::Set { json, .. }) => *json,
        }
    }
}

/// One line for the settings and the index.
pub(super) fn status_line(s: &DedupStatus) -> String {
    if !s.supported {
        return "no dedup index in this store's format (`parallax upgrade` adds one)".into();
    }
    format!(
        "inline {}, {}; {} hashes indexed (filter {} in RAM)",
        if s.inline { "on" } else { "off" },
        if s.trust_hash {
            "trusting the hash"
        } else {
            "comparing bytes"
        },
        s.index_entries,
        format_size(s.filter_bytes)
    )
}

pub(super) fn dedup(t: Target, args: DedupArgs) -> anyhow::Result<i32> {
    match args.cmd {
        None => {
            let json = args.json;
            let bar = Bar::new("deduplicating", false, json);
            let r: DedupReport = t.call(Request::Dedup, None, Some(&bar), |s, p| {
                s.dedup_pass(&mut |x| p(x.trees_done, x.trees_total))
            })?;
            bar.finish();
            report(json, serde_json::to_value(&r)?, || {
                format!(
                    "dedup: {} VDIs and snapshots, {} blocks looked at: {} now share a copy, \
                     {} entered in the index{}; {} reclaimed in {:.1}s",
                    r.trees,
                    r.blocks_scanned,
                    r.blocks_shared,
                    r.blocks_indexed,
                    if r.collisions > 0 {
                        format!(
                            ", {} same hash but different bytes (kept apart)",
                            r.collisions
                        )
                    } else {
                        String::new()
                    },
                    format_size(r.freed_bytes),
                    r.seconds
                )
            })?;
        }
        Some(DedupCommand::Status { json }) => {
            let s: DedupStatus =
                t.call(
                    Request::DedupStatus,
                    None,
                    None,
                    |s, _| Ok(s.dedup_status()),
                )?;
            report(json, serde_json::to_value(&s)?, || {
                format!("dedup: {}", status_line(&s))
            })?;
        }
        Some(DedupCommand::Set {
            inline,
            trust_hash,
            json,
        }) => {
            if inline.is_none() && trust_hash.is_none() {
                anyhow::bail!("say what to change: --inline on|off, --trust-hash on|off");
            }
            let (inline, trust_hash) = (inline.map(bool::from), trust_hash.map(bool::from));
            let s: DedupStatus = t.call(
                Request::DedupSet { inline, trust_hash },
                None,
                None,
                |s, _| {
                    s.set_dedup(inline, trust_hash)?;
                    Ok(s.dedup_status())
                },
            )?;
            report(json, serde_json::to_value(&s)?, || {
                format!("dedup: {}", status_line(&s))
            })?;
        }
    }
    Ok(0)
}
