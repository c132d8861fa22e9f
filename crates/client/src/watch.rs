//! `GET /v1/ns/{ns}/watch`: the change feed as Server-Sent Events, parsed into
//! [`WatchMessage`]s.

use gapguard_api::WatchEvent;
use serde::{Deserialize, Serialize};

use crate::sse::{SseParser, SSE_EVENT_BYTES_MAX};
use crate::ClientError;

/// The kinds of change a watch can be narrowed to ([`WatchQuery::types`]).
pub const WATCH_TYPES: &[&str] = &["kv", "lease", "pool", "reservation", "grant", "orphan"];

/// What to watch (`GET /v1/ns/{ns}/watch?prefix=&from_revision=&types=`). `Default` watches
/// every change of the namespace from now on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchQuery {
    /// Only changes of keys (or lease, pool, reservation, orphan names) starting with this.
    pub prefix: Option<String>,
    /// Start at this revision (inclusive), replaying the changes since it before the live
    /// ones. `None`: only changes after now. A revision whose history is gone yields
    /// [`WatchMessage::Compacted`].
    pub from_revision: Option<u64>,
    /// Only these kinds of change (a subset of [`WATCH_TYPES`]); empty: all.
    pub types: Vec<String>,
}

/// The query string of a [`WatchQuery`].
#[derive(Serialize)]
pub(crate) struct WatchParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    types: Option<String>,
}

impl WatchQuery {
    pub(crate) fn params(&self) -> WatchParams<'_> {
        WatchParams {
            prefix: self.prefix.as_deref(),
            from_revision: self.from_revision,
            types: (!self.types.is_empty()).then(|| self.types.join(",")),
        }
    }
}

/// One message of a watch.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchMessage {
    /// A committed change (SSE event `change`), in revision order. Several changes may share
    /// a revision (one act writing several keys).
    Change(WatchEvent),
    /// The history asked for is gone (SSE event `compacted`): start again from
    /// `first_available_revision`, or read the current state and watch from now. The stream
    /// ends after it.
    Compacted {
        /// The oldest revision a watch can start from.
        first_available_revision: u64,
    },
    /// This watcher fell too far behind the live changes and was cut off (SSE event
    /// `lagged`): watch again with `from_revision: Some(resume_from_revision)` to miss
    /// nothing. The stream ends after it.
    Lagged {
        /// Where to resume.
        resume_from_revision: u64,
    },
}

/// An open watch: call [`WatchStream::next`] until it returns `None`.
///
/// The request has no timeout of its own (a watch is meant to stay open); a timeout set on the
/// `reqwest::Client` given to [`Client::with_http`](crate::Client::with_http) applies to it too
/// and cuts it off. Dropping the stream closes the connection.
#[derive(Debug)]
pub struct WatchStream {
    url: String,
    /// The open response; `None` once the stream has ended.
    response: Option<reqwest::Response>,
    parser: SseParser,
    last_revision: Option<u64>,
}

/// The data of a `compacted` event.
#[derive(Deserialize)]
struct CompactedData {
    first_available_revision: u64,
}

/// The data of a `lagged` event.
#[derive(Deserialize)]
struct LaggedData {
    resume_from_revision: u64,
}

impl WatchStream {
    pub(crate) fn new(url: String, response: reqwest::Response) -> Self {
        Self { url, response: Some(response), parser: SseParser::new(), last_revision: None }
    }

    /// The next message, waiting for it; `None` once the stream has ended (the server closed
    /// it, or after a [`WatchMessage::Compacted`], a [`WatchMessage::Lagged`] or an error).
    ///
    /// Cancel-safe: if the future is dropped before it completes (in a `tokio::select!`),
    /// no message is lost; the next call picks up where it left off.
    pub async fn next(&mut self) -> Option<Result<WatchMessage, ClientError>> {
        loop {
            while let Some(event) = self.parser.next_event() {
                match self.message(&event.event, &event.data, event.id.as_deref()) {
                    Ok(Some(message)) => {
                        if !matches!(message, WatchMessage::Change(_)) {
                            self.end();
                        }
                        return Some(Ok(message));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.end();
                        return Some(Err(e));
                    }
                }
            }
            let response = self.response.as_mut()?;
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    self.end();
                    return None;
                }
                Err(e) => {
                    let error = ClientError::transport(&self.url, e);
                    self.end();
                    return Some(Err(error));
                }
            };
            if self.parser.feed(&chunk).is_err() {
                self.end();
                return Some(Err(
                    self.decode_error(format!("an event of the stream is longer than {SSE_EVENT_BYTES_MAX} bytes"))
                ));
            }
        }
    }

    /// The last revision all of whose changes have been returned, if any: after a broken
    /// connection, watch again with `from_revision: Some(last_revision + 1)` to miss nothing
    /// (changes of a later revision already returned, if the stream broke in the middle of
    /// one, are then returned again).
    ///
    /// The server marks the last change of each revision with the SSE `id` (the revision);
    /// this is the last such id seen.
    pub fn last_revision(&self) -> Option<u64> {
        self.last_revision
    }

    /// The message of one SSE event; `None` for an event this client does not know. `id` is
    /// the stream's last event id so far.
    fn message(&mut self, event: &str, data: &str, id: Option<&str>) -> Result<Option<WatchMessage>, ClientError> {
        let message = match event {
            "change" => {
                let change: WatchEvent = self.parse(event, data)?;
                // The id carries over from earlier events; it names this change's revision
                // only when this event set it (revisions grow), i.e. the revision is complete.
                if id.and_then(|id| id.trim().parse::<u64>().ok()) == Some(change.revision) {
                    self.last_revision = Some(change.revision);
                }
                WatchMessage::Change(change)
            }
            "compacted" => {
                let CompactedData { first_available_revision } = self.parse(event, data)?;
                WatchMessage::Compacted { first_available_revision }
            }
            "lagged" => {
                let LaggedData { resume_from_revision } = self.parse(event, data)?;
                WatchMessage::Lagged { resume_from_revision }
            }
            _ => return Ok(None),
        };
        Ok(Some(message))
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, event: &str, data: &str) -> Result<T, ClientError> {
        serde_json::from_str(data).map_err(|e| {
            self.decode_error(format!(
                "the data of a `{event}` event does not decode ({e}): {}",
                crate::quote(data.as_bytes())
            ))
        })
    }

    fn decode_error(&self, message: String) -> ClientError {
        ClientError::Decode { url: self.url.clone(), status: 200, message }
    }

    fn end(&mut self) {
        self.response = None;
    }
}
