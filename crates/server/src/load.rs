//! Limits under load, as layers around the router: a bound on requests in flight (load
//! shedding: past it, `503` with `Retry-After` at once, never a queue) and a deadline for each
//! request as a whole, body included.
//!
//! `/healthz` is exempt from the bound, so that a load balancer still sees a loaded server
//! as alive. Watch streams are exempt from the deadline (they live as long as the watcher
//! wants) and hold their slot only until the stream is opened.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use gapguard_api::codes;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::Semaphore;

use crate::accept::ConnectionClock;
use crate::error::ApiError;

/// The route exempt from the in-flight bound.
const HEALTH_PATH: &str = "/healthz";
/// The route exempt from the request deadline (Server-Sent Events, long-lived).
const WATCH_ROUTE: &str = "/v1/ns/{ns}/watch";

/// The limits [`layer`] enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadLimits {
    /// Most requests served at once (`/healthz` not counted).
    pub max_in_flight: usize,
    /// How long a request may take as a whole, its body included.
    pub request_timeout: Duration,
}

/// Wraps `router` in the in-flight bound (first: a shed request costs nothing more) and the
/// request deadline, as one layer (each `from_fn` layer costs every request a clone of the
/// inner service and a boxed future).
pub(crate) fn layer(router: Router, slots: Arc<Slots>) -> Router {
    router.layer(from_fn_with_state(slots, shed))
}

/// The in-flight bound, and the deadline of each request.
pub(crate) struct Slots {
    semaphore: Semaphore,
    max: usize,
    timeout: Duration,
}

impl Slots {
    /// The slots of `limits`, shared by the router's layer and the hot routes.
    pub(crate) fn new(limits: LoadLimits) -> Arc<Self> {
        assert!(limits.max_in_flight > 0, "max_in_flight must be at least 1");
        // Past Tokio's maximum the bound could never be reached anyway.
        let max = limits.max_in_flight.min(Semaphore::MAX_PERMITS);
        Arc::new(Self { semaphore: Semaphore::new(max), max, timeout: limits.request_timeout })
    }

    /// Has `serve` answer the request within its deadline if a slot is free, else answers
    /// `503 unavailable` with `Retry-After`.
    pub(crate) async fn serve<F, Fut>(&self, request: Request, serve: F) -> Response
    where
        F: FnOnce(Request) -> Fut,
        Fut: Future<Output = Response>,
    {
        if request.uri().path() == HEALTH_PATH {
            return deadline(self.timeout, request, serve).await;
        }
        let Ok(_slot) = self.semaphore.try_acquire() else {
            let read = drain(request.into_body(), SHED_DRAIN_BYTES, SHED_DRAIN_WAIT).await;
            let response = ApiError::unavailable(format!(
                "the server is serving its maximum of {} requests at once; retry after the Retry-After delay",
                self.max
            ))
            .into_response();
            return close_if_unread(response, read);
        };
        deadline(self.timeout, request, serve).await
    }
}

/// The layer's middleware: [`Slots::serve`].
async fn shed(State(slots): State<Arc<Slots>>, request: Request, next: Next) -> Response {
    slots.serve(request, |request| next.run(request)).await
}

/// Gives the request `timeout` to complete. Past it: `408 request_timeout` if the client had
/// not finished sending the body (nothing was done), else `503 unavailable` (the request may
/// or may not have taken effect: retry it with the same `Idempotency-Key`).
async fn deadline<F, Fut>(timeout: Duration, request: Request, serve: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let is_watch = request.method() == Method::GET
        && request.extensions().get::<MatchedPath>().is_some_and(|path| path.as_str() == WATCH_ROUTE);
    if is_watch {
        return serve(request).await;
    }
    let read_only = is_read_only(&request);
    let body_read = Arc::new(AtomicBool::new(request.body().is_end_stream()));
    let clock = request.extensions().get::<Arc<ConnectionClock>>().cloned();
    let request = request.map(|inner| Body::new(TrackedBody { inner, read: Arc::clone(&body_read) }));
    let answered = match clock {
        // Served by `accept`: its watchdog tells the request when it is past its deadline.
        Some(clock) => {
            let deadline = clock.start_request();
            let mut expired = std::pin::pin!(deadline.expired());
            expired.as_mut().enable();
            deadline.arm();
            tokio::select! {
                biased;
                response = serve(request) => Some(response),
                () = expired => None,
            }
        }
        // Driven without a connection (tests): a timer.
        None => tokio::time::timeout(timeout, serve(request)).await.ok(),
    };
    let Some(response) = answered else {
        let timeout_ms = timeout.as_millis();
        if !body_read.load(Ordering::Acquire) {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {timeout_ms} ms; nothing was done"),
            )
            .into_response();
            // The rest of the body may still be on its way: this connection is done.
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        if read_only {
            // A read or a check changes nothing: there is no outcome to be unsure of.
            return ApiError::unavailable(format!(
                "the request did not complete within {timeout_ms} ms (the store is slow to answer); \
                 it changed nothing: retry it"
            ))
            .into_response();
        }
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::OUTCOME_UNKNOWN,
            format!(
                "the request did not complete within {timeout_ms} ms; it may or may not have taken effect: \
                 retry it with the same Idempotency-Key"
            ),
        )
        .into_response();
    };
    close_if_unread(response, body_read.load(Ordering::Acquire))
}

