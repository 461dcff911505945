//! `keyledger scan PATH…`: finds keyledger-shaped keys (and Postman's legacy keys, which
//! have the same shape) in files, folders and, with `--git`, every commit of a repository's
//! history — for a pre-commit hook or a CI step (exit 1 when any is found).
//!
//! It prints where each key is and its last five characters, never the key: the output
//! of a scanner ends up in CI logs. With `--report` it submits the keys it found to a
//! running keyledger's `POST /v1/leaks` (reporter token), which revokes the live ones and
//! tells their contacts; the keys are held in memory for that, never written. The scan is a byte search for `_v1_`
//! ([`crate::domain::api_key::key_shaped`], the same test the audit applies to every
//! event), so it reads plain text at the speed of memory.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use keyledger_events::LeakResult;
use zeroize::Zeroizing;

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

/// What a scan has found so far.
#[derive(Default)]
pub struct Scan {
    pub found: Vec<Finding>,
    pub bytes_read: u64,
    /// The keys themselves, by digest — only when they are to be reported.
    keys: Option<HashMap<[u8; 32], Zeroizing<String>>>,
}

impl Scan {
    /// A scan that keeps each distinct key (in memory) for `--report`.
    pub fn keeping_keys() -> Self {
        Self {
            keys: Some(HashMap::new()),
            ..Self::default()
        }
    }

    /// Scans `bytes` of `file`; with `line`, every finding is on that line (a diff line).
    fn add(&mut self, file: &str, bytes: &[u8], line: Option<usize>) {
        for mut f in scan_bytes(file, bytes) {
            if let Some(l) = line {
                f.line = l;
            }
            self.found.push(f);
        }
        if let Some(keys) = &mut self.keys {
            for range in key_shaped(bytes) {
                let key = &bytes[range];
                keys.entry(*blake3::hash(key).as_bytes())
                    .or_insert_with(|| Zeroizing::new(String::from_utf8_lossy(key).into_owned()));
            }
        }
    }

    /// Each distinct key with where it was first found (`file:line`).
    fn keys_with_places(&self) -> Vec<(&str, String)> {
        let Some(keys) = &self.keys else {
            return vec![];
        };
        let mut seen = std::collections::HashSet::new();
        self.found
            .iter()
            .filter(|f| seen.insert(f.digest))
            .filter_map(|f| {
                let key = keys.get(&f.digest)?;
                Some((key.as_str(), format!("{}:{}", f.file, f.line)))
            })
            .collect()
    }
}

/// The keys in the files under `path` (a file or a folder; `.git` folders and symbolic
/// links are not followed).
pub fn scan_path(path: &Path, scan: &mut Scan) -> anyhow::Result<()> {
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
            scan_path(&entry, scan)?;
        }
    } else if meta.is_file() {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        scan.bytes_read += bytes.len() as u64;
        scan.add(&path.display().to_string(), &bytes, None);
    }
    Ok(())
}

/// The keys added by any commit of the repository at `repo` (every branch): `git log -p`
/// read line by line, each added line scanned where the hunk header puts it.
pub fn scan_history(repo: &Path, scan: &mut Scan) -> anyhow::Result<()> {
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
            scan.add(&format!("{commit}:{file}"), added, Some(line));
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

/// Where `--report` sends what was found.
pub struct ReportTo {
    pub client: super::ClientArgs,
    /// Said before each key's place in the report's `source`.
    pub source: String,
}

/// Runs `keyledger scan`; true when nothing was found.
pub async fn run(
    paths: &[PathBuf],
    git: bool,
    json: bool,
    report: Option<ReportTo>,
) -> anyhow::Result<bool> {
    let started = std::time::Instant::now();
    let mut scan = if report.is_some() {
        Scan::keeping_keys()
    } else {
        Scan::default()
    };
    for path in paths {
        scan_path(path, &mut scan)?;
        if git {
            scan_history(path, &mut scan)?;
        }
    }
    let reported = match &report {
        Some(to) => Some(submit(to, &scan).await?),
        None => None,
    };
    let (found, bytes) = (&scan.found, scan.bytes_read);
    let distinct = found
        .iter()
        .map(|f| f.digest)
        .collect::<std::collections::HashSet<_>>()
        .len();
    if json {
        let mut out = serde_json::json!({ "keys": distinct, "found": found });
        if let Some(r) = &reported {
            out["reported"] = serde_json::to_value(r)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in found {
            println!("{}:{}: a key ending …{}", f.file, f.line, f.last_five);
        }
        for r in reported.iter().flatten() {
            eprintln!("reported …{}: {}", r.last_five, r.result.as_str());
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

/// Sends each distinct key to `POST /v1/leaks` with where it was found (up to 100 keys
/// a request, one request per source text). The answers, one per key.
async fn submit(to: &ReportTo, scan: &Scan) -> anyhow::Result<Vec<LeakResult>> {
    let client = super::client::Client::new(&to.client)?;
    let mut results = Vec::new();
    for (key, place) in scan.keys_with_places() {
        let source = format!("{} {place}", to.source).trim().to_owned();
        let body =
            serde_json::json!({"keys": [key], "source": source, "reporter": "keyledger scan"});
        let (status, answer) = client
            .call_with_id(reqwest::Method::POST, "/v1/leaks", Some(body), None)
            .await?;
        if !status.is_success() {
            let message = answer["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            anyhow::bail!("the leak report was refused: {message} ({status})");
        }
        let mut answered: Vec<LeakResult> =
            serde_json::from_value(answer["results"].clone()).context("an unexpected answer")?;
        results.append(&mut answered);
    }
    Ok(results)
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
