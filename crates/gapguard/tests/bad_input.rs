//! Bad input gets a clear error and loses nothing: a property test against the real binary.
//!
//! For every route that takes a request body — a key's put, check, act (with its own
//! conditions, with a ticket, and with every kind of condition and op mixed), txn, a pool's
//! capacity, reserve, a reservation's commit and release, a lease's acquire, renew and release,
//! grant, revoke and an orphan's resolution — a valid body is mutated at random: a field
//! removed; a value replaced by one of another type (strings, negative, huge and fractional
//! numbers, booleans, null, arrays, nested and over-deep objects); an object given as the
//! array of its values; an unknown field added at top level or nested; a top-level field given
//! twice; a string made oversize (past the key, value and body limits); the serialized JSON
//! truncated, or given stray bytes; a body that is not an object, or is empty. Each is sent as
//! raw bytes under a random `Content-Type`, half of the time with the namespace
//! percent-encoded (so both the hot routes and the router answer), and sometimes to a bad path
//! (a namespace that is not UTF-8, has a space or is too long; for the key's put, a bad key).
//! Every answer must be:
//!
//! - never a 5xx, never a dropped connection;
//! - a 2xx (a mutation may still be a valid request), or one of the documented refusals
//!   (400, 404, 409, 410, 412, 413, 422) as JSON whose `error` and `message` are non-empty
//!   strings; a 400 is `invalid_request` (naming its `field`, in the message too) or
//!   `invalid_ticket`; a 413 is `payload_too_large` with its `limit_bytes`;
//! - for a mutation that cannot be a valid request, exactly 400 or 413; for a body past the
//!   1 MiB limit, 413;
//! - and a refused request loses nothing: the global revision (`GET /healthz`) and all the
//!   state the routes touch (keys, pools, reservations, leases, grants, orphans) read the same
//!   after it as before.
//!
//! Besides, each route gets keep-alive probes: a 64 KiB body sent in one write to its path and
//! to its bad paths, then another request on the same connection, which must be answered unless
//! the refusal said `Connection: close` (a refusal given before the body was read must not
//! leave a connection that the server then drops).
//!
//! The number of cases is fixed ([`CASES_PER_ROUTE`] per route); the seed is random, and a
//! failure is reported with the minimal request proptest shrank it to. Like `flows.rs`, it runs
//! on the backend the suite selects (`GAPGUARD_TEST_BACKEND`, see [`support::backend_for`]).

mod support;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use serde_json::{json, Map, Value};
use support::Server;

/// Cases per route (17 routes). Each case is one request plus the reads of the state around it.
const CASES_PER_ROUTE: u32 = 64;

/// The namespace everything happens in.
const NS: &str = "bad";

/// The default limits of DESIGN §5 (the server runs without a config).
const MAX_BODY: usize = 1024 * 1024;
const MAX_VALUE: usize = 256 * 1024;
/// Every key and name (pool, lease, holder, grant parts, reservation) is at most this long;
/// flows and namespaces are shorter still.
const MAX_NAME: usize = 512;

/// The statuses the README and DESIGN §2 document for a refused request.
const DOCUMENTED: [u16; 7] = [400, 404, 409, 410, 412, 413, 422];

/// A ticket and lease TTL far past the test's run: nothing the test creates expires while it
/// runs, so the reconciler writes nothing that could be taken for a refused request's write.
const LONG_TTL_MS: u64 = 3_600_000;

/// Field names of the API's request bodies (an "unknown" field with one of these names may be
/// a valid request).
const KNOWN_FIELDS: &str = "value conditions ttl_ms flow ticket ops if then else capacity amount context holder \
    token subject action resource note key op is name pool by reservation exists absent equals version compare \
    lease available permitted put delete add reserve commit release grant revoke";

fn known_field(name: &str) -> bool {
    KNOWN_FIELDS.split_whitespace().any(|known| known == name)
}

// ---------------------------------------------------------------------------------------------
// The routes and their valid bodies.

/// What a route's valid body is built from, fetched before each case.
#[derive(Clone, Debug, Default)]
struct Ctx {
    /// A fresh ticket of a check that holds (`{"exists": "doc"}`).
    ticket: String,
    /// The fencing token of the lease `leader`, held by the test.
    leader_token: u64,
}

/// What a route needs before each case.
#[derive(Clone, Copy)]
enum Needs {
    Nothing,
    Ticket,
    Leader,
}

/// A route that takes a body, with a valid body and what of it may change and stay valid.
struct Route {
    name: &'static str,
    method: &'static str,
    /// The path after `/v1/ns/{ns}/`.
    path: String,
    /// Bad paths of its own (after `/v1/ns/{ns}/`) to send the body to sometimes, and whether
    /// each is certainly refused with a 400 (else it may have no route at all: a 404).
    bad_paths: Vec<(String, bool)>,
    /// A valid body; `None`: the route takes no body (any body sent is ignored or refused).
    base: Option<fn(&Ctx) -> Value>,
    needs: Needs,
    /// JSON pointers of fields that may be absent (or null, unless in `not_null`).
    optional: &'static [&'static str],
    /// Optional fields that may be absent but not `null` (an act's `ticket`: a null taken for
    /// absent would drop the act's guard silently).
    not_null: &'static [&'static str],
    /// JSON pointers under which any JSON is valid (within the value limit).
    any: &'static [&'static str],
    /// JSON pointers whose value must be an object, with any JSON inside (`context`).
    object: &'static [&'static str],
    /// JSON pointers of strings that may be up to the value limit long (`note`).
    long_ok: &'static [&'static str],
    /// An empty body is valid (the body is optional).
    body_optional: bool,
}

