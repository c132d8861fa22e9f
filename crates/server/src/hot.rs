//! The hot routes — a key's `GET` and `PUT`, check, act, reserve and commit — served without
//! the router.
//!
//! Through axum's router a request pays for the routing, the per-route layers (each a clone of
//! its service and a boxed future), the path-parameter and extension maps and the extractors. A
//! build that answered checks from hyper's service function with no layers at all used
//! 13.5–14.8 µs of server CPU per check against the router's 18.6–21.2 µs; this module, which
//! keeps every step, 15.2–16.0 µs against 18.2–19.5 (`/proc` over 5 s inside checks ×16 runs,
//! three alternations each). Here a request whose method and path name one of the hot routes is
//! recognised without the router and given to the same handler, through the same steps as the
//! router's layers, in the same order: the in-flight bound and the deadline ([`Slots::serve`]),
//! the panic guard ([`routes::panicked`]), the envelope ([`enveloped`]: correlation id, span,
//! metrics, authentication) and the body limit ([`JsonBody::read`]).
//!
//! Paths are matched by the router's own matcher (matchit) against the router's templates
//! ([`routes::route`]). Only paths whose parameters need no decoding are taken: no `%`, no
//! empty segment, no trailing `/`. Anything else, and every other route and method (`HEAD`
//! included), goes to the router, which answers it exactly as before; so the two ways can
//! differ in cost only.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::extract::{enveloped, ApiPath, Correlation, JsonBody};
use crate::load::Slots;
use crate::primitives;
use crate::routes::{self, route, AppState};

/// The hot routes of one server: its state and its in-flight slots.
pub(crate) struct Hot {
    state: AppState,
    slots: Arc<Slots>,
}

/// A request to one of the hot routes, with its path parameters.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /v1/ns/{ns}/kv/{*key}`.
    GetKey { ns: String, key: String },
    /// `PUT /v1/ns/{ns}/kv/{*key}`.
    PutKey { ns: String, key: String },
    /// `POST /v1/ns/{ns}/check`.
    Check { ns: String },
    /// `POST /v1/ns/{ns}/act`.
    Act { ns: String },
    /// `POST /v1/ns/{ns}/pools/{pool}/reserve`.
    Reserve { ns: String, pool: String },
    /// `POST /v1/ns/{ns}/reservations/{id}/commit`.
    Commit { ns: String, id: String },
}

/// Which hot route a path names, before its method is looked at.
#[derive(Clone, Copy)]
enum Kind {
    Key,
    Check,
    Act,
    Reserve,
    Commit,
}

/// The hot routes' templates in the matcher the router uses (matchit), so that a path means
/// here what it means there.
static TABLE: std::sync::LazyLock<matchit::Router<Kind>> = std::sync::LazyLock::new(|| {
    let mut table = matchit::Router::new();
    let routes = [
        (route::KV_KEY, Kind::Key),
        (route::CHECK, Kind::Check),
        (route::ACT, Kind::Act),
        (route::RESERVE, Kind::Reserve),
        (route::COMMIT, Kind::Commit),
    ];
    for (template, kind) in routes {
        table.insert(template, kind).expect("the hot routes' templates do not conflict");
    }
    table
});

impl Route {
    /// The hot route `method` and `path` name, if any.
    pub(crate) fn recognise(method: &Method, path: &str) -> Option<Self> {
        // Percent-encoded parameters are the router's to decode; a path with an empty
        // segment (`//`, a trailing `/`) is the router's too.
        if path.contains('%') || path.contains("//") || path.ends_with('/') {
            return None;
        }
        let found = TABLE.at(path).ok()?;
        let param = |name| found.params.get(name).map(str::to_owned);
        let ns = param("ns")?;
        match (*found.value, method) {
            (Kind::Key, &Method::GET) => Some(Self::GetKey { ns, key: param("key")? }),
            (Kind::Key, &Method::PUT) => Some(Self::PutKey { ns, key: param("key")? }),
            (Kind::Check, &Method::POST) => Some(Self::Check { ns }),
            (Kind::Act, &Method::POST) => Some(Self::Act { ns }),
            (Kind::Reserve, &Method::POST) => Some(Self::Reserve { ns, pool: param("pool")? }),
            (Kind::Commit, &Method::POST) => Some(Self::Commit { ns, id: param("id")? }),
            _ => None,
        }
    }

