//! `parallax schedule set|list|remove`: the command-line side of [`crate::schedule`].

use anyhow::anyhow;
use clap::Subcommand;

use super::{print_json, report, Target};
use crate::{
    daemon::control::Request,
    schedule::{self, policy, ScheduleStatus},
};

const SET_ABOUT: &str = "\
Snapshot NAME, or every VDI whose name matches PATTERN, every PERIOD, and delete the automatic
snapshots the keep rules no longer keep.

Snapshots are named by their time (NAME@auto-2026-12-05T23:10:00Z) and taken by the daemon
(`parallax serve`) at each multiple of PERIOD; snapshots with other names are never deleted.
Each keep rule PERIOD:WINDOW keeps one snapshot per PERIOD (the oldest) among those younger
than WINDOW; a snapshot any rule keeps stays, and so does the newest. A VDI follows the
schedule that names it, else the matching pattern with the most literal characters. The
schedule is stored in the store and replaces any earlier one for the same target.

Example: parallax schedule set 'vm-*' --every 10s --keep 10s:1h,1m:1d,1h:30d
  one snapshot per 10 s for an hour, per minute for a day, per hour for 30 days";

#[derive(Subcommand, Debug)]
pub(super) enum ScheduleCommand {
    /// Snapshot a VDI (or every VDI a pattern matches) periodically, keeping what a policy says.
    #[command(long_about = SET_ABOUT)]
    Set {
        /// A VDI name, or a pattern with `*` (any characters) and `?` (one character).
        target: String,
        /// How often: 10s, 5m, 1h, 1d.
        #[arg(long, value_name = "PERIOD")]
        every: String,
        /// What to keep: PERIOD:WINDOW[,…], e.g. 10s:1h,1m:1d,1h:30d. Default: every snapshot
        /// for a day, then one a day for 30 days.
        #[arg(long, value_name = "RULES")]
        keep: Option<String>,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the schedules and how many VDIs each applies to.
    List {
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (the snapshots it took stay).
    Remove {
        /// The name or pattern the schedule was set for.
        target: String,
        /// Print the result as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

impl ScheduleCommand {
    pub(super) fn wants_json(&self) -> bool {
        match self {
            ScheduleCommand::Set { json, .. }
            | ScheduleCommand::List { json }
            | ScheduleCommand::Remove { json, .. } => *json,
        }
    }
}

/// Says, on stderr, that schedules act only while a daemon runs.
fn note_no_daemon(t: &Target, json: bool) {
    if matches!(t, Target::Direct(_)) && !json {
        eprintln!(
            "parallax: note: no daemon serves this store; snapshots are taken while \
             `parallax serve` runs"
        );
    }
}

fn find(list: Vec<ScheduleStatus>, target: &str) -> anyhow::Result<ScheduleStatus> {
    list.into_iter()
        .find(|s| s.target == target)
        .ok_or_else(|| anyhow!("the schedule for {target} is gone (removed meanwhile?)"))
}

pub(super) fn schedule(t: Target, cmd: ScheduleCommand) -> anyhow::Result<i32> {
    let list = |t: &Target| -> anyhow::Result<Vec<ScheduleStatus>> {
        t.call(Request::ScheduleList, None, None, |s, _| {
            schedule::status(s)
        })
    };
    match cmd {
        ScheduleCommand::Set {
            target,
            every,
            keep,
            json,
        } => {
            let spec =
                policy::schedule_from_text(&every, keep.as_deref()).map_err(|e| anyhow!(e))?;
            t.call::<()>(
                Request::ScheduleSet {
                    target: target.clone(),
                    schedule: spec.clone(),
                },
                None,
                None,
                |s, _| s.set_schedule(&target, &spec),
            )?;
            let st = find(list(&t)?, &target)?;
            report(json, serde_json::to_value(&st)?, || {
                format!(
                    "schedule for {}: a snapshot every {}, keeping {} ({} VDI{} now)",
                    st.target,
                    st.every,
                    st.keep_spec,
                    st.vdis,
                    if st.vdis == 1 { "" } else { "s" }
                )
            })?;
            note_no_daemon(&t, json);
        }
        ScheduleCommand::List { json } => {
            let l = list(&t)?;
            if json {
                print_json(&l)?;
            } else if l.is_empty() {
                println!("no schedules (add one with `parallax schedule set NAME --every 1h`)");
            } else {
                let rows: Vec<[String; 4]> = l
                    .iter()
                    .map(|s| {
                        [
                            s.target.clone(),
                            s.every.clone(),
                            s.keep_spec.clone(),
                            s.vdis.to_string(),
                        ]
                    })
                    .collect();
                let header = ["TARGET", "EVERY", "KEEP", "VDIS"].map(String::from);
                let mut width = [0usize; 4];
                for r in std::iter::once(&header).chain(&rows) {
                    for (w, c) in width.iter_mut().zip(r) {
                        *w = (*w).max(c.len());
                    }
                }
                for r in std::iter::once(&header).chain(&rows) {
                    println!(
                        "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
                        r[0],
                        r[1],
                        r[2],
                        r[3],
                        w0 = width[0],
                        w1 = width[1],
                        w2 = width[2],
                        w3 = width[3]
                    );
                }
                note_no_daemon(&t, json);
            }
        }
        ScheduleCommand::Remove { target, json } => {
            t.call::<()>(
                Request::ScheduleRemove {
                    target: target.clone(),
                },
                None,
                None,
                |s, _| s.remove_schedule(&target),
            )?;
            report(json, serde_json::json!({ "removed": target }), || {
                format!("schedule for {target} removed (the snapshots it took stay)")
            })?;
        }
    }
    Ok(0)
}