impl Route {
    /// Whether anything at or below `pointer` is valid JSON for the route.
    fn free(&self, pointer: &str) -> bool {
        let under = |prefix: &str| pointer.len() > prefix.len() && pointer.starts_with(&format!("{prefix}/"));
        self.any.iter().any(|a| pointer == *a || under(a)) || self.object.iter().any(|o| under(o))
    }
}

fn routes(seed: &Seeded) -> Vec<Route> {
    let key_path = "kv/fuzz/doc".to_owned();
    let simple = |name, method, path: &str, base, needs| Route {
        name,
        method,
        path: path.to_owned(),
        bad_paths: Vec::new(),
        base: Some(base),
        needs,
        optional: &[],
        not_null: &[],
        any: &[],
        object: &[],
        long_ok: &[],
        body_optional: false,
    };
    // An orphan's resolution: its note is optional, and so is the whole body.
    let orphan_resolve = |name, path: &str| Route {
        optional: &["/note"],
        long_ok: &["/note"],
        body_optional: true,
        ..simple(name, "POST", path, |_| json!({"note": "rebuilt by hand"}), Needs::Nothing)
    };
    // A reservation's commit or release: no body to mutate.
    let resolution =
        |name, path: &str| Route { base: None, ..simple(name, "POST", path, |_| json!({}), Needs::Nothing) };
    vec![
        Route {
            bad_paths: vec![
                (format!("kv/{}", "k".repeat(MAX_NAME + 1)), true),
                ("kv/a%01b".into(), true),
                ("kv/a%FFb".into(), true),
                ("kv/a%00".into(), true),
                ("kv/".into(), false),
            ],
            any: &["/value"],
            ..simple("PUT kv", "PUT", &key_path, |_| json!({"value": {"a": 1, "b": [true, null, "x"]}}), Needs::Nothing)
        },
        Route {
            optional: &["/ttl_ms", "/flow"],
            ..simple(
                "check",
                "POST",
                "check",
                |_| {
                    json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}, {"exists": "doc"}],
                           "ttl_ms": LONG_TTL_MS, "flow": "checkout"})
                },
                Needs::Nothing,
            )
        },
        Route {
            optional: &["/conditions", "/flow"],
            any: &["/ops/1/put/value"],
            ..simple(
                "act (own conditions)",
                "POST",
                "act",
                |_| {
                    json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}],
                           "ops": [{"add": {"key": "counter", "by": 1}}, {"put": {"key": "orders/1", "value": "placed"}}],
                           "flow": "checkout"})
                },
                Needs::Nothing,
            )
        },
        Route {
            optional: &["/ticket", "/flow"],
            not_null: &["/ticket"],
            ..simple(
                "act (ticket)",
                "POST",
                "act",
                |ctx| json!({"ticket": ctx.ticket, "ops": [{"add": {"key": "counter", "by": -1}}], "flow": "checkout"}),
                Needs::Ticket,
            )
        },
        Route {
            optional: &["/conditions", "/flow", "/ops/0/reserve/context"],
            any: &["/conditions/2/equals/value"],
            object: &["/ops/0/reserve/context"],
            ..simple(
                "act (every condition and op)",
                "POST",
                "act",
                |ctx| {
                    json!({
                        "conditions": [
                            {"available": {"pool": "quota", "amount": 1}},
                            {"permitted": {"subject": "user:alice", "action": "read", "resource": "doc:1"}},
                            {"equals": {"key": "doc", "value": {"a": 1}}},
                            {"version": {"key": "doc", "is": 1}},
                            {"absent": "nothing/here"},
                            {"lease": {"name": "leader", "token": ctx.leader_token}}
                        ],
                        "ops": [
                            {"reserve": {"pool": "quota", "amount": 1, "ttl_ms": LONG_TTL_MS, "context": {"vm": "v-9"}}},
                            {"delete": {"key": "tmp/1"}},
                            {"grant": {"subject": "user:carol", "action": "read", "resource": "doc:3"}},
                            {"revoke": {"subject": "user:dave", "action": "read", "resource": "doc:4"}}
                        ],
                        "flow": "provision"
                    })
                },
                Needs::Leader,
            )
        },
        Route {
            optional: &["/if", "/then", "/else"],
            any: &["/then/0/put/value", "/else/0/put/value"],
            ..simple(
                "txn",
                "POST",
                "txn",
                |_| {
                    json!({"if": [{"version": {"key": "doc", "is": 999}}],
                           "then": [{"put": {"key": "t/then", "value": 1}}],
                           "else": [{"put": {"key": "t/else", "value": [2]}}, {"delete": {"key": "t/then"}}]})
                },
                Needs::Nothing,
            )
        },
        simple("PUT pool", "PUT", "pools/cap-pool", |_| json!({"capacity": 1000}), Needs::Nothing),
        Route {
            optional: &["/context"],
            object: &["/context"],
            ..simple(
                "reserve",
                "POST",
                "pools/quota/reserve",
                |_| json!({"amount": 1, "ttl_ms": LONG_TTL_MS, "context": {"vm": "v-1", "zone": ["a"]}}),
                Needs::Nothing,
            )
        },
        resolution("commit", &format!("reservations/{}/commit", seed.to_commit)),
        resolution("release", &format!("reservations/{}/release", seed.to_release)),
        simple(
            "lease acquire",
            "POST",
            "leases/fuzz-lease/acquire",
            |_| json!({"holder": "worker-1", "ttl_ms": LONG_TTL_MS}),
            Needs::Nothing,
        ),
        Route {
            optional: &["/ttl_ms"],
            ..simple(
                "lease renew",
                "POST",
                "leases/leader/renew",
                |ctx| json!({"token": ctx.leader_token, "ttl_ms": LONG_TTL_MS}),
                Needs::Leader,
            )
        },
        simple(
            "lease release",
            "POST",
            "leases/leader/release",
            |ctx| json!({"token": ctx.leader_token}),
            Needs::Leader,
        ),
        simple(
            "grant",
            "POST",
            "grants",
            |_| json!({"subject": "user:bob", "action": "write", "resource": "doc:2"}),
            Needs::Nothing,
        ),
        simple(
            "revoke",
            "POST",
            "grants/revoke",
            |_| json!({"subject": "user:bob", "action": "write", "resource": "doc:2"}),
            Needs::Nothing,
        ),
        orphan_resolve("orphan resolve", &format!("orphans/{}/resolve", seed.orphan)),
        orphan_resolve("orphan resolve (none)", "orphans/no-such-orphan/resolve"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// One way to break a valid body.
#[derive(Clone, Debug)]
enum Mutation {
    /// Remove an object's field.
    Remove(Index),
    /// Replace a value (not the root) with another.
    Replace(Index, Value),
    /// Add a field to an object (the root included).
    Unknown(Index, String, Value),
    /// Give a top-level field twice.
    Duplicate(Index),
    /// Replace an object (not the root) with the array of its values, in the order of the
    /// permutation the second index picks (serde reads a struct from the array of its fields
    /// in their declared order).
    AsArray(Index, Index),
    /// Replace a string with one of this many bytes.
    Oversize(Index, usize),
    /// Cut the serialized body before this byte.
    Truncate(Index),
    /// Insert bytes into the serialized body.
    Insert(Index, Vec<u8>),
    /// Send this instead of an object.
    NotObject(Vec<u8>),
    /// Send no body.
    Empty,
}

/// A generated request: a mutation, a `Content-Type`, whether the namespace is percent-encoded
/// (the router instead of the hot routes), and sometimes a bad path ([`bad_paths`], modulo
/// their number) instead of the route's.
#[derive(Clone, Debug)]
struct Case {
    mutation: Mutation,
    content_type: Option<&'static str>,
    encoded_ns: bool,
    bad_path: Option<usize>,
}

/// Values of every JSON type, weighted to the ones no field of the API accepts: no small
/// non-negative integer (which could be a valid TTL that then expires under the test).
fn weird_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        "\\PC{0,12}".prop_map(Value::String),
        select(vec!["", " ", "\u{0}", "\u{7f}", "a/../b", "..", "🦀", "\u{202e}", "-1", "1e400", "{}", "null"])
            .prop_map(|s| json!(s)),
        select(vec![
            json!(-1),
            json!(0),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(0.5),
            json!(-0.0),
            json!(3.0),
            json!(1e300),
            json!(-1e300),
            json!(18_446_744_073_709_551_616.0),
            json!(f64::MIN_POSITIVE),
        ]),
        (i64::MIN..0).prop_map(|n| json!(n)),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(|f| json!(f)),
    ];
    let nested = leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        8 => nested,
        1 => (select(vec![64usize, 120, 126, 127, 128, 129, 200, 1000]), any::<bool>()).prop_map(|(depth, arrays)| deep(depth, arrays)),
    ]
}

