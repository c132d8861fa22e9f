//! Writing results on stdout: JSON documents, pretty or one per line, flushed as they go so
//! `audit tail --follow | jq` sees each event at once.

use std::io::Write as _;

use anyhow::Context as _;
use serde::Serialize;

/// Where command results go.
#[derive(Clone, Copy, Debug)]
pub struct Printer {
    /// One line per document instead of pretty-printed.
    pub compact: bool,
}

impl Printer {
    /// Writes one JSON document and a newline.
    pub fn json<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let text = if self.compact { serde_json::to_string(value) } else { serde_json::to_string_pretty(value) };
        self.line(&text.context("encoding the output as JSON")?)
    }

    /// Writes one line of text.
    pub fn line(&self, text: &str) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush()).context("writing to stdout")
    }
}

/// Tells the person on stderr that an answer was an idempotent replay, not a new effect
/// (stdout keeps the plain answer, the same as the first time).
pub fn note_replay(replayed: bool) {
    if replayed {
        eprintln!(
            "note: idempotent replay: this is the stored answer to an earlier request with the same \
             idempotency key; nothing was applied again"
        );
    }
}
