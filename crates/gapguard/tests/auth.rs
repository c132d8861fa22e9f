//! API keys against the real binary: every route refuses a missing or unknown key (401), a
//! key of another namespace or with too low a role (403), with no effect on state; tickets and
//! idempotency keys do not cross tenants; and without keys the server binds loopback only.

mod support;

use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{Http, Reply, Server};

const ADMIN: &str = "admin-secret-0123456789";
const WRITER: &str = "writer-secret-0123456789";
const READER: &str = "reader-secret-0123456789";
const OTHER_NS: &str = "other-ns-secret-0123456789";
const BOTH_ADMIN: &str = "both-admin-secret-0123456789";

fn sha(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn config() -> String {
    let key = |id: &str, secret: &str, ns: &str, role: &str| {
        format!(
            "[[api_key]]\nid = \"{id}\"\nsecret_sha256 = \"{}\"\nnamespaces = [{ns}]\nrole = \"{role}\"\n\n",
            sha(secret)
        )
    };
    [
        key("admin", ADMIN, "\"shop\"", "admin"),
        key("writer", WRITER, "\"shop\"", "write"),
        key("reader", READER, "\"shop\"", "read"),
        key("elsewhere", OTHER_NS, "\"other\"", "admin"),
        key("both", BOTH_ADMIN, "\"shop\", \"other\"", "admin"),
    ]
    .concat()
}

fn start() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gapguard.toml");
    std::fs::write(&path, config()).unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--config", path.to_str().unwrap()]);
    (server, dir)
}

