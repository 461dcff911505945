//! `keyledger-tools bench scan`: `keyledger scan` on plain text next to `grep -c` on the
//! same files.
//!
//! It writes `--megabytes` of log-like text (lines of 60–120 characters, one key-shaped
//! string per megabyte) into 20 files under a temporary folder, reads them once so both
//! tools find them in the page cache, then times `keyledger scan FOLDER` (the binary, end
//! to end) and `grep -rc _v1_ FOLDER`, best of three each.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

/// Writes `megabytes` MB of text into 20 files under `dir`; returns the bytes written.
fn write_corpus(dir: &Path, megabytes: usize) -> anyhow::Result<u64> {
    let words = [
        "request",
        "accepted",
        "account",
        "delivered",
        "campaign",
        "recipient",
        "template",
        "queued",
        "bounce",
        "retry",
        "status=200",
        "latency_ms=12",
        "user",
        "GET",
        "POST",
    ];
    let per_file = megabytes * 1_000_000 / 20;
    let mut total = 0u64;
    let mut n = 0usize;
    for f in 0..20 {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(dir.join(format!("log-{f:02}.txt")))?);
        let mut written = 0usize;
        let mut next_key = 500_000usize;
        while written < per_file {
            let mut line = format!("2026-12-01T10:{:02}:{:02}Z INFO", n % 60, (n / 60) % 60);
            for w in 0..(8 + n % 9) {
                line.push(' ');
                line.push_str(words[(n * 7 + w) % words.len()]);
            }
            if written >= next_key {
                line.push_str(&format!(" key=bench{n}_v1_{}", "Q".repeat(44)));
                next_key += 1_000_000;
            }
            line.push('\n');
            out.write_all(line.as_bytes())?;
            written += line.len();
            n += 1;
        }
        out.flush()?;
        total += written as u64;
    }
    Ok(total)
}

/// Best of three wall times of `cmd`, in seconds.
fn best_of_three(mut cmd: impl FnMut() -> Command) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let out = cmd().output().context("cannot run the scanner")?;
        let took = started.elapsed().as_secs_f64();
        // scan exits 1 when it finds keys, grep 0: anything else is a failure.
        if !matches!(out.status.code(), Some(0) | Some(1)) {
            anyhow::bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        best = best.min(took);
    }
    Ok(best)
}

pub fn run(keyledger: &Path, megabytes: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = write_corpus(dir.path(), megabytes.max(20))?;
    // Into the page cache.
    for e in std::fs::read_dir(dir.path())? {
        let _ = std::fs::read(e?.path())?;
    }
    let scan = best_of_three(|| {
        let mut c = Command::new(keyledger);
        c.arg("scan").arg(dir.path());
        c
    })?;
    let grep = best_of_three(|| {
        let mut c = Command::new("grep");
        c.args(["-rc", "_v1_"]).arg(dir.path());
        c
    })?;
    let mb = bytes as f64 / 1e6;
    println!("{mb:.0} MB of log-like text in 20 files (page cache warm), best of three runs each.");
    println!();
    println!("| tool | seconds | MB/s | vs grep -c |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| `grep -rc _v1_` (baseline) | {grep:.3} | {:.0} | 1.00× |",
        mb / grep
    );
    println!(
        "| `keyledger scan` | {scan:.3} | {:.0} | {:.2}× |",
        mb / scan,
        grep / scan
    );
    Ok(())
}