/// A value nested `depth` levels deep, in arrays or in objects.
fn deep(depth: usize, arrays: bool) -> Value {
    (0..depth).fold(json!(1), |v, _| if arrays { json!([v]) } else { json!({"a": v}) })
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-zA-Z_]{1,10}",
        1 => select(vec!["", "Value", "ttl", "TTL_MS", "tickets", "__proto__", "conditions ", "\u{0}", "ключ", "op\u{301}"])
            .prop_map(str::to_owned),
    ]
}

fn stray_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..4),
        select(vec![
            &b"\\ud800"[..],
            b"\xff",
            b"\x00",
            b"\"",
            b"\\",
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"-",
            b".",
            b"e",
            b"1e999",
            b"\xef\xbb\xbf",
            b"/*x*/",
            b"NaN",
        ])
        .prop_map(<[u8]>::to_vec),
    ]
}

fn not_object() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        select(vec![
            &b"[]"[..],
            b"[1,2]",
            b"\"x\"",
            b"1",
            b"-1",
            b"null",
            b"true",
            b"not json",
            b"\xff\xfe\xfd",
            b"]",
            b"\"{\\\"value\\\": 1}\"",
            b"\x00{}",
            b"\xef\xbb\xbf{\"value\": 1}",
            b"value=1",
            b" \n\t ",
        ])
        .prop_map(<[u8]>::to_vec),
        prop::collection::vec(any::<u8>(), 1..48),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::Remove),
        5 => (any::<Index>(), weird_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        3 => (any::<Index>(), field_name(), weird_value()).prop_map(|(i, n, v)| Mutation::Unknown(i, n, v)),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(i, order)| Mutation::AsArray(i, order)),
        2 => (any::<Index>(), select(vec![MAX_NAME + 1, 70_000, MAX_VALUE + 1, MAX_BODY + 1]))
            .prop_map(|(i, n)| Mutation::Oversize(i, n)),
        3 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), stray_bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => not_object().prop_map(Mutation::NotObject),
        1 => Just(Mutation::Empty),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let content_type = select(vec![
        Some("application/json"),
        Some("application/json"),
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("application/json; charset=utf-16"),
        Some("multipart/form-data; boundary=x"),
    ]);
    let bad_path = prop_oneof![5 => Just(None), 1 => any::<usize>().prop_map(Some)];
    (mutation(), content_type, any::<bool>(), bad_path).prop_map(|(mutation, content_type, encoded_ns, bad_path)| {
        Case { mutation, content_type, encoded_ns, bad_path }
    })
}

// ---------------------------------------------------------------------------------------------
// Applying a mutation.

