//! What every route of the OpenAPI document has in common, added once rather than written into
//! each route's annotation: the bearer API key, the answers of the layers in front of every
//! handler (authentication, the in-flight bound, the deadline, the body limit, the idempotency
//! claim), and `/metrics`, which is Prometheus text rather than JSON.

use gapguard_api::codes;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, ParameterIn, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};
use utoipa::Modify;

/// The security scheme's name in the document.
const SCHEME: &str = "api_key";

/// Routes that never need a key.
const OPEN: [&str; 2] = ["/healthz", "/readyz"];

/// Completes the generated document (see the module's documentation).
pub struct Completion;

impl Modify for Completion {
    fn modify(&self, doc: &mut OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some(
                "`Authorization: Bearer <secret>` of a configured `[[api_key]]`. A server with no key \
                 configured serves without authentication (on loopback only).",
            ))
            .build();
        doc.components.get_or_insert_with(Default::default).add_security_scheme(SCHEME, SecurityScheme::Http(scheme));
        doc.security = Some(vec![SecurityRequirement::new(SCHEME, Vec::<String>::new())]);

        let metrics = OperationBuilder::new()
            .description(Some(
                "Prometheus metrics, in the text exposition format. Needs a key only with \
                 `metrics_require_key = true` (any role); on `metrics_listen`'s listener when that is set.",
            ))
            .response(
                "200",
                ResponseBuilder::new().description("the metrics").content("text/plain", ContentBuilder::new().build()),
            )
            .security(SecurityRequirement::default())
            .security(SecurityRequirement::new(SCHEME, Vec::<String>::new()))
            .build();
        doc.paths.paths.insert("/metrics".into(), PathItem::new(HttpMethod::Get, metrics));

        for (path, item) in &mut doc.paths.paths {
            if path == "/metrics" {
                continue;
            }
            let open = OPEN.contains(&path.as_str());
            for (method, op) in
                [("get", &mut item.get), ("put", &mut item.put), ("post", &mut item.post), ("delete", &mut item.delete)]
            {
                let Some(op) = op else { continue };
                complete(op, method, open);
            }
        }
    }
}

/// Adds to one operation the answers every such operation may give.
fn complete(op: &mut Operation, method: &str, open: bool) {
    if open {
        op.security = Some(vec![SecurityRequirement::default()]);
    } else {
        add(op, "401", "unauthorized: API keys are configured and none, or an unknown one, was sent");
        add(op, "403", "forbidden: the key's role or namespaces do not cover this request");
    }
    add(op, "503", "unavailable: past `max_in_flight` (with `Retry-After`), or the store failed");
    let params = op.parameters.as_deref().unwrap_or_default();
    let in_path = |name: &str| params.iter().any(|p| p.name == name && p.parameter_in == ParameterIn::Path);
    let idempotent = params.iter().any(|p| p.name.eq_ignore_ascii_case("Idempotency-Key"));
    let has_query = params.iter().any(|p| p.parameter_in == ParameterIn::Query);
    let reads_body = method != "get" || op.request_body.is_some();
    if in_path("ns") || has_query || reads_body {
        add(op, "400", &format!("{}: a malformed request, naming the `field`", codes::INVALID_REQUEST));
    }
    if reads_body {
        add(op, "413", &format!("{}: a body over `max_body_bytes`", codes::PAYLOAD_TOO_LARGE));
    }
    if !open && path_is_not_a_stream(op) {
        add(op, "408", &format!("{}: not answered within `request_timeout_ms`", codes::REQUEST_TIMEOUT));
    }
    if idempotent {
        add(op, "409", &format!("{}: the same Idempotency-Key is in flight", codes::IDEMPOTENCY_IN_PROGRESS));
        add(op, "422", &format!("{}: the Idempotency-Key was used for another request", codes::IDEMPOTENCY_KEY_REUSED));
    }
}

/// A watch streams for as long as it is read: the deadline does not apply to it.
fn path_is_not_a_stream(op: &Operation) -> bool {
    !op.responses.responses.values().any(|r| match r {
        RefOr::T(response) => response.content.contains_key("text/event-stream"),
        RefOr::Ref(_) => false,
    })
}

/// Documents `status` with `description` and the error body, or, where the route documents
/// the status already, appends what the description does not name yet.
fn add(op: &mut Operation, status: &str, description: &str) {
    match op.responses.responses.get_mut(status) {
        Some(RefOr::T(existing)) => {
            let code = description.split(':').next().unwrap_or(description);
            if !existing.description.contains(code) {
                existing.description = match existing.description.trim() {
                    "" => description.to_owned(),
                    known => format!("{known}; {description}"),
                };
            }
        }
        Some(RefOr::Ref(_)) => {}
        None => {
            op.responses.responses.insert(status.to_owned(), RefOr::T(error_response(description)));
        }
    }
}

fn error_response(description: &str) -> Response {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    ResponseBuilder::new().description(description).content("application/json", body).build()
}