    /// The route's template, as the router names it (in metrics, spans and authorization).
    fn template(&self) -> &'static str {
        match self {
            Self::GetKey { .. } | Self::PutKey { .. } => route::KV_KEY,
            Self::Check { .. } => route::CHECK,
            Self::Act { .. } => route::ACT,
            Self::Reserve { .. } => route::RESERVE,
            Self::Commit { .. } => route::COMMIT,
        }
    }

    fn ns(&self) -> &str {
        match self {
            Self::GetKey { ns, .. }
            | Self::PutKey { ns, .. }
            | Self::Check { ns }
            | Self::Act { ns }
            | Self::Reserve { ns, .. }
            | Self::Commit { ns, .. } => ns,
        }
    }

    /// Calls the route's handler, as the router would once the layers have admitted `req`.
    async fn call(self, state: AppState, req: Request) -> Response {
        self.handle(state, req).await.unwrap_or_else(IntoResponse::into_response)
    }

    async fn handle(self, state: AppState, mut req: Request) -> Result<Response, ApiError> {
        // Put there by the envelope, which always runs first.
        let correlation = req
            .extensions_mut()
            .remove::<Correlation>()
            .ok_or_else(|| ApiError::internal(&"the request has no correlation id"))?;
        let limit = state.engine.limits().max_body_bytes;
        let correlation = Extension(correlation);
        Ok(match self {
            Self::GetKey { ns, key } => routes::get_kv(State(state), ApiPath((ns, key))).await.into_response(),
            Self::PutKey { ns, key } => {
                let (Head { method, uri, headers }, body) = json(req, limit).await?;
                routes::put_kv(State(state), ApiPath((ns, key)), correlation, method, uri, headers, body).await?
            }
            Self::Check { ns } => {
                let (_, body) = json(req, limit).await?;
                routes::check(State(state), ApiPath(ns), correlation, body).await?.into_response()
            }
            Self::Act { ns } => {
                let (Head { method, uri, headers }, body) = json(req, limit).await?;
                routes::act(State(state), ApiPath(ns), correlation, method, uri, headers, body).await?
            }
            Self::Reserve { ns, pool } => {
                let (Head { method, uri, headers }, body) = json(req, limit).await?;
                primitives::reserve(State(state), ApiPath((ns, pool)), correlation, method, uri, headers, body).await?
            }
            Self::Commit { ns, id } => {
                primitives::commit(State(state), ApiPath((ns, id)), correlation, req).await.into_response()
            }
        })
    }
}

/// What the handlers take of a request's head (for `Idempotency-Key` fingerprints).
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

/// The request's head, and its JSON body read within `limit` bytes and decoded, as the
/// router's [`JsonBody`] extractor does.
async fn json<T: DeserializeOwned>(req: Request, limit: usize) -> Result<(Head, JsonBody<T>), ApiError> {
    let (parts, body) = req.into_parts();
    let waiting = crate::extract::expects_continue(&parts.headers);
    let head = Head { method: parts.method, uri: parts.uri, headers: parts.headers };
    Ok((head, JsonBody::read(body, waiting, limit).await?))
}

impl Hot {
    /// The hot routes over `state`, within `slots` (the ones the router's layer uses).
    pub(crate) fn new(state: AppState, slots: Arc<Slots>) -> Arc<Self> {
        Arc::new(Self { state, slots })
    }