/// Whether the request only reads: a `GET` (or `HEAD`), or a check (`POST /v1/ns/{ns}/check`).
fn is_read_only(request: &Request) -> bool {
    let method = request.method();
    if method == Method::GET || method == Method::HEAD {
        return true;
    }
    let mut segments = request.uri().path().trim_start_matches('/').split('/');
    method == Method::POST
        && matches!(
            (segments.next(), segments.next(), segments.next(), segments.next(), segments.next()),
            (Some("v1"), Some("ns"), Some(_), Some("check"), None)
        )
}

/// The largest body a shed request has read (and dropped) so that its connection stays open.
const SHED_DRAIN_BYTES: usize = 64 * 1024;
/// How long a shed request waits for that body before its connection is closed instead.
const SHED_DRAIN_WAIT: Duration = Duration::from_millis(50);

/// Reads and drops the body of a request refused without it, if it is known to be at most
/// `max_bytes` and arrives within `wait`; returns whether it was read to its end. A request
/// shed by the in-flight bound drains [`SHED_DRAIN_BYTES`] within [`SHED_DRAIN_WAIT`] (a
/// client's JSON body usually came with its head): closing the connection of every shed
/// request with a body would add a reconnection (and a TLS handshake) to each retry, outside
/// the bound. A body past the size limit drains more (`extract::read_body`), so that the
/// client, which is sending it, reads the `413` rather than a reset.
pub(crate) async fn drain(body: Body, max_bytes: usize, wait: Duration) -> bool {
    if body.is_end_stream() {
        return true;
    }
    if body.size_hint().upper().is_none_or(|n| n > max_bytes as u64) {
        return false;
    }
    matches!(tokio::time::timeout(wait, axum::body::to_bytes(body, max_bytes)).await, Ok(Ok(_)))
}