/// What a request may be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// It cannot be a valid request: 400 or 413.
    Refused,
    /// It may be valid: a 2xx or any documented refusal.
    Any,
}

/// The JSON pointer of every node of `v` below the root, in document order.
fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(child, &p, out);
            }
        }
        _ => {}
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether the field at `pointer` takes any JSON number (the others are unsigned integers).
fn any_number(pointer: &str) -> bool {
    pointer.ends_with("/by") || pointer.ends_with("/compare/value")
}

/// The parent pointer of `pointer` and its last segment (unescaped).
fn split(pointer: &str) -> (&str, String) {
    let (parent, last) = pointer.rsplit_once('/').expect("a pointer below the root");
    (parent, last.replace("~1", "/").replace("~0", "~"))
}

/// The permutation of `0..n` that `order` picks.
fn permutation(n: usize, order: &Index) -> Vec<usize> {
    let count: usize = (1..=n).product();
    let mut k = order.index(count);
    let mut left: Vec<usize> = (0..n).collect();
    let mut out = Vec::with_capacity(n);
    for size in (1..=n).rev() {
        let block: usize = (1..size).product();
        out.push(left.remove(k / block));
        k %= block;
    }
    out
}

/// The body a case sends to `route`, whether it can be valid, and what was done (for people).
fn render(route: &Route, ctx: &Ctx, m: &Mutation) -> (Vec<u8>, Expect, String) {
    let raw = route.base.is_none();
    let base = route.base.map_or_else(|| json!({}), |f| f(ctx));
    let all = {
        let mut all = Vec::new();
        pointers(&base, "", &mut all);
        all
    };
    let of = |pred: &dyn Fn(&Value) -> bool| -> Vec<String> {
        all.iter().filter(|p| pred(base.pointer(p).expect("a pointer of the base"))).cloned().collect()
    };
    let objects = {
        let mut o = vec![String::new()];
        o.extend(of(&|v| v.is_object()));
        o
    };
    let fields: Vec<String> =
        all.iter().filter(|p| base.pointer(split(p).0).is_some_and(Value::is_object)).cloned().collect();
    let strings = of(&|v| v.is_string());
    let serialized = serde_json::to_vec(&base).expect("JSON");
    let optional = |p: &str| route.optional.contains(&p);

    // (body, whether it is certainly refused, description)
    let (body, refused, what): (Vec<u8>, bool, String) = match m {
        Mutation::Remove(i) if !fields.is_empty() => {
            let p = &fields[i.index(fields.len())];
            let (parent, last) = split(p);
            let mut v = base.clone();
            v.pointer_mut(parent).and_then(Value::as_object_mut).expect("an object").remove(&last);
            let refused = !route.free(p) && !optional(p);
            (serde_json::to_vec(&v).unwrap(), refused, format!("removed {p}"))
        }
        Mutation::Replace(i, w) if !all.is_empty() => {
            let p = &all[i.index(all.len())];
            let orig = base.pointer(p).expect("a pointer of the base");
            let refused = if w.is_null() && route.not_null.contains(&p.as_str()) {
                true
            } else if route.free(p) || (w.is_null() && optional(p)) {
                false
            } else if route.object.contains(&p.as_str()) {
                !w.is_object()
            } else if kind(orig) != kind(w) {
                true
            } else if orig.is_number() && !any_number(p) {
                w.as_u64().is_none()
            } else {
                false
            };
            let mut v = base.clone();
            *v.pointer_mut(p).expect("a pointer of the base") = w.clone();
            (serde_json::to_vec(&v).unwrap(), refused, format!("replaced {p} with a {}", kind(w)))
        }
        Mutation::Unknown(i, name, w) => {
            let p = &objects[i.index(objects.len())];
            let mut v = base.clone();
            let object = v.pointer_mut(p).and_then(Value::as_object_mut).expect("an object");
            let existed = object.contains_key(name);
            object.insert(name.clone(), w.clone());
            let free = route.free(p) || route.object.contains(&p.as_str());
            let refused = !free && !existed && !known_field(name);
            (serde_json::to_vec(&v).unwrap(), refused, format!("added field {name:?} to {p:?}"))
        }
        Mutation::Duplicate(i) if base.as_object().is_some_and(|o| !o.is_empty()) => {
            let object = base.as_object().expect("an object");
            let (name, value) = object.iter().nth(i.index(object.len())).expect("in range");
            let mut body = format!("{{{}:{},", json!(name), value).into_bytes();
            body.extend_from_slice(&serialized[1..]);
            (body, true, format!("gave {name:?} twice"))
        }
        Mutation::AsArray(i, order) if objects.len() > 1 => {
            let p = &objects[1..][i.index(objects.len() - 1)];
            let mut values: Vec<Value> =
                base.pointer(p).and_then(Value::as_object).expect("an object").values().cloned().collect();
            let permuted =
                permutation(values.len(), order).into_iter().map(|k| std::mem::take(&mut values[k])).collect();
            let refused = !route.free(p);
            let mut v = base.clone();
            *v.pointer_mut(p).expect("a pointer of the base") = Value::Array(permuted);
            (serde_json::to_vec(&v).unwrap(), refused, format!("gave {p} as an array of its values"))
        }
        Mutation::Oversize(i, len) => {
            let mut v = base.clone();
            let (p, refused) = if strings.is_empty() {
                // No string to grow: an unknown top-level field carries it.
                v.as_object_mut().expect("an object").insert("padding".into(), json!("x".repeat(*len)));
                ("/padding".to_owned(), true)
            } else {
                let p = strings[i.index(strings.len())].clone();
                *v.pointer_mut(&p).expect("a pointer of the base") = json!("x".repeat(*len));
                let limited = !route.free(&p) && !route.long_ok.contains(&p.as_str());
                let refused = *len > MAX_VALUE || (*len > MAX_NAME && limited);
                (p, refused)
            };
            (serde_json::to_vec(&v).unwrap(), refused, format!("made {p} a string of {len} bytes"))
        }
        Mutation::Truncate(i) if !serialized.is_empty() => {
            let at = i.index(serialized.len());
            // Cut at 0 it is an empty body, valid where the body is optional.
            let refused = at > 0 || !route.body_optional;
            (serialized[..at].to_vec(), refused, format!("cut after byte {at} of {}", serialized.len()))
        }
        Mutation::Insert(i, bytes) => {
            let at = i.index(serialized.len() + 1);
            let mut body = serialized.clone();
            body.splice(at..at, bytes.iter().copied());
            (body, false, format!("inserted {:?} at byte {at}", String::from_utf8_lossy(bytes)))
        }
        Mutation::NotObject(bytes) => {
            let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
            let refused = match first {
                None => !route.body_optional,
                Some(b) => *b != b'{',
            };
            (bytes.clone(), refused, "sent a body that is not an object".into())
        }
        // Empty, and the mutations with nothing to act on in this body.
        _ => (Vec::new(), !route.body_optional, "sent an empty body".into()),
    };
    // A route without a body ignores whatever is sent within the size limit.
    let expect = if refused && !raw { Expect::Refused } else { Expect::Any };
    (body, expect, what)
}