    /// Answers a request to `route`.
    pub(crate) async fn serve(&self, route: Route, request: Request) -> Response {
        self.slots
            .serve(request, |request| async move {
                let template = route.template();
                let ns = route.ns().to_owned();
                let state = self.state.clone();
                let enveloped =
                    enveloped(&self.state, Some(template), Some(&ns), request, |request| route.call(state, request));
                AssertUnwindSafe(enveloped).catch_unwind().await.unwrap_or_else(|_| routes::panicked())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use axum::http::StatusCode;
    use axum::Router;
    use gapguard_engine::{Engine, EngineConfig, SystemClock};
    use gapguard_store::EmbeddedStore;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use crate::accept::{self, ConnectionConfig};
    use crate::auth::Keys;
    use crate::load::LoadLimits;
    use crate::metrics::Metrics;
    use crate::routes::Shared;

    /// One request over its own connection; the answer's status.
    async fn status(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> u16 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tcp.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {answer:?}"))
    }

    /// The accept loop hands the hot routes to [`Hot`] and everything else to the router: here
    /// a router that answers every request `418`, so what reaches it shows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_accept_loop_serves_the_hot_routes_itself_and_the_rest_through_the_router() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let engine = Engine::open(store, Arc::new(SystemClock::default()), EngineConfig::default()).unwrap();
        let (_streams, shutdown) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(Metrics::off());
        let watches = Arc::new(tokio::sync::Semaphore::new(1));
        let state = AppState::new(Shared { engine, keys: Arc::new(Keys::default()), metrics, shutdown, watches });
        let slots = Slots::new(LoadLimits { max_in_flight: 8, request_timeout: Duration::from_secs(30) });
        let router = Router::new().fallback(|| async { StatusCode::IM_A_TEAPOT });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ConnectionConfig {
            tls: None,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            budget: accept::ConnectionBudget::new(16),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let server = tokio::spawn(accept::serve(listener, router, Some(Hot::new(state, slots)), config, stopped));

        let cases = [
            ("PUT", "/v1/ns/shop/kv/a", r#"{"value": 1}"#, 200),
            ("GET", "/v1/ns/shop/kv/a", "", 200),
            ("POST", "/v1/ns/shop/check", r#"{"conditions": [{"exists": "a"}]}"#, 200),
            ("POST", "/v1/ns/shop/act", r#"{"ops": [{"put": {"key": "b", "value": 2}}]}"#, 200),
            ("POST", "/v1/ns/shop/pools/p/reserve", r#"{"amount": 1, "ttl_ms": 1000}"#, 404),
            ("POST", "/v1/ns/shop/reservations/rsv_1_0/commit", "", 404),
            ("PUT", "/v1/ns/shop/kv/a", r#"{"value": 1, "extra": 2}"#, 400),
            // Not hot: the router's.
            ("PUT", "/v1/ns/sh%6Fp/kv/a", r#"{"value": 1}"#, 418),
            ("HEAD", "/v1/ns/shop/kv/a", "", 418),
            ("DELETE", "/v1/ns/shop/kv/a", "", 418),
            ("POST", "/v1/ns/shop/txn", r#"{"then": []}"#, 418),
            ("GET", "/healthz", "", 418),
        ];
        for (method, path, body, expected) in cases {
            assert_eq!(status(addr, method, path, body).await, expected, "{method} {path}");
        }
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn hot_routes_are_recognised_and_the_rest_left_to_the_router() {
        let ns = || "shop".to_owned();
        let cases = [
            (Method::POST, "/v1/ns/shop/check", Some(Route::Check { ns: ns() })),
            (Method::POST, "/v1/ns/shop/act", Some(Route::Act { ns: ns() })),
            (Method::GET, "/v1/ns/shop/kv/stock/sku-1", Some(Route::GetKey { ns: ns(), key: "stock/sku-1".into() })),
            (Method::PUT, "/v1/ns/shop/kv/a", Some(Route::PutKey { ns: ns(), key: "a".into() })),
            (Method::POST, "/v1/ns/shop/pools/p/reserve", Some(Route::Reserve { ns: ns(), pool: "p".into() })),
            (Method::POST, "/v1/ns/shop/reservations/r1/commit", Some(Route::Commit { ns: ns(), id: "r1".into() })),
            // Other methods, other routes.
            (Method::GET, "/v1/ns/shop/check", None),
            (Method::HEAD, "/v1/ns/shop/kv/a", None),
            (Method::DELETE, "/v1/ns/shop/kv/a", None),
            (Method::POST, "/v1/ns/shop/kv/a", None),
            (Method::POST, "/v1/ns/shop/txn", None),
            (Method::POST, "/v1/ns/shop/reservations/r1/release", None),
            (Method::POST, "/v1/ns/shop/pools/p/q/reserve", None),
            (Method::GET, "/v1/ns/shop/kv", None),
            // Paths the router decodes or matches differently.
            (Method::POST, "/v1/ns/sh%6Fp/check", None),
            (Method::GET, "/v1/ns/shop/kv/a%2Fb", None),
            (Method::POST, "/v1/ns//check", None),
            (Method::POST, "/v1/ns/shop/check/", None),
            (Method::GET, "/v1/ns/shop/kv/", None),
            (Method::GET, "/v1/ns/shop/kv/a/", None),
            (Method::GET, "/v1/ns/shop/kv/a//b", None),
            (Method::POST, "/v1/ns/shop/pools//reserve", None),
            (Method::POST, "/v2/ns/shop/check", None),
        ];
        for (method, path, expected) in cases {
            assert_eq!(Route::recognise(&method, path), expected, "{method} {path}");
        }
    }
}
