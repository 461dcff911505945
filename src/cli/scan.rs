//! `keyledger scan PATH…`: finds keyledger-shaped keys (and Postman's legacy keys, which
//! have the same shape) in files, folders and, with `--git`, every commit of a repository's
//! history — for a pre-commit hook or a CI step (exit 1 when any is found).
//!
//! It prints where each key is and its last five characters, never the key: the output
//! of a scanner ends up in CI logs. The scan is a byte search for `_v1_`
//! ([`crate::domain::api_key::key_shaped`], the same test the audit applies to every
//! event), so it reads plain text at the speed of memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::domain::api_key::key_shaped;

/// One key found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The file (for history, `<commit>:<path>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    pub last_five: String,
    /// BLAKE3 of the key, to count distinct keys (in memory only; never printed).
    #[serde(skip)]
    pub digest: [u8; 32],
}

/// The keys in `bytes`, by line; `file` names where they are.
pub fn scan_bytes(file: &str, bytes: &[u8]) -> Vec<Finding> {
    let mut found = Vec::new();
    let (mut line, mut counted) = (1usize, 0usize);
    for range in key_shaped(bytes) {
        line += memchr::memchr_iter(b'\n', &bytes[counted..range.start]).count();
        counted = range.start;
        let last_five = String::from_utf8_lossy(&bytes[range.end - 5..range.end]).into_owned();
        found.push(Finding {
            file: file.to_owned(),
            line,
            last_five,
            digest: *blake3::hash(&bytes[range]).as_bytes(),
        });
    }
    found
}

/// The keys in the files under `path` (a file or a folder; `.git` folders and symbolic
/// links are not followed).
pub fn scan_path(
    path: &Path,
    found: &mut Vec<Finding>,
    bytes_read: &mut u64,
) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_none_or(|n| n != ".git"))
            .collect();
        entries.sort();
        for entry in entries {
            scan_path(&entry, found, bytes_read)?;
        }
    } else if meta.is_file() {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        *bytes_read += bytes.len() as u64;
        found.extend(scan_bytes(&path.display().to_string(), &bytes));
    }
    Ok(())
}

/// The keys added by any commit of the repository at `repo` (every branch): `git log -p`
/// read line by line, each added line scanned where the hunk header puts it.
pub fn scan_history(repo: &Path, found: &mut Vec<Finding>) -> anyhow::Result<()> {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "log",
            "--all",
            "-p",
            "--no-color",
            "--no-ext-diff",
            "--no-renames",
            "--format=commit %h",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run git (needed for --git)")?;
    let stdout = child.stdout.take().context("git's output")?;
    let (mut commit, mut file, mut line) = (String::new(), String::new(), 0usize);
    for raw in BufReader::new(stdout).split(b'\n') {
        let raw = raw.context("cannot read git's output")?;
        if let Some(c) = raw.strip_prefix(b"commit ") {
            commit = String::from_utf8_lossy(c).into_owned();
        } else if let Some(f) = raw.strip_prefix(b"+++ ") {
            file = String::from_utf8_lossy(f.strip_prefix(b"b/").unwrap_or(f)).into_owned();
        } else if raw.starts_with(b"@@ ") {
            // `@@ -a,b +c,d @@`: the next added or kept line is line c of the new file.
            line = String::from_utf8_lossy(&raw)
                .split_whitespace()
                .nth(2)
                .and_then(|s| s.trim_start_matches('+').split(',').next()?.parse().ok())
                .unwrap_or(1);
        } else if let Some(added) = raw.strip_prefix(b"+") {
            for mut f in scan_bytes(&format!("{commit}:{file}"), added) {
                f.line = line;
                found.push(f);
            }
            line += 1;
        } else if raw.starts_with(b" ") {
            line += 1;
        }
    }
    let out = child.wait_with_output().context("git")?;
    if !out.status.success() {
        anyhow::bail!(
            "git log failed in {}: {}",
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `keyledger scan`; true when nothing was found.
pub fn run(paths: &[PathBuf], git: bool, json: bool) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    let mut found = Vec::new();
    let mut bytes = 0u64;
    for path in paths {
        scan_path(path, &mut found, &mut bytes)?;
        if git {
            scan_history(path, &mut found)?;
        }
    }
    let distinct = found
        .iter()
        .map(|f| f.digest)
        .collect::<std::collections::HashSet<_>>()
        .len();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "keys": distinct, "found": found }))?
        );
    } else {
        for f in &found {
            println!("{}:{}: a key ending …{}", f.file, f.line, f.last_five);
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{distinct} key{} found in {} place{}; {:.1} MB of files in {:.2} s{}",
            if distinct == 1 { "" } else { "s" },
            found.len(),
            if found.len() == 1 { "" } else { "s" },
            bytes as f64 / 1e6,
            seconds,
            if git { ", and the git history" } else { "" }
        );
    }
    Ok(found.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_line_with_only_their_last_five() {
        let key = format!("johndoe_v1_{}", "A".repeat(39) + "xY9/+");
        let text = format!("first line\nsecond {key} here\n\nAPI_KEY={key}\n");
        let found = scan_bytes("f.txt", text.as_bytes());
        let digest = *blake3::hash(key.as_bytes()).as_bytes();
        let at = |line| Finding {
            file: "f.txt".into(),
            line,
            last_five: "xY9/+".into(),
            digest,
        };
        assert_eq!(found, vec![at(2), at(4)]);
        assert!(!format!("{found:?}").contains(&key));
    }
}
