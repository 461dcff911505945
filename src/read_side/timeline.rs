//! A key's history for people: one sentence per event ([`describe`], the CLI's timeline)
//! and a picture ([`svg`], `GET …/history?format=svg` and `keyledger keys history --svg`).
//!
//! Both work from [`Moment`]s (the history as the API serves it), so the CLI, which only
//! has the JSON, tells the same story as the server. The SVG is drawn by hand — a life bar
//! on a time axis (active, grace, the end) and one row per event — with every text
//! escaped; it depends on nothing.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::history::Moment;

/// The last 8 characters of a key id: enough to tell a pair of keys apart (the first ones
/// of a UUIDv7 are its time, the same for a key and the successor minted with it).
fn short(id: &str) -> String {
    match id.len().checked_sub(8).and_then(|from| id.get(from..)) {
        Some(tail) => format!("…{tail}"),
        None => id.to_owned(),
    }
}

fn text<'a>(payload: &'a Value, field: &str) -> &'a str {
    payload[field].as_str().unwrap_or_default()
}

fn day(payload: &Value, field: &str) -> String {
    time(payload, field)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| "?".into())
}

fn time(payload: &Value, field: &str) -> Option<DateTime<Utc>> {
    payload[field]
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// One sentence telling what `m` did to `key_id`.
pub fn describe(m: &Moment, key_id: Uuid) -> String {
    let p = &m.payload;
    let me = key_id.to_string();
    match m.event_type.as_str() {
        "KeyGenerated" if text(p, "key_id") == me => {
            let mut s = format!(
                "created '{}' (…{}), valid until {}",
                text(p, "label"),
                text(p, "last_five"),
                day(p, "expires_at")
            );
            if let Some(from) = p["rotated_from"].as_str() {
                let _ = write!(s, ", succeeding {}", short(from));
            }
            s
        }
        "KeyGenerated" => format!(
            "successor {} '{}' (…{}) issued",
            short(text(p, "key_id")),
            text(p, "label"),
            text(p, "last_five")
        ),
        "ContactsUpdated" => {
            let contacts: Vec<&str> = p["contacts"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!("contacts set to {}", contacts.join(", "))
        }
        "KeyRotated" if text(p, "old_key_id") == me => {
            let ends = if p["revoke_old_on_first_use"].as_bool().unwrap_or(false) {
                "on the successor's first use, at the latest"
            } else {
                "grace until"
            };
            format!(
                "rotated into {}; {ends} {}",
                short(text(p, "new_key_id")),
                day(p, "old_key_expires_at")
            )
        }
        "KeyRotated" => format!("took over from {}", short(text(p, "old_key_id"))),
        "KeyRevoked" => {
            let cause = p["cause"].as_str().unwrap_or("requested");
            match p["source"].as_str() {
                Some(source) => format!("revoked ({cause}), found at {source}"),
                None => format!("revoked ({cause})"),
            }
        }
        "KeyExpired" => format!("expired (it stopped verifying at {})", day(p, "expires_at")),
        "ExpiryReminderDue" => {
            let to = p["recipients"].as_array().map(Vec::len).unwrap_or(0);
            format!(
                "reminder {} days before expiry, to {to} recipient{}",
                p["stage"].as_u64().unwrap_or(0),
                if to == 1 { "" } else { "s" }
            )
        }
        "LegacyKeyMigrated" => format!(
            "migrated from the legacy key, valid until {}",
            day(p, "expires_at")
        ),
        other => other.to_owned(),
    }
}

/// The colour of each event type's marker.
fn colour(event_type: &str) -> &'static str {
    match event_type {
        "KeyGenerated" => "#2e7d32",
        "LegacyKeyMigrated" => "#00838f",
        "ContactsUpdated" => "#1565c0",
        "ExpiryReminderDue" => "#f9a825",
        "KeyRotated" => "#6a1b9a",
        "KeyRevoked" => "#c62828",
        "KeyExpired" => "#616161",
        _ => "#000000",
    }
}

/// `s` as XML character data or attribute value.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not characters XML allows: control characters and the two non-characters.
            c if c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The key's life as phases on the time axis: when it began, when the grace began (its
/// rotation), when it ended or ends, and how.
struct Life {
    start: DateTime<Utc>,
    grace: Option<DateTime<Utc>>,
    end: DateTime<Utc>,
    ending: &'static str,
}

fn life(moments: &[Moment], key_id: Uuid) -> Option<Life> {
    let me = key_id.to_string();
    let created = moments
        .iter()
        .find(|m| text(&m.payload, "key_id") == me && m.event_type != "ContactsUpdated")?;
    let mut l = Life {
        start: time(&created.payload, "created_at").unwrap_or(created.occurred_at),
        grace: None,
        end: time(&created.payload, "expires_at").unwrap_or(created.occurred_at),
        ending: "expires",
    };
    for m in moments {
        match m.event_type.as_str() {
            "KeyRotated" if text(&m.payload, "old_key_id") == me => {
                l.grace = Some(m.occurred_at);
                if let Some(cut) = time(&m.payload, "old_key_expires_at") {
                    l.end = l.end.min(cut);
                }
            }
            "KeyRevoked" => {
                l.end = m.occurred_at;
                l.ending = "revoked";
            }
            "KeyExpired" => {
                l.end = time(&m.payload, "expires_at").unwrap_or(m.occurred_at);
                l.ending = "expired";
            }
            _ => {}
        }
    }
    Some(l)
}

/// The history of `key_id` as an SVG document.
pub fn svg(key_id: Uuid, moments: &[Moment]) -> String {
    const WIDTH: f64 = 960.0;
    const LEFT: f64 = 40.0;
    const RIGHT: f64 = 920.0;
    const ROW: f64 = 28.0;
    const FIRST_ROW: f64 = 150.0;
    let height = FIRST_ROW + ROW * moments.len() as f64 + 20.0;
    let label = moments
        .iter()
        .find(|m| text(&m.payload, "key_id") == key_id.to_string())
        .map(|m| text(&m.payload, "label").to_owned())
        .unwrap_or_default();
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = write!(
        s,
        r##"<title>History of key {id}</title><rect width="100%" height="100%" fill="#ffffff"/><text x="{LEFT}" y="30" font-size="17" font-weight="bold">Key {id} — {label}</text>"##,
        id = key_id,
        label = escape(&label)
    );
    if let Some(l) = life(moments, key_id) {
        let first = moments.first().map(|m| m.occurred_at).unwrap_or(l.start);
        let last = moments.last().map(|m| m.occurred_at).unwrap_or(l.end);
        let from = l.start.min(first);
        let to = l.end.max(last);
        let span = (to - from).num_milliseconds().max(1) as f64;
        let x = |t: DateTime<Utc>| {
            LEFT + (RIGHT - LEFT) * ((t - from).num_milliseconds() as f64 / span)
        };
        let grace_from = l.grace.unwrap_or(l.end);
        let _ = write!(
            s,
            r##"<g class="life"><rect class="active" x="{a:.1}" y="60" width="{aw:.1}" height="14" fill="#a5d6a7"><title>active</title></rect>"##,
            a = x(l.start),
            aw = (x(grace_from) - x(l.start)).max(1.0)
        );
        if l.grace.is_some() {
            let _ = write!(
                s,
                r##"<rect class="grace" x="{g:.1}" y="60" width="{gw:.1}" height="14" fill="#ffe082"><title>grace</title></rect>"##,
                g = x(grace_from),
                gw = (x(l.end) - x(grace_from)).max(1.0)
            );
        }
        let end_colour = if l.ending == "revoked" {
            "#c62828"
        } else {
            "#616161"
        };
        let _ = write!(
            s,
            r##"<line x1="{e:.1}" y1="54" x2="{e:.1}" y2="80" stroke="{end_colour}" stroke-width="3"/><text x="{LEFT}" y="100" fill="#555">{start}</text><text x="{RIGHT}" y="100" text-anchor="end" fill="#555">{ending} {end}</text>"##,
            e = x(l.end),
            start = l.start.format("%Y-%m-%d %H:%M:%S UTC"),
            ending = l.ending,
            end = l.end.format("%Y-%m-%d %H:%M:%S UTC"),
        );
        for m in moments {
            let _ = write!(
                s,
                r#"<circle class="tick" cx="{:.1}" cy="67" r="4" fill="{}"/>"#,
                x(m.occurred_at),
                colour(&m.event_type)
            );
        }
        s.push_str("</g>");
    }
    let _ = write!(
        s,
        r##"<line x1="{LEFT}" y1="{y0}" x2="{LEFT}" y2="{y1}" stroke="#bbb"/>"##,
        y0 = FIRST_ROW - 14.0,
        y1 = FIRST_ROW + ROW * (moments.len().max(1) as f64 - 1.0)
    );
    for (i, m) in moments.iter().enumerate() {
        let y = FIRST_ROW + ROW * i as f64;
        let _ = write!(
            s,
            r##"<g class="event" data-sequence="{seq}" data-type="{ty}"><circle cx="{LEFT}" cy="{cy}" r="6" fill="{c}"/><text x="{tx}" y="{y}" fill="#555">{when}</text><text x="{tx2}" y="{y}" font-weight="bold">{ty}</text><text x="{tx3}" y="{y}">{what}{by}</text></g>"##,
            seq = m.sequence,
            ty = escape(&m.event_type),
            cy = y - 4.0,
            c = colour(&m.event_type),
            tx = LEFT + 14.0,
            tx2 = LEFT + 180.0,
            tx3 = LEFT + 330.0,
            when = m.occurred_at.format("%Y-%m-%d %H:%M:%S"),
            what = escape(&describe(m, key_id)),
            by = m
                .actor
                .as_deref()
                .map(|a| format!(" — by {}", escape(a)))
                .unwrap_or_default(),
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn moment(seq: u64, ty: &str, at: &str, payload: Value) -> Moment {
        Moment {
            sequence: seq,
            event_type: ty.into(),
            occurred_at: DateTime::parse_from_rfc3339(at)
                .expect("time")
                .with_timezone(&Utc),
            actor: Some("admin <&>".into()),
            payload,
        }
    }

    #[test]
    fn every_event_is_told_and_drawn_with_its_text_escaped() {
        let (old, new) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let moments = vec![
            moment(
                1,
                "KeyGenerated",
                "2026-01-01T00:00:00Z",
                json!({"key_id": old, "label": "a<b", "last_five": "abcde", "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-07-01T00:00:00Z"}),
            ),
            moment(
                2,
                "ContactsUpdated",
                "2026-01-02T00:00:00Z",
                json!({"key_id": old, "contacts": ["x@y.sg"]}),
            ),
            moment(
                3,
                "KeyRotated",
                "2026-01-03T00:00:00Z",
                json!({"old_key_id": old, "new_key_id": new, "old_key_expires_at": "2026-01-04T00:00:00Z", "revoke_old_on_first_use": true}),
            ),
            moment(
                4,
                "KeyRevoked",
                "2026-01-03T06:00:00Z",
                json!({"key_id": old, "cause": "rotated"}),
            ),
        ];
        assert_eq!(describe(&moments[1], old), "contacts set to x@y.sg");
        assert!(describe(&moments[2], old)
            .starts_with("rotated into …00000002; on the successor's first use"));
        assert_eq!(describe(&moments[2], new), "took over from …00000001");
        assert_eq!(describe(&moments[3], old), "revoked (rotated)");
        let svg = svg(old, &moments);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        assert!(svg.contains("admin &lt;&amp;&gt;"));
        for m in &moments {
            assert!(svg.contains(&format!(
                r#"data-sequence="{}" data-type="{}""#,
                m.sequence, m.event_type
            )));
        }
        assert!(
            svg.contains(r#"class="grace""#) && svg.contains("revoked 2026-01-03 06:00:00 UTC")
        );
    }
}
