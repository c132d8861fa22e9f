//! API keys: who may call which route in which namespace.
//!
//! A key is configured by its id, the SHA-256 of its secret (the secret itself is never
//! stored), its namespaces and its role. A request presents `Authorization: Bearer <secret>`;
//! the server hashes the secret and compares it with every configured hash in constant time.
//! Roles nest: `read` (GETs, checks, watch, audit) < `write` (acts, txns, puts, deletes,
//! reservations, leases) < `admin` (grants, pool capacities, orphan resolution, audit
//! verification).

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::config::{ApiKeyConfig, Role};
use crate::error::ApiError;
use crate::extract::Correlation;
use crate::routes::AppState;

/// One configured key, ready for comparison.
#[derive(Clone, Debug)]
struct Key {
    id: String,
    secret_sha256: [u8; 32],
    namespaces: Vec<String>,
    role: Role,
}

/// The configured keys. Empty: authentication is off (the server then binds loopback only).
#[derive(Clone, Debug, Default)]
pub struct Keys {
    keys: Vec<Key>,
    /// Whether `/metrics` needs a key too (default: no, like `/healthz`).
    metrics_need_key: bool,
}

fn unhex32(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// Keys from the config (whose hashes the config parser already checked).
    pub fn new(config: &[ApiKeyConfig]) -> Self {
        let keys = config
            .iter()
            .map(|k| Key {
                id: k.id.clone(),
                secret_sha256: unhex32(&k.secret_sha256.to_ascii_lowercase()).expect("config checked the hash"),
                namespaces: k.namespaces.clone(),
                role: k.role,
            })
            .collect();
        Self { keys, metrics_need_key: false }
    }

    /// Makes `/metrics` need a key (of any namespace, role `read`).
    pub fn with_metrics_needing_a_key(mut self, need: bool) -> Self {
        self.metrics_need_key = need;
        self
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key whose secret this is. Every key is compared, so the time taken does not tell
    /// which one (or how much of one) matched.
    fn find(&self, secret: &str) -> Option<&Key> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(&key.secret_sha256, &hash) {
                found = Some(key);
            }
        }
        found
    }
}

/// The routes that never need a key (`/metrics` neither, unless `metrics_require_key`).
pub(crate) const OPEN_ROUTES: [&str; 2] = ["/healthz", "/readyz"];

/// The role a route needs.
pub(crate) fn required_role(method: &Method, route: &str) -> Role {
    let admin =
        ["/v1/ns/{ns}/grants", "/v1/ns/{ns}/grants/revoke", "/v1/ns/{ns}/orphans/{id}/resolve", "/v1/audit/verify"];
    if (admin.contains(&route) && (method == Method::POST || route == "/v1/audit/verify"))
        || (route == "/v1/ns/{ns}/pools/{pool}" && method == Method::PUT)
    {
        return Role::Admin;
    }
    if method == Method::GET || method == Method::HEAD || route == "/v1/ns/{ns}/check" {
        return Role::Read;
    }
    Role::Write
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn forbidden(message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Write => "write",
        Role::Admin => "admin",
    }
}

/// Middleware on every matched route of the metrics listener: [`admit`] as a layer of its own.
pub async fn authorize(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map(MatchedPath::as_str);
    match admit(&state.keys, route, crate::extract::ns_param(&params), &mut req) {
        Ok(()) => next.run(req).await,
        Err(refused) => *refused,
    }
}

