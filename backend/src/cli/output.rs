//! Human-readable output of the CLI (the `--json` forms print the report types as they are).

use std::{fmt::Write, path::Path};

use crate::{
    store::{CheckReport, DfReport, DiffReport, Kind, TreeNode, VdiInfo, VdiSummary},
    util::format_size,
};

/// `2026-11-24 10:00:00 UTC` from Unix seconds (no time-zone database needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Vdi => "vdi",
        Kind::Snapshot => "snapshot",
    }
}

/// `cluster list`: one line per VDI or snapshot, with its store and the host serving it.
pub fn cluster_list(listed: &[crate::cluster::directory::Listed]) {
    let w = |f: &dyn Fn(&crate::cluster::directory::Listed) -> usize, min: usize| {
        listed.iter().map(f).max().unwrap_or(0).max(min)
    };
    let (wn, ws) = (w(&|l| l.name.len(), 4), w(&|l| l.store.len(), 5));
    println!(
        "{:wn$}  {:8}  {:>9}  {:ws$}  HOST",
        "NAME", "KIND", "SIZE", "STORE"
    );
    for l in listed {
        let held = if l.held_by.is_empty() {
            String::new()
        } else {
            format!("  (held by {})", l.held_by.join(", "))
        };
        println!(
            "{:wn$}  {:8}  {:>9}  {:ws$}  {}{held}",
            l.name,
            kind(l.entry.kind),
            format_size(l.entry.size),
            l.store,
            l.host.as_deref().unwrap_or("-")
        );
    }
}

/// A fork's origin, marked when it has been deleted (as `vdi tree` marks it).
fn origin(name: &Option<String>, deleted: bool) -> String {
    match name {
        None => "-".into(),
        Some(n) if deleted => format!("{n} (deleted)"),
        Some(n) => n.clone(),
    }
}

/// A column of `vdi list -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Column {
    Name,
    Kind,
    Size,
    Used,
    Unique,
    Created,
    Origin,
}

impl Column {
    fn header(self) -> &'static str {
        match self {
            Column::Name => "NAME",
            Column::Kind => "KIND",
            Column::Size => "SIZE",
            Column::Used => "USED",
            Column::Unique => "UNIQUE",
            Column::Created => "CREATED",
            Column::Origin => "ORIGIN",
        }
    }

    fn numeric(self) -> bool {
        matches!(self, Column::Size | Column::Used | Column::Unique)
    }

    fn cell(self, s: &VdiSummary, exact: bool) -> String {
        let bytes = |n: Option<u64>| match n {
            None => "-".to_string(),
            Some(n) if exact => n.to_string(),
            Some(n) => format_size(n),
        };
        match self {
            Column::Name => s.name.clone(),
            Column::Kind => kind(s.kind).to_string(),
            Column::Size => bytes(Some(s.size)),
            Column::Used => bytes(s.used),
            Column::Unique => bytes(s.unique),
            Column::Created if exact => s.created.to_string(),
            Column::Created => utc(s.created),
            Column::Origin => origin(&s.origin, s.origin_deleted),
        }
    }
}

/// How `vdi list` prints.
pub struct ListStyle<'a> {
    pub columns: &'a [Column],
    /// A header line and aligned columns; without it (`-H`), one tab between columns.
    pub header: bool,
    /// Bytes and Unix seconds instead of human sizes and dates (`-p`).
    pub exact: bool,
    /// Only some entries were asked for.
    pub filtered: bool,
}

/// Rows `vdi list` reads before it prints the table: its column widths fit these, and a
/// longer cell further down just pushes its line out. A shorter list prints as one table.
const LIST_WIDTH_ROWS: usize = 1000;

/// Prints `vdi list` as the entries come, so a list of a million starts at once.
pub struct ListPrinter<'a, W: std::io::Write> {
    out: W,
    style: &'a ListStyle<'a>,
    /// Rows held until the widths are known (empty once they are).
    held: Vec<Vec<String>>,
    widths: Option<Vec<usize>>,
    rows: u64,
}

impl<'a, W: std::io::Write> ListPrinter<'a, W> {
    pub fn new(out: W, style: &'a ListStyle<'a>) -> Self {
        ListPrinter {
            out,
            style,
            held: Vec::new(),
            widths: None,
            rows: 0,
        }
    }