// ---------------------------------------------------------------------------------------------
// The server and its state.

/// Ids the seeding made.
struct Seeded {
    to_commit: String,
    to_release: String,
    orphan: String,
}

/// Everything a request can change that the test can read: the global revision, then the
/// answers of the reads of the state the routes touch.
#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    revision: u64,
    reads: BTreeMap<String, (u16, Value)>,
}

impl Snapshot {
    /// What differs from `before`, for people.
    fn diff(&self, before: &Snapshot) -> String {
        let mut out = format!("revision {} -> {}", before.revision, self.revision);
        for (path, now) in &self.reads {
            if before.reads.get(path) != Some(now) {
                let _ = write!(out, "\n  {path}: {:?} -> {now:?}", before.reads.get(path));
            }
        }
        out
    }

    fn leader(&self) -> Option<u64> {
        let (_, lease) = &self.reads[&format!("/v1/ns/{NS}/leases/leader")];
        lease["held"].as_bool().unwrap_or(false).then(|| lease["token"].as_u64()).flatten()
    }
}

/// An answer as received.
struct Answer {
    status: u16,
    content_type: String,
    /// Its `Connection` header (`close`: the server closes the connection after it).
    connection: String,
    body: Vec<u8>,
}

/// The paths a case may send its body to instead of the route's, and whether each is certainly
/// refused with a 400 (else it may have no route: a 404): the route's own bad paths, then its
/// path under a namespace that is not UTF-8, one with a space, and one too long.
fn bad_paths(route: &Route) -> Vec<(String, bool)> {
    let own = route.bad_paths.iter().map(|(rest, refused)| (format!("/v1/ns/{NS}/{rest}"), *refused));
    let namespaces = ["b%FFd".to_owned(), "bad%20ns".to_owned(), "n".repeat(129)];
    own.chain(namespaces.into_iter().map(|ns| (format!("/v1/ns/{ns}/{}", route.path), true))).collect()
}

/// The running server, a client, and what the test last saw of the state.
struct Guard {
    _server: Server,
    url: String,
    rt: tokio::runtime::Runtime,
    /// One keep-alive connection, reused request after request.
    client: reqwest::Client,
    seed: Seeded,
    /// The state after the last request (`None`: unknown, read it again).
    last: RefCell<Option<Snapshot>>,
    sent: Cell<u64>,
    /// Answers per route name: status → count.
    seen: RefCell<BTreeMap<&'static str, BTreeMap<u16, u32>>>,
}

