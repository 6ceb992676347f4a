//! What a snapshot schedule means, free of I/O and of the clock: the spec's text form, which
//! schedule applies to which VDI, the names of automatic snapshots, and the plan — which
//! snapshots to take and which to delete — for a given moment.
//!
//! Retention works in buckets aligned to the Unix epoch, so a restart or a late tick never
//! changes what is kept: a rule `P:W` keeps, among the automatic snapshots younger than `W`,
//! the oldest one in each period `P` (the oldest, so that a later snapshot in the same period
//! never displaces it). A snapshot is kept if any rule keeps it; the newest automatic snapshot
//! is always kept. Snapshots with other names are never touched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::store::{KeepRule, Schedule};

/// What every automatic snapshot's name starts with.
pub const AUTO_PREFIX: &str = "auto-";

/// Parses a duration of whole seconds: `10s`, `1m`, `90min`, `1h`, `30d`, `1w`, `1h30m`.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 10s, 5m, 1h, 30d ({e})"))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(format!(
            "{text:?}: durations are whole seconds, at least 1s"
        ));
    }
    Ok(d.as_secs())
}

/// The shortest exact form of a duration: `10s`, `90s`, `5m`, `1h`, `30d`, `2w`.
pub fn format_duration(secs: u64) -> String {
    for (unit, n) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= n && secs % n == 0 {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

/// Parses a keep spec: `PERIOD:WINDOW[,PERIOD:WINDOW…]`, e.g. `10s:1h,1m:1d,1h:30d`.
pub fn parse_keep(text: &str) -> Result<Vec<KeepRule>, String> {
    text.split(',')
        .map(|rule| {
            let (p, w) = rule.split_once(':').ok_or_else(|| {
                format!("keep rule {rule:?} is not PERIOD:WINDOW (e.g. 1h:30d: one per hour for 30 days)")
            })?;
            Ok(KeepRule {
                every_secs: parse_duration(p)?,
                for_secs: parse_duration(w)?,
            })
        })
        .collect()
}

pub fn format_keep(keep: &[KeepRule]) -> String {
    keep.iter()
        .map(|r| {
            format!(
                "{}:{}",
                format_duration(r.every_secs),
                format_duration(r.for_secs)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The keep spec used when none is given: every snapshot for a day, then one a day for 30
/// days (`10s` → `10s:1d,1d:30d`).
pub fn default_keep(every_secs: u64) -> Vec<KeepRule> {
    let day = 86_400;
    let mut keep = vec![KeepRule {
        every_secs,
        for_secs: day.max(every_secs),
    }];
    if every_secs < day {
        keep.push(KeepRule {
            every_secs: day,
            for_secs: 30 * day,
        });
    }
    keep
}

/// Builds a schedule from its command-line form; `keep` defaults to [`default_keep`].
pub fn schedule_from_text(every: &str, keep: Option<&str>) -> Result<Schedule, String> {
    let every_secs = parse_duration(every)?;
    let keep = match keep {
        Some(k) => parse_keep(k)?,
        None => default_keep(every_secs),
    };
    let s = Schedule { every_secs, keep };
    s.validate()?;
    Ok(s)
}

/// Whether `target` (a name, or a pattern with `*` and `?`) matches VDI `name`.
pub fn matches(target: &str, name: &str) -> bool {
    crate::util::wildcard_match(target, name)
}

fn is_pattern(target: &str) -> bool {
    target.contains(['*', '?'])
}

/// The index of the schedule that applies to VDI `name`: the one naming it, else the matching
/// pattern with the most literal characters (ties: the first in name order). `schedules` is in
/// name order, as the store lists them.
pub fn schedule_for(schedules: &[(String, Schedule)], name: &str) -> Option<usize> {
    let literal = |t: &str| t.chars().filter(|c| *c != '*' && *c != '?').count();
    if let Some(i) = schedules
        .iter()
        .position(|(t, _)| !is_pattern(t) && t == name)
    {
        return Some(i);
    }
    let mut best: Option<usize> = None;
    for (i, (t, _)) in schedules.iter().enumerate() {
        if is_pattern(t)
            && matches(t, name)
            && best.is_none_or(|b| literal(&schedules[b].0) < literal(t))
        {
            best = Some(i);
        }
    }
    best
}

/// The name of the automatic snapshot taken at `secs` (Unix seconds):
/// `auto-2026-12-05T23:10:00Z`.
pub fn auto_name(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    format!("{AUTO_PREFIX}{}", humantime::format_rfc3339_seconds(t))
}

/// The time an automatic snapshot's name says, or `None` if `snap` is not one.
pub fn auto_time(snap: &str) -> Option<u64> {
    let stamp = snap.strip_prefix(AUTO_PREFIX)?;
    // Only the exact form we write (`2026-12-05T23:10:00Z`, no fraction), so that a
    // hand-made `auto-…` variant is not ours.
    if stamp.len() != 20 {
        return None;
    }
    let t = humantime::parse_rfc3339(stamp).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The tick of a schedule at or before `now`: the last multiple of its period.
pub fn last_tick(every_secs: u64, now: u64) -> u64 {
    now - now % every_secs
}

/// The automatic snapshots (times) of one VDI that `schedule` keeps at `now`; `times` in any
/// order.
pub fn kept(schedule: &Schedule, times: &[u64], now: u64) -> Vec<u64> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut keep = std::collections::BTreeSet::new();
    if let Some(&newest) = sorted.last() {
        keep.insert(newest);
    }
    for r in &schedule.keep {
        let mut last_bucket = None;
        for &t in &sorted {
            // Younger than the window (a snapshot from the future, after a clock step back,
            // counts as new).
            if now.saturating_sub(t) >= r.for_secs {
                continue;
            }
            let bucket = t / r.every_secs;
            if last_bucket != Some(bucket) {
                keep.insert(t);
                last_bucket = Some(bucket);
            }
        }
    }
    keep.into_iter().collect()
}

/// One VDI as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHistory {
    pub name: String,
    /// Its snapshots' names (without `NAME@`).
    pub snapshots: Vec<String>,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// (VDI, snapshot name) to take.
    pub take: Vec<(String, String)>,
    /// Full names (`VDI@auto-…`) to delete.
    pub prune: Vec<String>,
    /// When the next tick of any applying schedule falls (Unix seconds), if any applies.
    pub next: Option<u64>,
}

/// The plan at `now` for `vdis` under `schedules` (in name order). A VDI whose newest
/// automatic snapshot is older than its schedule's last tick gets a snapshot named by that
/// tick (one, however many ticks were missed); then everything its policy no longer keeps
/// goes, counting the new snapshot.
pub fn plan(schedules: &[(String, Schedule)], vdis: &[VdiHistory], now: u64) -> Plan {
    let mut p = Plan::default();
    for v in vdis {
        let Some(i) = schedule_for(schedules, &v.name) else {
            continue;
        };
        let s = &schedules[i].1;
        let tick = last_tick(s.every_secs, now);
        let next = tick + s.every_secs;
        p.next = Some(p.next.map_or(next, |n: u64| n.min(next)));
        let mut times: Vec<u64> = v.snapshots.iter().filter_map(|n| auto_time(n)).collect();
        if times.iter().all(|&t| t < tick) {
            p.take.push((v.name.clone(), auto_name(tick)));
            times.push(tick);
        }
        let keep = kept(s, &times, now);
        times.sort_unstable();
        for t in times {
            if keep.binary_search(&t).is_err() {
                p.prune.push(format!("{}@{}", v.name, auto_name(t)));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(every: &str, keep: &str) -> Schedule {
        schedule_from_text(every, Some(keep)).unwrap()
    }

    #[test]
    fn durations_and_keep_specs_parse_and_print() {
        assert_eq!(parse_duration("10s"), Ok(10));
        assert_eq!(parse_duration("1m"), Ok(60));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("30d"), Ok(30 * 86400));
        for bad in ["", "0s", "1.5s", "10", "ten", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        for (secs, text) in [
            (10, "10s"),
            (90, "90s"),
            (300, "5m"),
            (86400, "1d"),
            (1209600, "2w"),
        ] {
            assert_eq!(format_duration(secs), text);
            assert_eq!(parse_duration(text), Ok(secs));
        }
        let spec = "10s:1h,1m:1d,1h:30d";
        assert_eq!(format_keep(&parse_keep(spec).unwrap()), spec);
        assert!(parse_keep("10s").is_err());
        assert!(parse_keep("10s:1h,").is_err());
        assert!(
            schedule_from_text("1h", Some("1h:1m")).is_err(),
            "window < period"
        );
        assert_eq!(
            format_keep(&schedule_from_text("10s", None).unwrap().keep),
            "10s:1d,1d:30d"
        );
        assert_eq!(
            format_keep(&schedule_from_text("2d", None).unwrap().keep),
            "2d:2d"
        );
    }

    #[test]
    fn patterns_match_like_shell_globs() {
        for (t, n, m) in [
            ("vm-*", "vm-1", true),
            ("vm-*", "vm-", true),
            ("vm-*", "vm", false),
            ("*", "anything", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-db-*", "site-db-3", true),
            ("*-db-*", "site-web-3", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(matches(t, n), m, "{t} vs {n}");
        }
    }

    #[test]
    fn the_naming_schedule_wins_then_the_most_literal_pattern() {
        let s = |t: &str| (t.to_string(), sched("1h", "1h:1d"));
        let all = vec![s("*"), s("vm-*"), s("vm-1"), s("vm-?")];
        assert_eq!(schedule_for(&all, "vm-1"), Some(2));
        assert_eq!(
            schedule_for(&all, "vm-2"),
            Some(1),
            "vm-* and vm-? tie; first wins"
        );
        assert_eq!(schedule_for(&all, "db"), Some(0));
        assert_eq!(schedule_for(&all[1..], "db"), None);
    }

    #[test]
    fn auto_names_carry_their_time_and_nothing_else_is_ours() {
        let t = 1_796_512_200; // 2026-12-05T23:10:00Z
        assert_eq!(auto_name(t), "auto-2026-12-05T23:10:00Z");
        assert_eq!(auto_time(&auto_name(t)), Some(t));
        for other in [
            "gold",
            "auto-",
            "auto-2026-12-05T23:10:00",
            "auto-2026-12-05T23:10:00.5Z",
            "auto-2026-12-05 23:10:00Z",
            "Auto-2026-12-05T23:10:00Z",
        ] {
            assert_eq!(auto_time(other), None, "{other}");
        }
    }

    /// Two days of a 10 s schedule with `10s:1h,1m:1d,1h:30d`, pass by pass: what is left is
    /// exactly every snapshot of the last hour, one per minute for the rest of the day, and
    /// one per hour before that.
    #[test]
    fn two_days_of_ten_second_snapshots_thin_out_as_the_policy_says() {
        let schedules = vec![("vm".to_string(), sched("10s", "10s:1h,1m:1d,1h:30d"))];
        let start = 1_800_000_000 - 1_800_000_000 % 86400; // midnight
        let mut v = VdiHistory {
            name: "vm".into(),
            snapshots: vec!["gold".into(), "auto-made-by-hand".into()],
        };
        let mut now = start;
        let end = start + 2 * 86400;
        while now <= end {
            let p = plan(&schedules, std::slice::from_ref(&v), now);
            for (_, s) in &p.take {
                v.snapshots.push(s.clone());
            }
            v.snapshots
                .retain(|s| !p.prune.contains(&format!("vm@{s}")));
            assert_eq!(p.next, Some(last_tick(10, now) + 10));
            now += 10;
        }
        let now = end;
        let times: Vec<u64> = v.snapshots.iter().filter_map(|s| auto_time(s)).collect();
        let in_hour = times.iter().filter(|&&t| now - t < 3600).count();
        let in_day = times
            .iter()
            .filter(|&&t| now - t >= 3600 && now - t < 86400)
            .count();
        let older = times.iter().filter(|&&t| now - t >= 86400).count();
        assert_eq!(in_hour, 360, "every 10 s snapshot of the last hour");
        // Minutes with their oldest snapshot younger than a day, less the hour's (whose
        // oldest-of-minute snapshots are among the 360).
        assert_eq!(in_day, 1440 - 60);
        // Hours of the first day (their :00:00 snapshot), and the start itself.
        assert_eq!(older, 24 + 1);
        assert!(times
            .iter()
            .filter(|&&t| now - t >= 3600)
            .all(|t| t % 60 == 0));
        assert!(times
            .iter()
            .filter(|&&t| now - t >= 86400)
            .all(|t| t % 3600 == 0));
        assert!(v.snapshots.contains(&"gold".to_string()), "not ours: kept");
        assert!(v.snapshots.contains(&"auto-made-by-hand".to_string()));
    }

    #[test]
    fn missed_ticks_give_one_snapshot_and_the_newest_always_stays() {
        let schedules = vec![("a".to_string(), sched("1m", "1m:5m"))];
        let v = VdiHistory {
            name: "a".into(),
            snapshots: vec![auto_name(1000 * 60)],
        };
        // An hour later (a stopped daemon): one snapshot for the current tick, the old one
        // goes.
        let p = plan(&schedules, std::slice::from_ref(&v), 1060 * 60 + 7);
        assert_eq!(p.take, vec![("a".to_string(), auto_name(1060 * 60))]);
        assert_eq!(p.prune, vec![format!("a@{}", auto_name(1000 * 60))]);
        // Nothing due within the tick: nothing taken again.
        let v2 = VdiHistory {
            name: "a".into(),
            snapshots: vec![auto_name(1060 * 60)],
        };
        let p = plan(&schedules, std::slice::from_ref(&v2), 1060 * 60 + 59);
        assert!(p.take.is_empty() && p.prune.is_empty());
        assert_eq!(p.next, Some(1061 * 60));
        // The newest stays even when older than every window (its VDI matched nothing for
        // a while, say).
        assert!(kept(&schedules[0].1, &[60], 1_000_000).contains(&60));
        // VDIs no schedule applies to are left alone.
        let b = VdiHistory {
            name: "b".into(),
            snapshots: vec![auto_name(60)],
        };
        assert_eq!(plan(&schedules, &[b], 1_000_000), Plan::default());
    }
}
