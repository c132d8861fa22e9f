//! Ops: the writes an act or a txn applies, all or nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::condition::json_kind;
use crate::state::{Entry, Record, Revision};

/// One write inside a request. Keys are namespace-relative.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Sets the key to a value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Value,
    },
    /// Deletes the key; a no-op (`deleted: false`) if it is absent.
    Delete {
        /// The key.
        key: String,
    },
    /// Adds `by` to the key's number; an absent key counts as 0.
    Add {
        /// The key.
        key: String,
        /// The amount (negative to subtract).
        by: Number,
    },
}

impl Op {
    /// The namespace-relative key the op writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Add { key, .. } => key,
        }
    }
}

/// What one op did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// A put: the key's new version.
    Put {
        /// The key.
        key: String,
        /// Its version after the put.
        version: u64,
    },
    /// A delete: whether there was something to delete.
    Delete {
        /// The key.
        key: String,
        /// `false` if the key was already absent.
        deleted: bool,
    },
    /// An add: the key's new value.
    Add {
        /// The key.
        key: String,
        /// The value after the add.
        value: Number,
        /// Its version after the add.
        version: u64,
    },
}

/// Why an op could not be applied; the whole request is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OpError {
    /// `add` on a value that is not a number.
    #[error("cannot add to key {key:?}: its value is not a number ({found})")]
    NotANumber {
        /// The key.
        key: String,
        /// The JSON type found.
        found: String,
    },
    /// `add` would leave the range of a 64-bit integer or of finite floats.
    #[error("adding to key {key:?} overflows")]
    Overflow {
        /// The key.
        key: String,
    },
}

impl OpError {
    /// The stable error code of the API.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::NotANumber { .. } => "not_a_number",
            OpError::Overflow { .. } => "overflow",
        }
    }
}

/// Applies `op` to the current entry of its key at `revision`. Returns the key's new entry
/// (`None` when nothing changes) and the op's result.
pub(crate) fn apply_op(
    op: &Op,
    current: Option<&Entry>,
    revision: Revision,
    correlation_id: Option<&str>,
) -> Result<(Option<Entry>, OpResult), OpError> {
    let live = current.and_then(|e| e.record.as_ref());
    let written = |value: Value| {
        let record = match live {
            Some(r) => {
                Record { value, version: r.version + 1, create_revision: r.create_revision, mod_revision: revision }
            }
            None => Record { value, version: 1, create_revision: revision, mod_revision: revision },
        };
        Entry { record: Some(record), changed_by: correlation_id.map(str::to_owned), changed_at: revision }
    };
    match op {
        Op::Put { key, value } => {
            let entry = written(value.clone());
            let version = entry.record.as_ref().map_or(0, |r| r.version);
            Ok((Some(entry), OpResult::Put { key: key.clone(), version }))
        }
        Op::Delete { key } => {
            if live.is_none() {
                return Ok((None, OpResult::Delete { key: key.clone(), deleted: false }));
            }
            let tombstone = Entry { record: None, changed_by: correlation_id.map(str::to_owned), changed_at: revision };
            Ok((Some(tombstone), OpResult::Delete { key: key.clone(), deleted: true }))
        }
        Op::Add { key, by } => {
            let base = match live.map(|r| &r.value) {
                None => Number::from(0),
                Some(Value::Number(n)) => n.clone(),
                Some(other) => {
                    return Err(OpError::NotANumber { key: key.clone(), found: json_kind(other).to_owned() });
                }
            };
            let sum = add_numbers(&base, by).ok_or_else(|| OpError::Overflow { key: key.clone() })?;
            let entry = written(Value::Number(sum.clone()));
            let version = entry.record.as_ref().map_or(0, |r| r.version);
            Ok((Some(entry), OpResult::Add { key: key.clone(), value: sum, version }))
        }
    }
}

/// Adds two JSON numbers: exactly for integers (checked), as finite `f64` otherwise.
pub fn add_numbers(a: &Number, b: &Number) -> Option<Number> {
    let int = |n: &Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    if let (Some(a), Some(b)) = (int(a), int(b)) {
        let sum = a + b; // cannot overflow: both fit in 65 bits
        return i64::try_from(sum).map(Number::from).or_else(|_| u64::try_from(sum).map(Number::from)).ok();
    }
    Number::from_f64(a.as_f64()? + b.as_f64()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_is_exact_for_integers_and_checked() {
        assert_eq!(add_numbers(&5.into(), &(-1).into()), Some(4.into()));
        assert_eq!(add_numbers(&i64::MAX.into(), &1.into()), Some(Number::from(i64::MAX as u64 + 1)));
        assert_eq!(add_numbers(&u64::MAX.into(), &1.into()), None);
        assert_eq!(add_numbers(&i64::MIN.into(), &(-1).into()), None);
        let half = Number::from_f64(0.5).unwrap();
        assert_eq!(add_numbers(&1.into(), &half), Number::from_f64(1.5));
        assert_eq!(add_numbers(&Number::from_f64(f64::MAX).unwrap(), &Number::from_f64(f64::MAX).unwrap()), None);
    }

    #[test]
    fn add_to_a_string_is_refused_with_its_type() {
        let entry = Entry {
            record: Some(Record { value: "x".into(), version: 1, create_revision: 1, mod_revision: 1 }),
            changed_by: None,
            changed_at: 1,
        };
        let op = Op::Add { key: "k".into(), by: 1.into() };
        let err = apply_op(&op, Some(&entry), 2, None).unwrap_err();
        assert_eq!(err, OpError::NotANumber { key: "k".into(), found: "string".into() });
    }
}
