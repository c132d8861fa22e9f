//! What every route of the OpenAPI document has in common, added once rather than written into
//! each route's annotation: the bearer API key, the answers of the layers in front of every
//! handler (authentication, the in-flight bound, the deadline, the body limit, the idempotency
//! claim), and `/metrics`, which is Prometheus text rather than JSON.

use axum::http::Method;
use gapguard_api::codes;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Required, Response, ResponseBuilder};
use utoipa::Modify;

use crate::auth;
use crate::config::Role;

/// The security scheme's name in the document.
const SCHEME: &str = "api_key";

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
            for (method, op) in [
                (Method::GET, &mut item.get),
                (Method::PUT, &mut item.put),
                (Method::POST, &mut item.post),
                (Method::DELETE, &mut item.delete),
            ] {
                let Some(op) = op else { continue };
                complete(op, path, &method);
            }
        }
    }
}

/// Adds to the operation `method` `path` the answers of the layers in front of its handler.
fn complete(op: &mut Operation, path: &str, method: &Method) {
    let open = auth::OPEN_ROUTES.contains(&path);
    if open {
        op.security = Some(vec![SecurityRequirement::default()]);
    } else {
        // `/metrics` too, where `metrics_require_key` is set.
        add(op, "401", "unauthorized: API keys are configured and none, or an unknown one, was sent");
        // Every key may read; a key is refused a namespace, or a route above its role.
        if path.contains("{ns}") || auth::required_role(method, path) > Role::Read {
            add(op, "403", "forbidden: the key's role or namespaces do not cover this request");
        }
    }
    let reads_body = *method != Method::GET;
    // Every route reads its correlation id first (see `extract::enveloped`).
    add(
        op,
        "400",
        &format!(
            "{}: a malformed request (path, query, body or `X-Correlation-Id`), naming the `field`",
            codes::INVALID_REQUEST
        ),
    );
    if path != "/healthz" {
        // `/healthz` alone is outside the in-flight bound (see `load::Slots::serve`).
        add(
            op,
            "503",
            "unavailable: past `max_in_flight` or `max_connections` (with `Retry-After`; a watch: past \
             `max_watches`), or the store failed; outcome_unknown: past the deadline once the body was \
             read (it may have taken effect: retry it with its `Idempotency-Key`)",
        );
    }
    if reads_body {
        add(
            op,
            "408",
            &format!("{}: the body was still arriving at the deadline; nothing was done", codes::REQUEST_TIMEOUT),
        );
        add(op, "413", &format!("{}: a body over `max_body_bytes`", codes::PAYLOAD_TOO_LARGE));
    }
    // Every route reads these two (see `extract::enveloped`) and echoes them on the answer.
    header(
        op,
        "X-Correlation-Id",
        "Ties the request to your logs: echoed on the answer and stored in the audit events it \
         writes; visible ASCII, at most `max_correlation_id_bytes`. Without it, a valid \
         `traceparent`'s trace id is used, else the server makes one up.",
    );
    header(
        op,
        "traceparent",
        "W3C trace context: the request's span becomes its child, and it is echoed on the \
         answer. An invalid one is ignored.",
    );
    let params = op.parameters.as_deref().unwrap_or_default();
    if params.iter().any(|p| p.name.eq_ignore_ascii_case("Idempotency-Key")) {
        add(op, "409", &format!("{}: the same Idempotency-Key is in flight", codes::IDEMPOTENCY_IN_PROGRESS));
        add(op, "422", &format!("{}: the Idempotency-Key was used for another request", codes::IDEMPOTENCY_KEY_REUSED));
    }
}

/// Declares the optional string header `name`, unless the route declares it already.
fn header(op: &mut Operation, name: &str, description: &str) {
    let params = op.parameters.get_or_insert_with(Vec::new);
    if params.iter().any(|p| p.name.eq_ignore_ascii_case(name)) {
        return;
    }
    let string = ObjectBuilder::new().schema_type(Type::String).build();
    params.push(
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(string))
            .build(),
    );
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
