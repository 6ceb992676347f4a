//! `vdi send` and `vdi recv`: the command-line side of [`crate::stream`].

use std::{
    fs::File,
    io::{self, IsTerminal},
    path::Path,
};

use anyhow::{bail, Context};

use super::{dup_std, format_size, print_json, quiet, report, Bar, Target};
use crate::{
    daemon::control::Request,
    stream::{self, RecvReport, SendReport},
};

pub(super) fn send(
    t: &Target,
    snapshot: String,
    from: Option<String>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let out = match output {
        Some(p) => File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        None => {
            if json {
                bail!("--json needs --output FILE: without it the stream is what goes to stdout");
            }
            if io::stdout().is_terminal() {
                bail!("refusing to write a stream to a terminal; redirect stdout or give --output FILE");
            }
            dup_std(1)?
        }
    };
    let bar = Bar::new(&format!("sending {snapshot}"), true, false);
    let r: anyhow::Result<SendReport> = t.call(
        Request::Send {
            snapshot: snapshot.clone(),
            from: from.clone(),
        },
        Some(&out),
        Some(&bar),
        |s, p| {
            let mut w = &out;
            stream::send(s, &snapshot, from.as_deref(), &mut w, &mut quiet(p))
        },
    );
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            if let Some(p) = output {
                // Nothing half-written stays behind under the name the user gave.
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    if json {
        print_json(&r)?;
    } else {
        let what = match &r.from {
            Some(f) => format!("{} since {f}", r.snapshot),
            None => r.snapshot.clone(),
        };
        eprintln!(
            "sent {what}: {} of data, a {} stream",
            format_size(r.data_bytes),
            format_size(r.stream_bytes)
        );
    }
    Ok(())
}

pub(super) fn recv(t: &Target, name: String, file: &Path, json: bool) -> anyhow::Result<()> {
    let input = if file.as_os_str() == "-" {
        if io::stdin().is_terminal() {
            bail!("a stream comes on stdin (`parallax vdi send … | parallax vdi recv {name}`) or from a file");
        }
        dup_std(0)?
    } else {
        File::open(file).with_context(|| format!("cannot open {}", file.display()))?
    };
    let bar = Bar::new(&format!("receiving {name}"), true, false);
    let r: RecvReport = t.call(
        Request::Recv { name: name.clone() },
        Some(&input),
        Some(&bar),
        |s, p| {
            let mut i = &input;
            stream::recv(s, &name, &mut i, &mut quiet(p))
        },
    )?;
    let value = serde_json::to_value(&r)?;
    report(json, value, || {
        let base = r
            .base
            .as_ref()
            .map(|b| format!(", on {b}"))
            .unwrap_or_default();
        format!(
            "received {} as {} ({}, {} of data{base})",
            r.sent,
            r.snapshot,
            format_size(r.size),
            format_size(r.data_bytes)
        )
    })
}