async fn call(http: &Http, method: &str, path: &str, body: Option<&Value>, secret: Option<&str>) -> Reply {
    let auth = secret.map(|s| format!("Bearer {s}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http.send(method, path, body, &headers).await
}

/// Every route of the API with the role it needs: (method, path, body, role).
fn routes() -> Vec<(&'static str, &'static str, Option<Value>, &'static str)> {
    vec![
        ("GET", "/v1/ns/shop/kv/a", None, "read"),
        ("GET", "/v1/ns/shop/kv?prefix=", None, "read"),
        ("POST", "/v1/ns/shop/check", Some(json!({"conditions": [{"absent": "z"}]})), "read"),
        ("GET", "/v1/ns/shop/audit", None, "read"),
        ("GET", "/v1/ns/shop/pools/p", None, "read"),
        ("GET", "/v1/ns/shop/reservations/rsv_1_0", None, "read"),
        ("GET", "/v1/ns/shop/leases/l", None, "read"),
        ("GET", "/v1/ns/shop/grants", None, "read"),
        ("GET", "/v1/ns/shop/orphans", None, "read"),
        ("GET", "/v1/ns/shop/watch", None, "read"),
        ("PUT", "/v1/ns/shop/kv/a", Some(json!({"value": 1})), "write"),
        ("DELETE", "/v1/ns/shop/kv/a", None, "write"),
        ("POST", "/v1/ns/shop/act", Some(json!({"ops": [{"put": {"key": "b", "value": 1}}]})), "write"),
        ("POST", "/v1/ns/shop/txn", Some(json!({"then": [{"put": {"key": "c", "value": 1}}]})), "write"),
        ("POST", "/v1/ns/shop/pools/p/reserve", Some(json!({"amount": 1, "ttl_ms": 1000})), "write"),
        ("POST", "/v1/ns/shop/reservations/rsv_1_0/commit", None, "write"),
        ("POST", "/v1/ns/shop/reservations/rsv_1_0/release", None, "write"),
        ("POST", "/v1/ns/shop/leases/l/acquire", Some(json!({"holder": "h", "ttl_ms": 1000})), "write"),
        ("POST", "/v1/ns/shop/leases/l/renew", Some(json!({"token": 1})), "write"),
        ("POST", "/v1/ns/shop/leases/l/release", Some(json!({"token": 1})), "write"),
        ("PUT", "/v1/ns/shop/pools/p", Some(json!({"capacity": 5})), "admin"),
        ("POST", "/v1/ns/shop/grants", Some(json!({"subject": "s", "action": "a", "resource": "r"})), "admin"),
        ("POST", "/v1/ns/shop/grants/revoke", Some(json!({"subject": "s", "action": "a", "resource": "r"})), "admin"),
        ("POST", "/v1/ns/shop/orphans/orph_1_0/resolve", None, "admin"),
        ("GET", "/v1/audit/verify", None, "admin"),
        // Granting and revoking need admin on every route that carries them.
        (
            "POST",
            "/v1/ns/shop/act",
            Some(
                json!({"ops": [{"put": {"key": "d", "value": 1}}, {"grant": {"subject": "s", "action": "a", "resource": "r"}}]}),
            ),
            "admin",
        ),
        (
            "POST",
            "/v1/ns/shop/txn",
            Some(json!({"then": [{"revoke": {"subject": "s", "action": "a", "resource": "r"}}]})),
            "admin",
        ),
        (
            "POST",
            "/v1/ns/shop/txn",
            Some(
                json!({"if": [{"exists": "nothing"}], "else": [{"grant": {"subject": "s", "action": "a", "resource": "r"}}]}),
            ),
            "admin",
        ),
    ]
}

async fn revision(http: &Http) -> u64 {
    call(http, "GET", "/v1/ns/shop/kv?prefix=", None, Some(ADMIN)).await.body["revision"].as_u64().unwrap()
}

#[tokio::test]
async fn every_route_refuses_callers_without_the_right_key_and_changes_nothing() {
    let (server, _dir) = start();
    let http = Http::new(&server);
    let before = revision(&http).await;
    // Each route as written, and with its namespace percent-encoded: the hot routes take the
    // first way without the router (see the server's `hot` module), the second through it.
    let both_ways = routes().into_iter().flat_map(|(method, path, body, role)| {
        let encoded = path.replacen("/shop/", "/sh%6Fp/", 1);
        [(method, path.to_owned(), body.clone(), role), (method, encoded, body, role)]
    });
    for (method, path, body, role) in both_ways {
        let (path, body) = (path.as_str(), body.as_ref());
        let r = call(&http, method, path, body, None).await;
        assert_eq!((r.status, r.body["error"].as_str()), (401, Some("unauthorized")), "{method} {path} without a key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = call(&http, method, path, body, Some("not-a-key")).await;
        assert_eq!(r.status, 401, "{method} {path} with an unknown key");
        if !path.starts_with("/v1/audit") {
            let r = call(&http, method, path, body, Some(OTHER_NS)).await;
            assert_eq!(
                (r.status, r.body["error"].as_str()),
                (403, Some("forbidden")),
                "{method} {path} from another namespace"
            );
            assert!(r.body["message"].as_str().unwrap().contains("namespace"), "{:?}", r.body);
        }
        let too_low = match role {
            "write" => Some(READER),
            "admin" => Some(WRITER),
            _ => None,
        };
        if let Some(secret) = too_low {
            let r = call(&http, method, path, body, Some(secret)).await;
            assert_eq!(
                (r.status, r.body["error"].as_str()),
                (403, Some("forbidden")),
                "{method} {path} with too low a role"
            );
            assert!(r.body["message"].as_str().unwrap().contains(role), "{:?}", r.body);
        }
    }
    assert_eq!(revision(&http).await, before, "a refused request changed state");
    // /healthz needs no key; the OpenAPI document needs any valid one.
    assert_eq!(call(&http, "GET", "/healthz", None, None).await.status, 200);
    assert_eq!(call(&http, "GET", "/v1/openapi.json", None, None).await.status, 401);
    assert_eq!(call(&http, "GET", "/v1/openapi.json", None, Some(OTHER_NS)).await.status, 200);
    // The right keys get through, and the audit log names them.
    let put = call(&http, "PUT", "/v1/ns/shop/kv/a", Some(&json!({"value": 1})), Some(WRITER)).await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let read = call(&http, "GET", "/v1/ns/shop/kv/a", None, Some(READER)).await;
    assert_eq!(read.body["value"], 1);
    let audit = call(&http, "GET", "/v1/ns/shop/audit?key=a", None, Some(READER)).await;
    assert_eq!(audit.body["events"][0]["api_key_id"], "writer");
    assert_eq!(call(&http, "GET", "/v1/audit/verify", None, Some(ADMIN)).await.body["ok"], true);
}

/// The OpenAPI document lists the refusals of authentication the server gives on each route.
#[tokio::test]
async fn the_openapi_document_lists_each_routes_refusals_of_authentication() {
    let (server, _dir) = start();
    let http = Http::new(&server);
    let doc = call(&http, "GET", "/v1/openapi.json", None, Some(READER)).await.body;
    let mut probed = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{ns}", "shop").replace("{key}", "k").replace("{pool}", "p").replace("{id}", "x");
        let concrete = concrete.replace("{name}", "l");
        for (method, op) in item.as_object().unwrap() {
            let (verb, at) = (method.to_uppercase(), format!("{} {path}", method.to_uppercase()));
            let documented = |status: u16| !op["responses"][status.to_string()].is_null();
            let open = ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
            let anonymous = call(&http, &verb, &concrete, None, None).await.status;
            assert_eq!(anonymous == 401, !open, "{at}: {anonymous} without a key");
            assert!(documented(anonymous), "{at}: answers {anonymous} without a key");
            // A watch that is let in streams on: only the refused ones are read.
            let keys: &[&str] = if path.ends_with("/watch") { &[OTHER_NS] } else { &[OTHER_NS, READER, WRITER] };
            for secret in keys {
                let status = call(&http, &verb, &concrete, None, Some(secret)).await.status;
                assert_ne!(status, 401, "{at} with a valid key");
                assert!(status != 403 || documented(403), "{at}: answers 403, undocumented");
                if path.contains("{ns}") && *secret == OTHER_NS {
                    assert_eq!(status, 403, "{at}: another namespace's key");
                }
            }
            probed += 1;
        }
    }
    assert!(probed > 25, "{probed} operations");
}

#[tokio::test]
async fn grant_and_revoke_ops_need_admin_and_the_refusal_names_the_op() {
    let (server, _dir) = start();
    let http = Http::new(&server);
    let grant = json!({"subject": "user:eve", "action": "read", "resource": "doc:1"});
    let act = json!({"ops": [{"put": {"key": "k", "value": 1}}, {"grant": grant}]});
    let r = call(&http, "POST", "/v1/ns/shop/act", Some(&act), Some(WRITER)).await;
    assert_eq!((r.status, r.body["field"].as_str()), (403, Some("ops[1].grant")), "{:?}", r.body);
    let txn = json!({"then": [{"put": {"key": "k", "value": 1}}], "else": [{"revoke": grant}]});
    let r = call(&http, "POST", "/v1/ns/shop/txn", Some(&txn), Some(WRITER)).await;
    assert_eq!((r.status, r.body["field"].as_str()), (403, Some("else[0].revoke")), "{:?}", r.body);
    let grants = call(&http, "GET", "/v1/ns/shop/grants", None, Some(READER)).await;
    assert_eq!(grants.body["items"], json!([]), "a refused grant op was applied");
    assert_eq!(call(&http, "GET", "/v1/ns/shop/kv/k", None, Some(READER)).await.status, 404);
    // The same ops from an admin go through; a write key's acts without them still do.
    let r = call(&http, "POST", "/v1/ns/shop/act", Some(&act), Some(ADMIN)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let grants = call(&http, "GET", "/v1/ns/shop/grants", None, Some(READER)).await;
    assert_eq!(grants.body["items"].as_array().map(Vec::len), Some(1), "{:?}", grants.body);
    let put = json!({"ops": [{"put": {"key": "k", "value": 2}}]});
    assert_eq!(call(&http, "POST", "/v1/ns/shop/act", Some(&put), Some(WRITER)).await.status, 200);
}

#[tokio::test]
async fn a_ticket_from_one_namespace_is_refused_in_another_even_for_an_admin_of_both() {
    let (server, _dir) = start();
    let http = Http::new(&server);
    let check =
        call(&http, "POST", "/v1/ns/shop/check", Some(&json!({"conditions": [{"absent": "x"}]})), Some(BOTH_ADMIN))
            .await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    let act = json!({"ticket": check.body["ticket"], "ops": [{"put": {"key": "x", "value": 1}}]});
    let r = call(&http, "POST", "/v1/ns/other/act", Some(&act), Some(BOTH_ADMIN)).await;
    assert_eq!((r.status, r.body["error"].as_str()), (400, Some("invalid_ticket")));
    assert_eq!(call(&http, "GET", "/v1/ns/other/kv/x", None, Some(BOTH_ADMIN)).await.status, 404);
}

#[tokio::test]
async fn an_idempotency_key_does_not_replay_another_api_keys_response() {
    let (server, _dir) = start();
    let http = Http::new(&server);
    let body = json!({"ops": [{"add": {"key": "charged", "by": 10}}]});
    let with = |secret: &'static str| {
        let auth = format!("Bearer {secret}");
        (auth, body.clone())
    };
    let (auth, b) = with(WRITER);
    let first =
        http.send("POST", "/v1/ns/shop/act", Some(&b), &[("authorization", &auth), ("idempotency-key", "k-1")]).await;
    assert_eq!(first.status, 200);
    let (auth, b) = with(ADMIN);
    let other =
        http.send("POST", "/v1/ns/shop/act", Some(&b), &[("authorization", &auth), ("idempotency-key", "k-1")]).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("idempotent-replayed"), None, "another key's response was replayed");
    assert_ne!(other.body["revision"], first.body["revision"]);
    let (auth, b) = with(WRITER);
    let replay =
        http.send("POST", "/v1/ns/shop/act", Some(&b), &[("authorization", &auth), ("idempotency-key", "k-1")]).await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
}

#[test]
fn without_keys_the_server_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a configuration refused: {stderr}");
    assert!(stderr.contains("without API keys") && stderr.contains("loopback"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
}