    pub fn push(&mut self, s: &VdiSummary) -> std::io::Result<()> {
        let row: Vec<String> = self
            .style
            .columns
            .iter()
            .map(|c| c.cell(s, self.style.exact))
            .collect();
        self.rows += 1;
        if !self.style.header {
            writeln!(self.out, "{}", row.join("\t"))?;
        } else if self.widths.is_some() {
            self.line(&row)?;
        } else {
            self.held.push(row);
            if self.held.len() >= LIST_WIDTH_ROWS {
                self.print_held()?;
            }
        }
        // The first rows go out at once; after that, in blocks.
        if self.rows <= 1 || self.rows % 1024 == 0 {
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        if self.rows == 0 && self.style.header {
            if self.style.filtered {
                writeln!(self.out, "nothing matches")?;
            } else {
                writeln!(
                    self.out,
                    "no VDIs (create one with `parallax vdi create NAME --size SIZE` or `vdi import`)"
                )?;
            }
        } else if self.widths.is_none() && self.style.header {
            self.print_held()?;
        }
        self.out.flush()
    }

    /// Fixes the widths from the rows held, prints the header and those rows.
    fn print_held(&mut self) -> std::io::Result<()> {
        let widths = self
            .style
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.held
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([c.header().len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        self.widths = Some(widths);
        let header: Vec<String> = self
            .style
            .columns
            .iter()
            .map(|c| c.header().to_string())
            .collect();
        self.line(&header)?;
        for r in std::mem::take(&mut self.held) {
            self.line(&r)?;
        }
        Ok(())
    }

    fn line(&mut self, cells: &[String]) -> std::io::Result<()> {
        let widths = self.widths.as_ref().expect("widths fixed");
        let mut out = String::new();
        for (i, (cell, c)) in cells.iter().zip(self.style.columns).enumerate() {
            let w = widths[i];
            let last = i + 1 == cells.len();
            if i > 0 {
                out.push_str("  ");
            }
            if c.numeric() {
                let _ = write!(out, "{cell:>w$}");
            } else if last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}");
            }
        }
        writeln!(self.out, "{out}")
    }
}

/// Prints a JSON array element by element, exactly as `serde_json::to_string_pretty` prints
/// the whole array, so that a long one starts at once and is never held in memory.
pub struct JsonArrayPrinter<W: std::io::Write> {
    out: W,
    n: u64,
}

impl<W: std::io::Write> JsonArrayPrinter<W> {
    pub fn new(out: W) -> Self {
        JsonArrayPrinter { out, n: 0 }
    }

