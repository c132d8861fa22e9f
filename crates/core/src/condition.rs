//! Conditions: predicates evaluated atomically against the current state.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::primitives::{self, Lease, Pool};
use crate::state::{Entry, NsKey, Revision, StateView};

/// A numeric comparison operator of the `compare` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
}

impl CompareOp {
    /// The operator as written in the API.
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CompareOp::Eq => ordering == Ordering::Equal,
            CompareOp::Ne => ordering != Ordering::Equal,
            CompareOp::Lt => ordering == Ordering::Less,
            CompareOp::Le => ordering != Ordering::Greater,
            CompareOp::Gt => ordering == Ordering::Greater,
            CompareOp::Ge => ordering != Ordering::Less,
        }
    }
}

/// A predicate over one key of the request's namespace. Keys here are namespace-relative;
/// the namespace comes from the request (or the ticket).
///
/// The serde form is the one carried inside tickets; it mirrors the API's JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The key holds a value.
    Exists(String),
    /// The key holds no value.
    Absent(String),
    /// The key's value equals this JSON value.
    Equals {
        /// The key.
        key: String,
        /// The expected value.
        value: Value,
    },
    /// The key's version is exactly `is` (0 = absent).
    Version {
        /// The key.
        key: String,
        /// The expected version.
        is: u64,
    },
    /// The key's value is a number that compares to `value` with `op`.
    Compare {
        /// The key.
        key: String,
        /// The comparison.
        op: CompareOp,
        /// The number to compare with.
        value: Number,
    },
    /// The lease is held, unexpired, under this fencing token.
    Lease {
        /// The lease's name.
        name: String,
        /// The token the caller holds.
        token: u64,
    },
    /// The pool has at least this much available.
    Available {
        /// The pool.
        pool: String,
        /// The amount.
        amount: u64,
    },
    /// The grant exists.
    Permitted {
        /// Who.
        subject: String,
        /// May do what.
        action: String,
        /// To what.
        resource: String,
    },
}

/// A condition that did not hold, with what was found instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConditionFailure {
    /// Position of the condition in the request (or in the ticket).
    pub index: usize,
    /// The condition as given.
    pub condition: Condition,
    /// The key's current value (`null` if absent).
    pub actual: Value,
    /// The key's current version (0 if absent).
    pub actual_version: u64,
    /// Why it failed, for a person.
    pub reason: String,
    /// Revision of the last change to the key, if it was ever written.
    pub changed_at_revision: Option<Revision>,
    /// Correlation id of that change, if it had one.
    pub changed_by: Option<String>,
}

impl Condition {
    /// The namespace-relative key the condition reads (internal for primitives).
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Condition::Exists(key) | Condition::Absent(key) => key.into(),
            Condition::Equals { key, .. } | Condition::Version { key, .. } | Condition::Compare { key, .. } => {
                key.into()
            }
            Condition::Lease { name, .. } => primitives::lease_key(name).into(),
            Condition::Available { pool, .. } => primitives::pool_key(pool).into(),
            Condition::Permitted { subject, action, resource } => {
                primitives::grant_key(subject, action, resource).into()
            }
        }
    }

    /// Evaluates the condition against the entry of its key at `now_ms`. `Ok(())` if it
    /// holds, else the reason it does not.
    pub fn evaluate(&self, key: &NsKey, entry: Option<&Entry>, now_ms: u64) -> Result<(), String> {
        let record = entry.and_then(|entry| entry.record.as_ref());
        match (self, record) {
            (Condition::Exists(_), Some(_)) => Ok(()),
            (Condition::Exists(_), None) => Err("key is absent".into()),
            (Condition::Absent(_), None) => Ok(()),
            (Condition::Absent(_), Some(r)) => Err(format!("key exists (version {})", r.version)),
            (Condition::Equals { value, .. }, Some(r)) if r.value == *value => Ok(()),
            (Condition::Equals { .. }, Some(_)) => Err("value differs".into()),
            (Condition::Equals { .. }, None) => Err("key is absent".into()),
            (Condition::Version { is, .. }, r) => {
                let version = r.map_or(0, |r| r.version);
                if version == *is {
                    Ok(())
                } else {
                    Err(format!("version is {version}, expected {is}"))
                }
            }
            (Condition::Compare { .. }, None) => Err("key is absent".into()),
            (Condition::Compare { op, value, .. }, Some(r)) => match &r.value {
                Value::Number(actual) => {
                    if op.holds(compare_numbers(actual, value)) {
                        Ok(())
                    } else {
                        Err(format!("{actual} {} {value} is false", op.symbol()))
                    }
                }
                other => Err(format!("value is not a number ({})", json_kind(other))),
            },
            (Condition::Lease { token, .. }, _) => {
                let lease: Lease = primitives::decode(key, entry).unwrap_or_default();
                match lease.live_holder(now_ms) {
                    None if lease.token == 0 => Err("the lease was never acquired".into()),
                    None => Err(format!("the lease is not held (last token {})", lease.token)),
                    Some(_) if lease.token != *token => {
                        Err(format!("token {token} is stale: the lease is held under token {}", lease.token))
                    }
                    Some(_) => Ok(()),
                }
            }
            (Condition::Available { amount, .. }, _) => match primitives::decode::<Pool>(key, entry) {
                None => Err("no such pool".into()),
                Some(pool) if pool.available() >= *amount => Ok(()),
                Some(pool) => Err(format!("{} available, {amount} needed", pool.available())),
            },
            (Condition::Permitted { .. }, Some(_)) => Ok(()),
            (Condition::Permitted { .. }, None) => Err("not permitted (no such grant)".into()),
        }
    }
}

