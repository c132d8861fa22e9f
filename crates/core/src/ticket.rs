//! Tickets: what a passing check returns, signed so that only this guard could have issued it.
//!
//! A ticket is `gt1.<claims>.<mac>`, both parts base64url without padding; the claims are JSON
//! and the MAC is HMAC-SHA256 over the claims' bytes with the guard's ticket key. The format
//! is opaque to clients. Signing and verifying are pure functions of the key and the bytes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::condition::Condition;
use crate::state::Revision;

const PREFIX: &str = "gt1.";

/// A ticket's unique id (random, chosen by the engine).
pub type TicketId = [u8; 16];

/// What a ticket asserts: these conditions held in this namespace at this revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// Unique id; an act marks it used.
    pub id: TicketId,
    /// The namespace the check ran in; the ticket is refused anywhere else.
    pub ns: String,
    /// The checked conditions, re-evaluated at use.
    pub conditions: Vec<Condition>,
    /// The revision at which they held.
    pub revision: Revision,
    /// When the check ran (ms since the Unix epoch, server clock).
    pub issued_at_ms: u64,
    /// When the ticket stops being accepted.
    pub expires_at_ms: u64,
    /// The flow the check named, if any.
    pub flow: Option<String>,
    /// The check's correlation id, recorded in the act's audit event.
    pub correlation_id: Option<String>,
    /// The check span's trace id (32 lowercase hex), so the act's span can link to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The check span's span id (16 lowercase hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// A ticket whose signature was verified. Only [`verify`] makes one, so an act that takes a
/// `VerifiedTicket` cannot be handed a forged one.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedTicket {
    claims: TicketClaims,
}

impl VerifiedTicket {
    /// The verified claims.
    pub fn claims(&self) -> &TicketClaims {
        &self.claims
    }
}

/// Why a presented ticket is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// Not shaped like a ticket at all.
    #[error("ticket is malformed: {0}")]
    Malformed(&'static str),
    /// Well formed, but the signature does not match: tampered, or issued by another guard.
    #[error("ticket signature does not verify (tampered, or issued by another gapguard)")]
    BadSignature,
}

/// Signs claims with the ticket key into the opaque ticket string.
pub fn sign(key: &[u8], claims: &TicketClaims) -> String {
    let body = serde_json::to_vec(claims).expect("ticket claims always serialize");
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(PREFIX.len() + body.len() * 4 / 3 + 48);
    out.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(&body, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut out);
    out
}

/// Verifies a ticket's signature (in constant time) and decodes its claims.
pub fn verify(key: &[u8], ticket: &str) -> Result<VerifiedTicket, TicketError> {
    let rest = ticket.strip_prefix(PREFIX).ok_or(TicketError::Malformed("unknown format (expected gt1.…)"))?;
    let (body, tag) = rest.split_once('.').ok_or(TicketError::Malformed("missing signature part"))?;
    let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| TicketError::Malformed("claims are not base64url"))?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TicketError::Malformed("signature is not base64url"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&body);
    mac.verify_slice(&tag).map_err(|_| TicketError::BadSignature)?;
    // The MAC matched, so these bytes are ours; failing to parse them would be our own bug
    // (a format change), reported as malformed rather than trusted.
    let claims = serde_json::from_slice(&body).map_err(|_| TicketError::Malformed("claims do not decode"))?;
    Ok(VerifiedTicket { claims })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TicketClaims {
        TicketClaims {
            id: [7; 16],
            ns: "shop".into(),
            conditions: vec![Condition::Exists("a".into())],
            revision: 42,
            issued_at_ms: 1_000,
            expires_at_ms: 31_000,
            flow: Some("checkout".into()),
            correlation_id: None,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            span_id: Some("00f067aa0ba902b7".into()),
        }
    }

    #[test]
    fn a_signed_ticket_verifies_with_its_key_only() {
        let ticket = sign(b"key-one", &claims());
        assert_eq!(verify(b"key-one", &ticket).unwrap().claims(), &claims());
        assert_eq!(verify(b"key-two", &ticket), Err(TicketError::BadSignature));
    }

    #[test]
    fn any_flipped_character_is_refused() {
        let ticket = sign(b"k", &claims());
        for idx in PREFIX.len()..ticket.len() {
            let mut bytes = ticket.clone().into_bytes();
            bytes[idx] = if bytes[idx] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            if tampered != ticket {
                assert!(verify(b"k", &tampered).is_err(), "accepted tampered ticket at {idx}");
            }
        }
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for junk in ["", "gt1.", "gt1.abc", "gt1.!!.??", "xx.yy.zz", "gt1..."] {
            assert!(matches!(verify(b"k", junk), Err(TicketError::Malformed(_))), "{junk}");
        }
    }
}