/// Admits a request to a matched route (`route`, the route's template; unmatched requests are
/// not authenticated: they answer 404 whoever asks) in namespace `ns` (the route's `{ns}`,
/// decoded), unless it is `/healthz`, `/readyz` or `/metrics`: authenticates the caller, checks
/// the route's role and the namespace, and records the key id for the audit log and the scope of
/// idempotency keys. Admits everything when no keys are configured. A refusal is the response
/// to send (401 or 403), boxed: it is the rare path.
pub(crate) fn admit(
    keys: &Keys,
    route: Option<&str>,
    ns: Option<&str>,
    req: &mut Request,
) -> Result<(), Box<Response>> {
    if !keys.enabled() {
        return Ok(());
    }
    let Some(route) = route else { return Ok(()) };
    if OPEN_ROUTES.contains(&route) || (route == "/metrics" && !keys.metrics_need_key) {
        return Ok(());
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(secret) = presented else {
        return Err(Box::new(unauthorized("this server needs an API key: send Authorization: Bearer <secret>")));
    };
    let Some(key) = keys.find(secret) else {
        return Err(Box::new(unauthorized("unknown API key")));
    };
    let needed = required_role(req.method(), route);
    if key.role < needed {
        return Err(Box::new(forbidden(format!(
            "API key {:?} has role {}; {} {route} needs {}",
            key.id,
            role_name(key.role),
            req.method(),
            role_name(needed)
        ))));
    }
    if let Some(ns) = ns {
        if !key.namespaces.iter().any(|n| n == "*" || n == ns) {
            return Err(Box::new(forbidden(format!("API key {:?} may not use namespace {ns:?}", key.id))));
        }
    }
    let (id, role) = (key.id.clone(), key.role);
    if let Some(correlation) = req.extensions_mut().get_mut::<Correlation>() {
        correlation.api_key = Some(id);
        correlation.role = Some(role);
    }
    Ok(())
}

/// Granting and revoking are an admin's, whichever route carries them: the grant routes need
/// the role (see [`required_role`]), and an act's or a txn's `grant` and `revoke` ops need it
/// too, checked here once the body is read, before anything is applied. `lists` are the
/// request's op lists with their field names (`ops`, `then`, `else`).
pub(crate) fn admit_ops<'a>(
    keys: &Keys,
    correlation: &Correlation,
    lists: impl IntoIterator<Item = (&'a str, &'a [gapguard_core::Op])>,
) -> Result<(), ApiError> {
    if !keys.enabled() {
        return Ok(());
    }
    // With keys, `admit` recorded the caller's role; none recorded is no right to grant.
    let role = correlation.role.unwrap_or(Role::Read);
    if role >= Role::Admin {
        return Ok(());
    }
    for (field, ops) in lists {
        for (idx, op) in ops.iter().enumerate() {
            let name = match op {
                gapguard_core::Op::Grant { .. } => "grant",
                gapguard_core::Op::Revoke { .. } => "revoke",
                _ => continue,
            };
            let key = correlation.api_key.as_deref().unwrap_or_default();
            let message = format!(
                "API key {key:?} has role {}; a {name} op needs admin, as the grant routes do",
                role_name(role)
            );
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
                .with("field", format!("{field}[{idx}].{name}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_per_route() {
        assert_eq!(required_role(&Method::GET, "/v1/ns/{ns}/kv/{*key}"), Role::Read);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/check"), Role::Read);
        assert_eq!(required_role(&Method::GET, "/v1/ns/{ns}/watch"), Role::Read);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/act"), Role::Write);
        assert_eq!(required_role(&Method::PUT, "/v1/ns/{ns}/kv/{*key}"), Role::Write);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/pools/{pool}/reserve"), Role::Write);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/leases/{name}/acquire"), Role::Write);
        assert_eq!(required_role(&Method::PUT, "/v1/ns/{ns}/pools/{pool}"), Role::Admin);
        assert_eq!(required_role(&Method::GET, "/v1/ns/{ns}/pools/{pool}"), Role::Read);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/grants"), Role::Admin);
        assert_eq!(required_role(&Method::GET, "/v1/ns/{ns}/grants"), Role::Read);
        assert_eq!(required_role(&Method::GET, "/v1/audit/verify"), Role::Admin);
        assert_eq!(required_role(&Method::POST, "/v1/ns/{ns}/orphans/{id}/resolve"), Role::Admin);
    }

    #[test]
    fn secrets_match_by_hash_only() {
        let secret = "s3cret";
        let hash: String = Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let keys = Keys::new(&[ApiKeyConfig {
            id: "svc".into(),
            secret_sha256: hash,
            namespaces: vec!["a".into()],
            role: Role::Write,
        }]);
        assert_eq!(keys.find(secret).map(|k| k.id.as_str()), Some("svc"));
        assert!(keys.find("s3cret ").is_none());
        assert!(keys.find("").is_none());
    }
}
