//! Building request paths: percent-encoding of namespaces and keys, which are user text.

use crate::ClientError;

/// Percent-encodes one path segment: every byte but the RFC 3986 unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) becomes `%XX`, so `/`, `?`, `#`, `%` and spaces survive the trip.
pub(crate) fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Why a segment cannot be sent: `.` and `..` (in any percent-encoding) are dot segments,
/// which every WHATWG URL parser, reqwest's included, resolves away before sending.
fn dot_segment(segment: &str) -> bool {
    segment == "." || segment == ".."
}

/// The encoded path segment of a namespace (a `/` in it is encoded, not a separator).
pub(crate) fn namespace_segment(ns: &str) -> Result<String, ClientError> {
    segment("namespace", ns)
}

/// The encoded path segment of a name that is one segment of a route (a namespace, pool,
/// lease, reservation or orphan id): a `/` in it is encoded, not a separator. `what` names
/// it in the error.
pub(crate) fn segment(what: &str, name: &str) -> Result<String, ClientError> {
    if name.is_empty() {
        return Err(ClientError::InvalidArgument { message: format!("{what} is empty") });
    }
    if dot_segment(name) {
        return Err(ClientError::InvalidArgument {
            message: format!("{what} {name:?} cannot be sent in a URL path (it is a dot segment)"),
        });
    }
    Ok(encode_segment(name))
}

/// The encoded path of a key for `/v1/ns/{ns}/kv/{*key}`: each `/`-separated segment is
/// percent-encoded and the `/` separators are kept, so the server's wildcard decodes back to
/// exactly `key`.
///
/// A key with a `.` or `..` segment (`a/../b`) is refused here: URL normalisation would turn
/// it into another key's path. Such keys can still be written and read by ops and listings.
pub(crate) fn key_path(key: &str) -> Result<String, ClientError> {
    if key.is_empty() {
        return Err(ClientError::InvalidArgument { message: "key is empty".into() });
    }
    if key.split('/').any(dot_segment) {
        return Err(ClientError::InvalidArgument {
            message: format!(
                "key {key:?} cannot be addressed by a URL path: its `.` or `..` segment would be \
                 resolved away; read it with a listing or use it in ops instead"
            ),
        });
    }
    Ok(key.split('/').map(encode_segment).collect::<Vec<_>>().join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_separate_segments_and_everything_else_is_encoded() {
        assert_eq!(key_path("orders/42").unwrap(), "orders/42");
        assert_eq!(key_path("a b/c?d#e%f").unwrap(), "a%20b/c%3Fd%23e%25f");
        assert_eq!(key_path("stock/sku-1.v2_x~").unwrap(), "stock/sku-1.v2_x~");
        assert_eq!(key_path("k+=&;:@").unwrap(), "k%2B%3D%26%3B%3A%40");
    }

    #[test]
    fn non_ascii_keys_are_encoded_as_utf8_bytes() {
        assert_eq!(key_path("café/ü").unwrap(), "caf%C3%A9/%C3%BC");
    }

    #[test]
    fn empty_segments_are_kept() {
        assert_eq!(key_path("a//b").unwrap(), "a//b");
        assert_eq!(key_path("/a/").unwrap(), "/a/");
    }

    #[test]
    fn dot_segments_and_empty_keys_are_refused_before_sending() {
        for key in ["", ".", "..", "a/../b", "a/./b", "a/.."] {
            assert!(matches!(key_path(key), Err(ClientError::InvalidArgument { .. })), "{key:?}");
        }
        // Dots inside a segment are ordinary characters.
        assert_eq!(key_path("a/.../b.c/.d").unwrap(), "a/.../b.c/.d");
    }

    #[test]
    fn a_namespace_is_one_segment() {
        assert_eq!(namespace_segment("shop-1").unwrap(), "shop-1");
        assert_eq!(namespace_segment("a/b").unwrap(), "a%2Fb");
        assert!(namespace_segment("").is_err());
        assert!(namespace_segment("..").is_err());
    }

    #[test]
    fn names_are_one_segment_and_their_errors_say_what_they_are() {
        assert_eq!(segment("pool", "vm quota/eu").unwrap(), "vm%20quota%2Feu");
        assert_eq!(segment("lease", "...").unwrap(), "...");
        let Err(ClientError::InvalidArgument { message }) = segment("pool", "") else { panic!("accepted") };
        assert_eq!(message, "pool is empty");
        let Err(ClientError::InvalidArgument { message }) = segment("lease", ".") else { panic!("accepted") };
        assert!(message.starts_with("lease \".\" cannot"), "{message}");
    }
}