impl Guard {
    fn send(&self, method: &str, path: &str, body: Vec<u8>, content_type: Option<&str>) -> Result<Answer, String> {
        let n = self.sent.get() + 1;
        self.sent.set(n);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.url))
            .timeout(Duration::from_secs(30))
            .header("x-correlation-id", format!("bad-input-{n}"));
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if !body.is_empty() {
            req = req.body(body);
        }
        self.rt.block_on(async {
            let response = req.send().await.map_err(|e| format!("no answer: {e:?}"))?;
            let status = response.status().as_u16();
            let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let content_type = header(reqwest::header::CONTENT_TYPE);
            let connection = header(reqwest::header::CONNECTION);
            let body = response.bytes().await.map_err(|e| format!("the answer's body broke off: {e:?}"))?.to_vec();
            Ok(Answer { status, content_type, connection, body })
        })
    }

    /// A request the test itself makes, which must succeed.
    fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let a = self.send(method, path, bytes, Some("application/json")).unwrap_or_else(|e| panic!("{path}: {e}"));
        let value: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        assert!((200..300).contains(&a.status), "{method} {path}: {} {value}", a.status);
        value
    }

    /// Reads the state.
    fn snapshot(&self) -> Result<Snapshot, String> {
        let health = self.send("GET", "/healthz", Vec::new(), None)?;
        let health: Value = serde_json::from_slice(&health.body).map_err(|e| format!("/healthz: {e}"))?;
        let revision = health["revision"].as_u64().ok_or_else(|| format!("/healthz without a revision: {health}"))?;
        let s = &self.seed;
        let paths = [
            format!("/v1/ns/{NS}/kv?limit=10000"),
            format!("/v1/ns/{NS}/pools/quota"),
            format!("/v1/ns/{NS}/pools/cap-pool"),
            format!("/v1/ns/{NS}/reservations/{}", s.to_commit),
            format!("/v1/ns/{NS}/reservations/{}", s.to_release),
            format!("/v1/ns/{NS}/leases/leader"),
            format!("/v1/ns/{NS}/leases/fuzz-lease"),
            format!("/v1/ns/{NS}/grants"),
            format!("/v1/ns/{NS}/orphans?all=true"),
        ];
        let mut reads = BTreeMap::new();
        for path in paths {
            let a = self.send("GET", &path, Vec::new(), None)?;
            let mut read = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            // Every read names the revision it read at: tracked once, above.
            if let Some(read) = read.as_object_mut() {
                read.remove("revision");
            }
            reads.insert(path, (a.status, read));
        }
        Ok(Snapshot { revision, reads })
    }

    /// The state as last seen, read again if unknown.
    fn state(&self) -> Result<Snapshot, String> {
        let known = self.last.borrow().clone();
        match known {
            Some(state) => Ok(state),
            None => {
                let state = self.snapshot()?;
                *self.last.borrow_mut() = Some(state.clone());
                Ok(state)
            }
        }
    }

    /// What a case of `route` needs: a fresh ticket, the lease `leader` held by the test.
    fn prepare(&self, route: &Route) -> Result<Ctx, String> {
        let mut ctx = Ctx::default();
        match route.needs {
            Needs::Nothing => {}
            Needs::Ticket => {
                let body = json!({"conditions": [{"exists": "doc"}], "ttl_ms": LONG_TTL_MS}).to_string();
                let a =
                    self.send("POST", &format!("/v1/ns/{NS}/check"), body.into_bytes(), Some("application/json"))?;
                let check: Value = serde_json::from_slice(&a.body).map_err(|e| e.to_string())?;
                ctx.ticket = check["ticket"].as_str().ok_or_else(|| format!("check: {} {check}", a.status))?.to_owned();
            }
            Needs::Leader => {
                ctx.leader_token = match self.state()?.leader() {
                    Some(token) => token,
                    None => {
                        let lease = self.ok(
                            "POST",
                            &format!("/v1/ns/{NS}/leases/leader/acquire"),
                            json!({"holder": "leader-1", "ttl_ms": LONG_TTL_MS}),
                        );
                        *self.last.borrow_mut() = None;
                        lease["token"].as_u64().expect("a token")
                    }
                };
            }
        }
        Ok(ctx)
    }

    /// One case: the request, the judgement of its answer, and the state around it.
    fn run(&self, route: &Route, case: &Case) -> Result<(), TestCaseError> {
        let ctx = self.prepare(route).map_err(TestCaseError::fail)?;
        let before = self.state().map_err(TestCaseError::fail)?;
        let (body, mut expect, what) = render(route, &ctx, &case.mutation);
        let ns = if case.encoded_ns { "b%61d" } else { NS };
        let mut path = format!("/v1/ns/{ns}/{}", route.path);
        // On a bad path the path may be refused before the body is read (or its size known).
        let mut size_checked = true;
        if let Some(i) = case.bad_path {
            let alternatives = bad_paths(route);
            let (bad, refused) = &alternatives[i % alternatives.len()];
            path.clone_from(bad);
            expect = if *refused { Expect::Refused } else { Expect::Any };
            size_checked = false;
        }
        let request = format!(
            "{} {} (content-type {:?}, {} body bytes: {}; {what})",
            route.method,
            show(path.as_bytes()),
            case.content_type,
            body.len(),
            show(&body)
        );
        let body_len = body.len();
        *self.last.borrow_mut() = None;
        let answer = self.send(route.method, &path, body, case.content_type).map_err(|e| fail(&request, &e))?;
        *self.seen.borrow_mut().entry(route.name).or_default().entry(answer.status).or_default() += 1;
        let shown_answer = format!("{} {}", answer.status, show(&answer.body));
        // The state after it, read over the same keep-alive connection.
        let after = self.snapshot();
        *self.last.borrow_mut() = after.as_ref().ok().cloned();
        judge(&answer, expect, size_checked.then_some(body_len))
            .map_err(|e| fail(&request, &format!("{e}; answered {shown_answer}")))?;
        let after = after.map_err(|e| {
            let why = format!(
                "answered {shown_answer} (Connection: {:?}), then the next request on the same keep-alive \
                 connection got {e}: the server dropped the connection after its answer",
                answer.connection
            );
            fail(&request, &why)
        })?;

        let accepted = (200..300).contains(&answer.status);
        if !accepted && after != before {
            // The reconciler's expiries are not the request's doing (the test makes nothing
            // that expires while it runs, but say so rather than blame the request). Only
            // those: a refused request's denied check is audited without moving the revision
            // or any state read here.
            let since = self.audit_since(before.revision);
            let reconciler_only = after.revision > before.revision
                && since
                    .as_array()
                    .is_some_and(|events| !events.is_empty() && events.iter().all(|e| e["kind"] == "expire"));
            if !reconciler_only {
                let why = format!(
                    "refused ({shown_answer}) but the state changed: {}\naudit events since revision {}: {since}",
                    after.diff(&before),
                    before.revision
                );
                return Err(fail(&request, &why));
            }
        }
        Ok(())
    }

    /// Sends a 64 KiB body that is not an object to the route's path and to each of its bad
    /// paths, each in one write on a connection of its own, then asks `GET /healthz` on the same
    /// connection: unless the answer said `Connection: close`, the connection must serve it (an
    /// answer given before the body was read must not leave a keep-alive connection that the
    /// server then drops; the random cases' client writes the body more slowly and catches this
    /// only sometimes). Returns what went wrong, one line per request.
    fn keep_alive_probes(&self, route: &Route) -> Vec<String> {
        let body = format!("[{}1]", "1,".repeat(32 * 1024)).into_bytes();
        // A route that takes no body reads and ignores it, so any documented answer will do.
        let own = (format!("/v1/ns/{NS}/{}", route.path), route.base.is_some());
        let addr = self.url.trim_start_matches("http://");
        let failures = std::iter::once(own)
            .chain(bad_paths(route))
            .filter_map(|(path, refused)| {
                let outcome = self.rt.block_on(keep_alive(addr, route.method, &path, &body)).and_then(|answer| {
                    let expect = if refused { Expect::Refused } else { Expect::Any };
                    judge(&answer, expect, None)
                        .map_err(|e| format!("{e}; answered {} {}", answer.status, show(&answer.body)))
                });
                let request = format!("{} {} ({} body bytes)", route.method, show(path.as_bytes()), body.len());
                outcome.err().map(|e| format!("{request}: {e}"))
            })
            .collect();
        // A probe may have changed the state (a commit of the reservation): read it again.
        *self.last.borrow_mut() = None;
        failures
    }

    /// The audit events of the namespace after `revision`, for a failure's message.
    fn audit_since(&self, revision: u64) -> Value {
        let path = format!("/v1/ns/{NS}/audit?from_revision={}&limit=50", revision + 1);
        self.send("GET", &path, Vec::new(), None)
            .ok()
            .and_then(|a| serde_json::from_slice::<Value>(&a.body).ok())
            .map_or(Value::Null, |v| v["events"].clone())
    }
}