    pub fn push<T: serde::Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(v).map_err(std::io::Error::other)?;
        self.out
            .write_all(if self.n == 0 { b"[\n" } else { b",\n" })?;
        for (i, l) in text.lines().enumerate() {
            if i > 0 {
                self.out.write_all(b"\n")?;
            }
            write!(self.out, "  {l}")?;
        }
        self.n += 1;
        if self.n <= 1 || self.n % 1024 == 0 {
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out
            .write_all(if self.n == 0 { b"[]\n" } else { b"\n]\n" })?;
        self.out.flush()
    }
}

pub fn info(v: &VdiInfo) {
    println!("name:       {}", v.name);
    println!(
        "kind:       {}{}",
        kind(v.kind),
        if v.kind == Kind::Snapshot {
            " (read-only)"
        } else {
            ""
        }
    );
    println!("size:       {} ({} bytes)", format_size(v.size), v.size);
    println!("created:    {}", utc(v.created));
    if v.origin.is_some() {
        println!("origin:     {}", origin(&v.origin, v.origin_deleted));
    }
    println!(
        "allocated:  {} (unique {}, shared {})",
        format_size(v.allocated),
        format_size(v.unique),
        format_size(v.shared)
    );
    println!("metadata:   {}", format_size(v.metadata));
    if !v.snapshots.is_empty() {
        println!("snapshots:  {}", v.snapshots.join(", "));
    }
    if !v.forks.is_empty() {
        println!("forks:      {}", v.forks.join(", "));
    }
    if v.open_handles > 0 {
        println!("open:       {} handle(s)", v.open_handles);
    }
    if let Some(b) = &v.backing {
        println!("backing:    {}", b.uri);
        println!("  state:    {}", b.state);
        println!(
            "  local {}, cached {}, remote {}",
            format_size(b.local_bytes),
            format_size(b.cached_bytes),
            format_size(b.remote_bytes)
        );
    }
}

pub fn diff(r: &DiffReport) {
    if r.extents.is_empty() {
        println!("{} and {} hold the same content", r.from, r.to);
        return;
    }
    println!("{:>16} {:>16}  change", "offset", "length");
    for e in &r.extents {
        println!(
            "{:>16} {:>16}  {}",
            e.offset,
            e.length,
            if e.zero { "zeroed" } else { "data" }
        );
    }
    println!(
        "{} changed in {} extent(s) of {} ({} from {})",
        format_size(r.changed_bytes),
        r.extents.len(),
        format_size(r.size),
        r.to,
        r.from
    );
}

pub fn df(path: &Path, r: &DfReport) {
    println!(
        "store:      {} ({}, format {}, generation {})",
        path.display(),
        format_size(r.store_bytes),
        r.format_version,
        r.generation
    );
    if r.format_version < crate::store::format::FORMAT_VERSION {
        println!(
            "            (an older format: flushes wait for checkpoints; `parallax upgrade` adds the intent log)"
        );
    }
    println!("capacity:   {}", format_size(r.capacity_bytes));
    println!("used:       {}", format_size(r.used_bytes));
    println!(
        "free:       {} (+ {} kept back for checkpoints)",
        format_size(r.free_bytes),
        format_size(r.reserved_bytes)
    );
    if r.pending_bytes > 0 || r.orphan_nodes > 0 {
        println!(
            "pending:    {} reusable after the next commit; {} map nodes queued for gc",
            format_size(r.pending_bytes),
            r.orphan_nodes
        );
    }
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    println!(
        "VDIs:       {} ({}), {} provisioned",
        r.vdis,
        plural(r.snapshots, "snapshot", "snapshots"),
        format_size(r.provisioned_bytes)
    );
    if r.provisioned_bytes > r.capacity_bytes {
        println!(
            "warning:    the VDIs can grow to {:.1}x the store's capacity: writes fail with \
             \"no space\" once it is full",
            r.provisioned_bytes as f64 / r.capacity_bytes.max(1) as f64
        );
    }
    println!(
        "sharing:    {} mapped by VDIs and snapshots, {} stored ({:.1}x)",
        format_size(r.logical_bytes),
        format_size(r.stored_bytes),
        r.sharing_ratio
    );
    if r.dedup.status.supported {
        println!(
            "dedup:      {}; {} shared, {} saved",
            super::dedup::status_line(&r.dedup.status),
            plural(r.dedup.shared_blocks, "block", "blocks"),
            format_size(r.dedup.saved_bytes)
        );
    }
    if r.remote_caches > 0 {
        println!(
            "remote:     {} cached from {}",
            format_size(r.remote_cache_bytes),
            plural(r.remote_caches, "backing", "backings")
        );
    }
    for b in &r.backed {
        println!(
            "  {}: local {}, cached {}, remote {} ({})",
            b.name,
            format_size(b.local_bytes),
            format_size(b.cached_bytes),
            format_size(b.remote_bytes),
            b.uri
        );
    }
}

pub fn check(r: &CheckReport) {
    if r.ok {
        println!(
            "store OK: generation {}, {} VDIs, {} snapshots, {} map nodes, {} data blocks{}",
            r.generation,
            r.vdis,
            r.snapshots,
            r.map_nodes,
            r.data_blocks,
            if r.data_verified {
                " verified"
            } else {
                " (data not read)"
            }
        );
        return;
    }
    for e in &r.errors {
        println!("error: {e}");
    }
    if r.errors_total as usize > r.errors.len() {
        println!("... and {} more", r.errors_total as usize - r.errors.len());
    }
    println!(
        "store DAMAGED: {} errors ({} checksum, {} leaked blocks, {} blocks referenced beyond their count)",
        r.errors_total, r.checksum_errors, r.leaked_blocks, r.undercounted_blocks
    );
}

pub fn tree_text(nodes: &[TreeNode]) -> String {
    fn walk(out: &mut String, n: &TreeNode, prefix: &str, last: bool, top: bool) {
        let (branch, cont) = if top {
            ("", "")
        } else if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let note = if n.deleted {
            " (deleted)".to_string()
        } else if n.kind == Kind::Vdi {
            format!("  {}", format_size(n.size))
        } else {
            String::new()
        };
        let _ = writeln!(out, "{prefix}{branch}{}{note}", n.name);
        let child_prefix = format!("{prefix}{cont}");
        for (i, c) in n.children.iter().enumerate() {
            walk(out, c, &child_prefix, i + 1 == n.children.len(), false);
        }
    }
    let mut out = String::new();
    if nodes.is_empty() {
        out.push_str("no VDIs\n");
    }
    for n in nodes {
        walk(&mut out, n, "", true, true);
    }
    out
}

pub fn tree_dot(nodes: &[TreeNode]) -> String {
    fn walk(out: &mut String, n: &TreeNode) {
        let shape = match (n.kind, n.deleted) {
            (_, true) => "shape=box,style=dashed",
            (Kind::Vdi, _) => "shape=box",
            (Kind::Snapshot, _) => "shape=ellipse",
        };
        let _ = writeln!(out, "  {:?} [{shape}];", n.name);
        for c in &n.children {
            let _ = writeln!(out, "  {:?} -> {:?};", n.name, c.name);
            walk(out, c);
        }
    }
    let mut out = String::from("digraph parallax {\n  rankdir=LR;\n");
    for n in nodes {
        walk(&mut out, n);
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_513_600), "2026-11-24 09:46:40 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn tree_rendering() {
        let t = vec![TreeNode {
            name: "t".into(),
            kind: Kind::Vdi,
            size: 1 << 30,
            deleted: false,
            children: vec![TreeNode {
                name: "t@gold".into(),
                kind: Kind::Snapshot,
                size: 1 << 30,
                deleted: false,
                children: vec![
                    TreeNode {
                        name: "a".into(),
                        kind: Kind::Vdi,
                        size: 1 << 30,
                        deleted: false,
                        children: vec![],
                    },
                    TreeNode {
                        name: "b".into(),
                        kind: Kind::Vdi,
                        size: 1 << 30,
                        deleted: false,
                        children: vec![],
                    },
                ],
            }],
        }];
        assert_eq!(
            tree_text(&t),
            "t  1.0 GiB\n└── t@gold\n    ├── a  1.0 GiB\n    └── b  1.0 GiB\n"
        );
        assert!(tree_dot(&t).contains("\"t@gold\" -> \"b\";"));
    }
}