/// Evaluates `conditions` (namespace-relative) in namespace `ns` at `now_ms`; returns every failure.
pub fn evaluate_all(view: &impl StateView, ns: &str, conditions: &[Condition], now_ms: u64) -> Vec<ConditionFailure> {
    let mut failures = Vec::new();
    for (index, condition) in conditions.iter().enumerate() {
        let key = NsKey::new(ns, condition.key());
        let entry = view.entry(&key);
        if let Err(reason) = condition.evaluate(&key, entry, now_ms) {
            failures.push(failure(index, condition, entry, reason));
        }
    }
    failures
}

fn failure(index: usize, condition: &Condition, entry: Option<&Entry>, reason: String) -> ConditionFailure {
    let record = entry.and_then(|e| e.record.as_ref());
    ConditionFailure {
        index,
        condition: condition.clone(),
        actual: record.map_or(Value::Null, |r| r.value.clone()),
        actual_version: record.map_or(0, |r| r.version),
        reason,
        changed_at_revision: entry.map(|e| e.changed_at),
        changed_by: entry.and_then(|e| e.changed_by.clone()),
    }
}

/// Orders two JSON numbers exactly when both are integers, as `f64` otherwise.
pub fn compare_numbers(a: &Number, b: &Number) -> Ordering {
    if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
        return a.cmp(&b);
    }
    if let (Some(a), Some(b)) = (a.as_u64(), b.as_u64()) {
        return a.cmp(&b);
    }
    let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
    a.partial_cmp(&b).unwrap_or(Ordering::Equal)
}

/// The JSON type of a value, for messages.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(value: Value) -> Entry {
        Entry {
            record: Some(crate::Record { value, version: 3, create_revision: 1, mod_revision: 5 }),
            changed_by: None,
            changed_at: 5,
        }
    }

    #[test]
    fn compare_is_numeric_and_refuses_non_numbers() {
        let ge = |n: i64| Condition::Compare { key: "k".into(), op: CompareOp::Ge, value: n.into() };
        let k = NsKey::new("n", "k");
        assert!(ge(1).evaluate(&k, Some(&entry(json!(1))), 0).is_ok());
        assert!(ge(2).evaluate(&k, Some(&entry(json!(1))), 0).is_err());
        assert!(ge(1).evaluate(&k, Some(&entry(json!(1.5))), 0).is_ok());
        let err = ge(1).evaluate(&k, Some(&entry(json!("7"))), 0).unwrap_err();
        assert!(err.contains("not a number (string)"), "{err}");
        assert_eq!(ge(1).evaluate(&k, None, 0).unwrap_err(), "key is absent");
    }

    #[test]
    fn version_zero_means_absent() {
        let v0 = Condition::Version { key: "k".into(), is: 0 };
        let k = NsKey::new("n", "k");
        assert!(v0.evaluate(&k, None, 0).is_ok());
        assert!(v0.evaluate(&k, Some(&entry(json!(1))), 0).is_err());
        let tombstone = Entry { record: None, changed_by: None, changed_at: 9 };
        assert!(v0.evaluate(&k, Some(&tombstone), 0).is_ok());
    }

    #[test]
    fn large_integers_compare_exactly() {
        let big = Number::from(i64::MAX);
        let smaller = Number::from(i64::MAX - 1);
        assert_eq!(compare_numbers(&big, &smaller), Ordering::Greater);
        assert_eq!(compare_numbers(&Number::from(u64::MAX), &Number::from(u64::MAX - 1)), Ordering::Greater);
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;
    use crate::Record;

    #[test]
    fn a_lease_condition_holds_only_for_the_live_token() {
        let lease = Lease { holder: Some("w1".into()), token: 7, expires_at_ms: 100, ttl_ms: 50 };
        let entry = Entry {
            record: Some(Record { value: primitives::encode(&lease), version: 7, create_revision: 1, mod_revision: 9 }),
            changed_by: None,
            changed_at: 9,
        };
        let key = NsKey::new("n", primitives::lease_key("m"));
        let cond = |token| Condition::Lease { name: "m".into(), token };
        assert!(cond(7).evaluate(&key, Some(&entry), 99).is_ok());
        assert!(cond(6).evaluate(&key, Some(&entry), 99).unwrap_err().contains("stale"));
        assert!(cond(7).evaluate(&key, Some(&entry), 100).unwrap_err().contains("not held"));
        assert!(cond(1).evaluate(&key, None, 0).unwrap_err().contains("never"));
    }
}