/// `method path` with `body`, sent in one write on a new connection, and its answer; then, unless
/// the answer said `Connection: close`, `GET /healthz` on the same connection, which must be
/// answered 200.
async fn keep_alive(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<Answer, String> {
    use tokio::io::AsyncWriteExt as _;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let request = [head.as_bytes(), body].concat();
    tcp.write_all(&request).await.map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::new();
    let answer = read_answer(&mut tcp, &mut buf).await.map_err(|e| format!("no answer: {e}"))?;
    if answer.connection.eq_ignore_ascii_case("close") {
        return Ok(answer);
    }
    let dropped = |e: String| {
        format!(
            "answered {} {} without `Connection: close`, then dropped the connection: the next request \
             on it (GET /healthz) got {e}",
            answer.status,
            show(&answer.body)
        )
    };
    let next = async {
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.map_err(|e| format!("a failed write: {e}"))?;
        read_answer(&mut tcp, &mut buf).await.map_err(|e| format!("no answer: {e}"))
    };
    match next.await {
        Ok(next) if next.status == 200 => Ok(answer),
        Ok(next) => Err(dropped(format!("{} {}", next.status, show(&next.body)))),
        Err(e) => Err(dropped(e)),
    }
}

/// Reads one HTTP/1.1 answer (with a `content-length`) from `tcp`, `buf` holding what was read
/// past the previous one.
async fn read_answer(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<Answer, String> {
    use tokio::io::AsyncReadExt as _;
    let mut chunk = vec![0; 64 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok());
            let status = status.ok_or_else(|| format!("not an HTTP answer: {status_line:?}"))?;
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let header =
                |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
            let len: usize = header("content-length").parse().map_err(|_| format!("no content-length in {head:?}"))?;
            let start = end + 4;
            if buf.len() >= start + len {
                let body = buf[start..start + len].to_vec();
                buf.drain(..start + len);
                return Ok(Answer {
                    status,
                    content_type: header("content-type"),
                    connection: header("connection"),
                    body,
                });
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await;
        match read {
            Err(_) => return Err("nothing within 10 s".into()),
            Ok(Err(e)) => return Err(format!("a failed read: {e}")),
            Ok(Ok(0)) => return Err("the connection closed".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn fail(request: &str, why: &str) -> TestCaseError {
    TestCaseError::fail(format!("{why}\n  request: {request}"))
}

/// Bytes for people: UTF-8 (lossy) with control characters escaped, long runs elided.
fn show(bytes: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(bytes).escape_debug().collect();
    if text.chars().count() <= 400 {
        return text;
    }
    let head: String = text.chars().take(200).collect();
    let tail: String = text.chars().rev().take(100).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{head}…({} chars)…{tail}", text.chars().count())
}

/// The rule for one answer: a documented status, and a clear JSON error when refused.
/// `body_len`: the size of the body, when a body past the limit must be answered 413.
fn judge(answer: &Answer, expect: Expect, body_len: Option<usize>) -> Result<(), String> {
    let status = answer.status;
    if status >= 500 {
        return Err(format!("a {status} for bad input"));
    }
    if let Some(len) = body_len.filter(|len| *len > MAX_BODY && status != 413) {
        return Err(format!("a body of {len} bytes, past the {MAX_BODY}-byte limit, answered {status}, not 413"));
    }
    if expect == Expect::Refused && status != 400 && status != 413 {
        return Err(format!("a request that cannot be valid answered {status}, not 400 or 413"));
    }
    if (200..300).contains(&status) {
        return Ok(());
    }
    if !DOCUMENTED.contains(&status) {
        return Err(format!("{status} is not a documented status ({DOCUMENTED:?})"));
    }
    if !answer.content_type.starts_with("application/json") {
        return Err(format!("the error's Content-Type is {:?}, not JSON", answer.content_type));
    }
    let err: Map<String, Value> =
        serde_json::from_slice(&answer.body).map_err(|e| format!("the error body is not a JSON object: {e}"))?;
    let text = |name: &str| err.get(name).and_then(Value::as_str).filter(|s| !s.trim().is_empty());
    let code = text("error").ok_or("the error has no non-empty string `error`")?;
    let message = text("message").ok_or("the error has no non-empty string `message`")?;
    if message.len() < 10 || message.contains("internal error") {
        return Err(format!("the message {message:?} tells a person nothing they can act on"));
    }
    match (status, code) {
        (400, "invalid_request") => {
            // The field at fault, by its path; `""` only for a field whose name is empty (an
            // unknown field `""` at top level), which the message then names.
            let field = err.get("field").and_then(Value::as_str).ok_or("an invalid_request without its `field`")?;
            let named = if field.is_empty() { message.contains("``") } else { message.contains(field) };
            if !named {
                return Err(format!("the message {message:?} does not name the field {field:?}"));
            }
        }
        (400, "invalid_ticket") => {}
        (400, other) => return Err(format!("a 400 with code {other:?}, not invalid_request or invalid_ticket")),
        (413, "payload_too_large") if err.get("limit_bytes").and_then(Value::as_u64) != Some(MAX_BODY as u64) => {
            return Err("a payload_too_large without its `limit_bytes`".into());
        }
        (413, "payload_too_large") => {}
        (413, other) => return Err(format!("a 413 with code {other:?}, not payload_too_large")),
        _ => {}
    }
    Ok(())
}

/// Starts the server and makes the state the valid bodies need.
fn start() -> (Guard, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut guard = Guard {
        url: server.url.clone(),
        _server: server,
        rt,
        client: reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap(),
        seed: Seeded { to_commit: String::new(), to_release: String::new(), orphan: String::new() },
        last: RefCell::new(None),
        sent: Cell::new(0),
        seen: RefCell::new(BTreeMap::new()),
    };
    let ns = |rest: &str| format!("/v1/ns/{NS}/{rest}");
    let g = &guard;
    g.ok("PUT", &ns("kv/doc"), json!({"value": {"a": 1}}));
    g.ok("PUT", &ns("kv/stock"), json!({"value": 1_000_000}));
    g.ok("PUT", &ns("kv/fuzz/doc"), json!({"value": "seed"}));
    g.ok("PUT", &ns("pools/quota"), json!({"capacity": 1_000_000}));
    g.ok("PUT", &ns("pools/cap-pool"), json!({"capacity": 1000}));
    g.ok("POST", &ns("grants"), json!({"subject": "user:alice", "action": "read", "resource": "doc:1"}));
    g.ok("POST", &ns("leases/leader/acquire"), json!({"holder": "leader-1", "ttl_ms": LONG_TTL_MS}));
    let reserve = |ttl_ms: u64| {
        let r =
            g.ok("POST", &ns("pools/quota/reserve"), json!({"amount": 1, "ttl_ms": ttl_ms, "context": {"vm": "v"}}));
        r["reservation"].as_str().expect("a reservation id").to_owned()
    };
    let (to_commit, to_release) = (reserve(LONG_TTL_MS), reserve(LONG_TTL_MS));
    // An orphan to resolve: a reservation left to expire, which the reconciler turns into one.
    reserve(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let orphan = loop {
        let list = g.ok("GET", &ns("orphans"), Value::Null);
        if let Some(id) = list["items"][0]["id"].as_str() {
            break id.to_owned();
        }
        assert!(Instant::now() < deadline, "the reservation left to expire became no orphan: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    guard.seed = Seeded { to_commit, to_release, orphan };
    (guard, dir)
}

#[test]
fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let started = Instant::now();
    let (guard, _dir) = start();
    let routes = routes(&guard.seed);
    let (mut failures, mut probes) = (Vec::new(), Vec::new());
    for route in &routes {
        probes.extend(guard.keep_alive_probes(route));
        let config =
            Config { cases: CASES_PER_ROUTE, max_shrink_iters: 256, failure_persistence: None, ..Config::default() };
        let first = RefCell::new(None);
        let result = TestRunner::new(config).run(&case(), |case| {
            let result = guard.run(route, &case);
            if let Err(e) = &result {
                first.borrow_mut().get_or_insert_with(|| e.to_string());
            }
            result
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(why, case)) => {
                let mut failure =
                    format!("{}: {why}\n  minimal case: {}", route.name, show(format!("{case:?}").as_bytes()));
                if let Some(first) = first.into_inner().filter(|first| *first != why.to_string()) {
                    let _ = write!(failure, "\n  first failure, before shrinking: {first}");
                }
                failures.push(failure);
            }
            Err(e) => failures.push(format!("{}: {e}", route.name)),
        }
    }

    if !probes.is_empty() {
        failures.push(format!(
            "keep-alive probes: {} request(s) with a 64 KiB body, then a GET on the same connection, failed:\n  {}",
            probes.len(),
            probes.join("\n  ")
        ));
    }

    // The server is still sound: it answers, its audit chain verifies, and a valid write works.
    let health = guard.ok("GET", "/healthz", Value::Null);
    assert_eq!(health["status"], "ok", "{health}");
    let verify = guard.ok("GET", "/v1/audit/verify", Value::Null);
    assert_eq!(verify["ok"], true, "{verify}");
    guard.ok("PUT", &format!("/v1/ns/{NS}/kv/after"), json!({"value": 1}));

    let mut report = String::new();
    for (route, statuses) in guard.seen.borrow().iter() {
        let _ = writeln!(report, "  {route:<30} {statuses:?}");
    }
    println!(
        "bad_input: {} routes × ({CASES_PER_ROUTE} random cases + keep-alive probes, plus shrinking), {} requests in {:.1} s; \
         answers by route:\n{report}",
        routes.len(),
        guard.sent.get(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} failure(s):\n\n{}", failures.len(), failures.join("\n\n"));
}
