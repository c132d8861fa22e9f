//! Conditions: predicates evaluated atomically against the current state.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

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
    /// The namespace-relative key the condition reads.
    pub fn key(&self) -> &str {
        match self {
            Condition::Exists(key) | Condition::Absent(key) => key,
            Condition::Equals { key, .. } | Condition::Version { key, .. } | Condition::Compare { key, .. } => key,
        }
    }

    /// Evaluates the condition against the entry of its key. `Ok(())` if it holds, else the
    /// reason it does not.
    pub fn evaluate(&self, entry: Option<&Entry>) -> Result<(), String> {
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
        }
    }
}

/// Evaluates `conditions` (namespace-relative) in namespace `ns`; returns every failure.
pub fn evaluate_all(view: &impl StateView, ns: &str, conditions: &[Condition]) -> Vec<ConditionFailure> {
    let mut failures = Vec::new();
    for (index, condition) in conditions.iter().enumerate() {
        let key = NsKey::new(ns, condition.key());
        let entry = view.entry(&key);
        if let Err(reason) = condition.evaluate(entry) {
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
        assert!(ge(1).evaluate(Some(&entry(json!(1)))).is_ok());
        assert!(ge(2).evaluate(Some(&entry(json!(1)))).is_err());
        assert!(ge(1).evaluate(Some(&entry(json!(1.5)))).is_ok());
        let err = ge(1).evaluate(Some(&entry(json!("7")))).unwrap_err();
        assert!(err.contains("not a number (string)"), "{err}");
        assert_eq!(ge(1).evaluate(None).unwrap_err(), "key is absent");
    }

    #[test]
    fn version_zero_means_absent() {
        let v0 = Condition::Version { key: "k".into(), is: 0 };
        assert!(v0.evaluate(None).is_ok());
        assert!(v0.evaluate(Some(&entry(json!(1)))).is_err());
        let tombstone = Entry { record: None, changed_by: None, changed_at: 9 };
        assert!(v0.evaluate(Some(&tombstone)).is_ok());
    }

    #[test]
    fn large_integers_compare_exactly() {
        let big = Number::from(i64::MAX);
        let smaller = Number::from(i64::MAX - 1);
        assert_eq!(compare_numbers(&big, &smaller), Ordering::Greater);
        assert_eq!(compare_numbers(&Number::from(u64::MAX), &Number::from(u64::MAX - 1)), Ordering::Greater);
    }
}
