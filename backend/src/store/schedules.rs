//! Snapshot schedules as the store keeps them (format 4): one registry entry per target (a VDI
//! name or a name pattern), changed by one logged entry each, so a schedule set or removed is
//! durable on return and survives restarts like any other change. What a schedule *means*
//! (when to snapshot, what to keep) is the daemon's business (`crate::schedule`); the store
//! only checks that what it keeps is well-formed.

use serde::{Deserialize, Serialize};

use super::{
    error::{StoreError, StoreResult},
    format::u64_at,
    registry::{validate_name, MAX_NAME},
    store::Store,
};

/// Most keep rules in one schedule.
pub const MAX_KEEP_RULES: usize = 16;

/// Registry key of the schedule for `target` (FORMAT.md §6).
pub(super) fn schedule_key(target: &str) -> Vec<u8> {
    let mut k = vec![b'P'];
    k.extend_from_slice(target.as_bytes());
    k
}

/// Registry key prefix of every schedule.
pub(super) const SCHEDULE_PREFIX: &[u8] = b"P";

/// Keep one snapshot per `every_secs` among those younger than `for_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRule {
    pub every_secs: u64,
    pub for_secs: u64,
}

/// A snapshot every `every_secs`; the automatic snapshots that no rule of `keep` keeps are
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub every_secs: u64,
    pub keep: Vec<KeepRule>,
}

impl Schedule {
    /// Refuses what no schedule may be: a zero period, no keep rules or too many, a rule that
    /// keeps nothing (its window shorter than its period).
    pub fn validate(&self) -> Result<(), String> {
        if self.every_secs == 0 {
            return Err("a schedule's period must be at least 1s".into());
        }
        if self.keep.is_empty() || self.keep.len() > MAX_KEEP_RULES {
            return Err(format!(
                "a schedule needs 1 to {MAX_KEEP_RULES} keep rules (it has {})",
                self.keep.len()
            ));
        }
        for r in &self.keep {
            if r.every_secs == 0 || r.for_secs < r.every_secs {
                return Err(format!(
                    "keep rule {}s:{}s keeps nothing: its window must be at least its period",
                    r.every_secs, r.for_secs
                ));
            }
        }
        Ok(())
    }

    /// `every` (u64), the number of rules (u8), then each rule's period and window (u64 each);
    /// little-endian (FORMAT.md §6).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(9 + 16 * self.keep.len());
        b.extend_from_slice(&self.every_secs.to_le_bytes());
        b.push(self.keep.len() as u8);
        for r in &self.keep {
            b.extend_from_slice(&r.every_secs.to_le_bytes());
            b.extend_from_slice(&r.for_secs.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> StoreResult<Schedule> {
        let bad = |why: &str| StoreError::Corrupt(format!("schedule entry: {why}"));
        if b.len() < 9 {
            return Err(bad("too short"));
        }
        let n = b[8] as usize;
        if b.len() != 9 + 16 * n {
            return Err(bad("its length does not match its rule count"));
        }
        let s = Schedule {
            every_secs: u64_at(b, 0),
            keep: (0..n)
                .map(|i| KeepRule {
                    every_secs: u64_at(b, 9 + 16 * i),
                    for_secs: u64_at(b, 17 + 16 * i),
                })
                .collect(),
        };
        s.validate().map_err(|e| bad(&e))?;
        Ok(s)
    }
}

/// Checks a schedule's target: a VDI name, or a pattern of name characters with `*` (any run
/// of characters) and `?` (any one).
pub fn validate_target(target: &str) -> StoreResult<()> {
    if target.len() > MAX_NAME || target.is_empty() {
        return Err(StoreError::Invalid(format!(
            "a schedule's target must be 1 to {MAX_NAME} bytes"
        )));
    }
    if target.contains('@') {
        return Err(StoreError::Invalid(format!(
            "schedule target {target}: schedules are for VDIs, not snapshots (drop the @…)"
        )));
    }
    // Wildcards stand for name characters; what is left must be a name.
    let as_name: String = target
        .chars()
        .map(|c| if c == '*' || c == '?' { 'x' } else { c })
        .collect();
    validate_name(&as_name, "schedule target")
        .map_err(|_| StoreError::Invalid(format!("schedule target {target:?}: names are letters, digits and ._+-:, with * and ? as wildcards, not starting with - or .")))
}

impl Store {
    /// Sets the schedule for `target` (replacing any); durable on return.
    pub fn set_schedule(&self, target: &str, schedule: &Schedule) -> StoreResult<()> {
        validate_target(target)?;
        schedule.validate().map_err(StoreError::Invalid)?;
        self.check_writable()?;
        self.require_schedules()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            self.apply_schedule(&mut cat, target, Some(schedule))?;
        }
        self.flush()
    }

    /// Removes the schedule for `target`; durable on return. The snapshots it took stay.
    pub fn remove_schedule(&self, target: &str) -> StoreResult<()> {
        self.check_writable()?;
        {
            let _change = self.change();
            let mut cat = self.catalog.lock();
            if cat.get_name(&*self.dev, &schedule_key(target))?.is_none() {
                return Err(StoreError::NoSchedule(target.to_string()));
            }
            self.apply_schedule(&mut cat, target, None)?;
        }
        self.flush()
    }

    /// Every schedule, by target.
    pub fn schedules(&self) -> StoreResult<Vec<(String, Schedule)>> {
        let mut cat = self.catalog.lock();
        cat.scan_names(&*self.dev, SCHEDULE_PREFIX)?
            .into_iter()
            .map(|(k, v)| {
                let target = String::from_utf8(k[1..].to_vec())
                    .map_err(|_| StoreError::Corrupt("schedule target is not UTF-8".into()))?;
                Ok((target, Schedule::decode(&v)?))
            })
            .collect()
    }

    fn require_schedules(&self) -> StoreResult<()> {
        let version = self.format_version();
        if version < 4 {
            return Err(StoreError::Invalid(format!(
                "snapshot schedules need store format 4 (this store is format {version}); run \
                 `parallax upgrade` first (older Parallax versions cannot open it after that)"
            )));
        }
        Ok(())
    }
}