/// Adds `Connection: close` to the answer of a request whose body was not read to its end: a
/// refusal decided before the body was read (no route, a bad path, authentication, the
/// in-flight bound for a body too large or too slow for [`drain`]), a body past the
/// limit, or a route that takes no body given one. hyper keeps such a connection only if the
/// rest of the body is already in its buffer, and closes it otherwise once the answer is out,
/// without telling the client, whose next request on it then fails (found by
/// `tests/bad_input.rs` with 64 KiB bodies). Which of the two happens is not known here, so the
/// connection is closed, and said to be, every time: a client reconnects after such an answer,
/// an error path, at the price of a new connection (a TLS handshake with TLS) even where hyper
/// could have kept it.
fn close_if_unread(mut response: Response, body_read: bool) -> Response {
    if !body_read {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that records when it has been read to the end.
struct TrackedBody {
    inner: Body,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tower::ServiceExt as _;

    fn router(limits: LoadLimits, gate: Arc<tokio::sync::Notify>) -> Router {
        let slow = move || {
            let gate = Arc::clone(&gate);
            async move {
                gate.notified().await;
                "done"
            }
        };
        let routes = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/slow", get(slow.clone()).post(slow.clone()))
            .route(WATCH_ROUTE, get(slow))
            .route("/echo", post(|body: Bytes| async move { body }));
        layer(routes, Slots::new(limits))
    }

    #[test]
    fn reads_and_checks_are_read_only_and_nothing_else_is() {
        let cases = [
            (Method::GET, "/v1/ns/shop/kv/a", true),
            (Method::POST, "/v1/ns/shop/check", true),
            (Method::POST, "/v1/ns/shop/act", false),
            (Method::POST, "/v1/ns/shop/check/more", false),
            (Method::POST, "/v1/ns/shop/kv/check", false),
            (Method::PUT, "/v1/ns/shop/kv/check", false),
            (Method::DELETE, "/v1/ns/shop/kv/a", false),
        ];
        for (method, path, read_only) in cases {
            let request = Request::builder().method(method.clone()).uri(path).body(Body::empty()).unwrap();
            assert_eq!(is_read_only(&request), read_only, "{method} {path}");
        }
    }

    async fn status_and_body(response: Response) -> (StatusCode, Option<&'static str>, serde_json::Value) {
        let status = response.status();
        let retry = response.headers().get(header::RETRY_AFTER).map(|v| if v == "1" { "1" } else { "other" });
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn past_the_bound_requests_are_shed_at_once_and_healthz_still_answers() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let limits = LoadLimits { max_in_flight: 2, request_timeout: Duration::from_secs(30) };
        let app = router(limits, Arc::clone(&gate));
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let held: Vec<_> = (0..2).map(|_| tokio::spawn(app.clone().oneshot(get("/slow")))).collect();
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let (status, retry, body) = status_and_body(app.clone().oneshot(get("/slow")).await.unwrap()).await;
        assert_eq!((status, retry), (StatusCode::SERVICE_UNAVAILABLE, Some("1")));
        assert_eq!(body["error"], "unavailable", "{body}");
        let (status, ..) = status_and_body(app.clone().oneshot(get("/healthz")).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);

        gate.notify_waiters();
        for held in held {
            assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        let after = app.clone().oneshot(get("/echo"));
        assert_eq!(after.await.unwrap().status(), StatusCode::METHOD_NOT_ALLOWED, "a slot is free again");
    }

    /// A router of one slot, held by a request until the gate opens.
    async fn one_slot_held(
    ) -> (Router, Arc<tokio::sync::Notify>, tokio::task::JoinHandle<Result<Response, std::convert::Infallible>>) {
        let gate = Arc::new(tokio::sync::Notify::new());
        let limits = LoadLimits { max_in_flight: 1, request_timeout: Duration::from_secs(30) };
        let app = router(limits, Arc::clone(&gate));
        let held = tokio::spawn(app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        (app, gate, held)
    }

    /// Sends `request` past the bound: it must be shed; whether its answer closes the connection.
    async fn shed_closes(app: &Router, request: Request) -> bool {
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        response.headers().get(header::CONNECTION).is_some_and(|v| v == "close")
    }

    #[tokio::test]
    async fn a_shed_request_keeps_its_connection_if_its_body_is_small_and_ready() {
        let (app, gate, held) = one_slot_held().await;
        let post = |body: Body| Request::post("/echo").body(body).unwrap();
        let never_ends = || Body::from_stream(futures_util::stream::pending::<Result<Bytes, std::io::Error>>());
        for (body, closes, what) in [
            (Body::empty(), false, "no body"),
            (Body::from(vec![b'x'; SHED_DRAIN_BYTES]), false, "a body at the drain limit"),
            (Body::from(vec![b'x'; SHED_DRAIN_BYTES + 1]), true, "a body past the drain limit"),
            (never_ends(), true, "a body of unknown length"),
        ] {
            assert_eq!(shed_closes(&app, post(body)).await, closes, "{what}: Connection: close");
        }
        gate.notify_waiters();
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    /// A body of known length whose bytes arrive `after` a delay.
    struct Late {
        after: std::pin::Pin<Box<tokio::time::Sleep>>,
        data: Option<Bytes>,
    }

    impl hyper::body::Body for Late {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            std::task::ready!(self.after.as_mut().poll(cx));
            Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_request_waits_for_a_small_body_up_to_its_limit() {
        let (app, gate, held) = one_slot_held().await;
        let one_ms = Duration::from_millis(1);
        for (after, closes) in [(SHED_DRAIN_WAIT - one_ms, false), (SHED_DRAIN_WAIT + one_ms, true)] {
            let late = Late { after: Box::pin(tokio::time::sleep(after)), data: Some(Bytes::from_static(b"{}")) };
            let request = Request::post("/echo").body(Body::new(late)).unwrap();
            assert_eq!(shed_closes(&app, request).await, closes, "a body arriving after {after:?}: Connection: close");
        }
        gate.notify_waiters();
        assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_slow_handler_is_503_a_slow_body_is_408_and_a_watch_has_no_deadline() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let limits = LoadLimits { max_in_flight: 8, request_timeout: Duration::from_millis(100) };
        let app = router(limits, Arc::clone(&gate));

        let response = app.clone().oneshot(Request::get("/slow").body(Body::empty()).unwrap()).await.unwrap();
        let (status, retry, body) = status_and_body(response).await;
        assert_eq!((status, retry), (StatusCode::SERVICE_UNAVAILABLE, Some("1")));
        // A read changed nothing: plainly unavailable; a write may have taken effect.
        assert_eq!(body["error"], codes::UNAVAILABLE, "{body}");
        let response = app.clone().oneshot(Request::post("/slow").body(Body::empty()).unwrap()).await.unwrap();
        let (status, _, body) = status_and_body(response).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], codes::OUTCOME_UNKNOWN, "{body}");
        assert!(body["message"].as_str().unwrap().contains("Idempotency-Key"), "{body}");

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tx.send(Ok(Bytes::from_static(b"{\"half\":"))).await.unwrap();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let request = Request::post("/echo").body(Body::from_stream(stream)).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers().get(header::CONNECTION).unwrap(), "close");
        let (status, retry, body) = status_and_body(response).await;
        assert_eq!((status, retry), (StatusCode::REQUEST_TIMEOUT, None));
        assert_eq!(body["error"], codes::REQUEST_TIMEOUT, "{body}");
        drop(tx);

        let watch = tokio::spawn(app.clone().oneshot(Request::get("/v1/ns/shop/watch").body(Body::empty()).unwrap()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        gate.notify_waiters();
        assert_eq!(watch.await.unwrap().unwrap().status(), StatusCode::OK, "outlived the deadline");
    }
}
