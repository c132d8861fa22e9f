//! What can go wrong with a request: the server said no, the server could not be reached, or
//! the answer could not be understood.

use gapguard_api::ErrorBody;

/// Why a request did not produce its answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error status and its JSON error body (`{"error": code,
    /// "message", ...details}`). Match on `body.error` (see [`gapguard_api::codes`]).
    #[error("{}: {}", body.error, body.message)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's error.
        body: ErrorBody,
    },
    /// No answer: the connection could not be made, broke, or timed out.
    #[error("cannot reach gapguard at {url}: {reason}")]
    Transport {
        /// The URL of the request.
        url: String,
        /// The root cause, for a person (e.g. "Connection refused (os error 111)").
        reason: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// An answer that is not what the API promises: a success body that does not decode into
    /// the expected type, or an error status without a gapguard error body (a proxy's page, or
    /// not a gapguard server at all).
    #[error("unexpected response from {url} (HTTP {status}): {message}")]
    Decode {
        /// The URL of the request.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What did not decode, with the start of the body.
        message: String,
    },
    /// The request was not sent because an argument cannot be: a malformed base URL, an
    /// empty or dot-segment key, a header value with control characters.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong with it.
        message: String,
    },
}

impl ClientError {
    /// The HTTP status of an answer, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            Self::Transport { .. } | Self::InvalidArgument { .. } => None,
        }
    }

    /// The server's stable error code (`not_found`, `stale_check`, …), if it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { body, .. } => Some(&body.error),
            _ => None,
        }
    }

    /// Whether the server could not be connected to at all (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Transport { source, .. } if source.is_connect())
    }

    pub(crate) fn transport(url: &str, source: reqwest::Error) -> Self {
        Self::Transport { url: url.to_owned(), reason: root_cause(&source), source }
    }
}

/// The innermost cause of a reqwest error: reqwest's own message only repeats the URL
/// ("error sending request for url (…)"), while the cause says what happened.
fn root_cause(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".into();
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
