//! What a scenario's check phase returns, and the judgements several scenarios share.

use serde::Serialize;
use serde_json::Value;

use crate::history::OpRecord;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The correlation id of the operation that broke it.
    pub correlation_id: String,
    /// What was wrong, for a person.
    pub what: String,
}

/// The verdict of a scenario's check phase on one run.
#[derive(Clone, Debug, Default)]
pub struct Judgement {
    /// Every violation found, in the order of the history (by revision where it has one).
    pub violations: Vec<Violation>,
    /// The final state read back from the server, as the scenario summarises it.
    pub final_state: Value,
    /// Observations that are not violations (compensations done, counters that disagree in
    /// a naive run…).
    pub notes: Vec<String>,
}

/// A committed write to a key, by revision.
#[derive(Clone, Debug)]
pub struct Write<'a> {
    /// Its revision.
    pub revision: u64,
    /// Who wrote it.
    pub correlation_id: &'a str,
}

/// The committed writes of `ops` whose kind is one of `kinds`, sorted by revision.
pub fn writes<'a>(ops: &'a [OpRecord], kinds: &[&str]) -> Vec<Write<'a>> {
    let mut writes: Vec<Write<'a>> = ops
        .iter()
        .filter(|op| kinds.contains(&op.kind))
        .filter_map(|op| Some(Write { revision: op.outcome.committed_revision()?, correlation_id: &op.correlation_id }))
        .collect();
    writes.sort_by_key(|w| w.revision);
    writes
}

/// The first write in `writes` (sorted) strictly between `checked_revision` and
/// `act_revision` by someone else than `by`: the change that superseded what an act was
/// based on.
pub fn superseded_between<'a>(
    writes: &'a [Write<'a>],
    checked_revision: u64,
    act_revision: u64,
    by: &str,
) -> Option<&'a Write<'a>> {
    let start = writes.partition_point(|w| w.revision <= checked_revision);
    writes[start..].iter().take_while(|w| w.revision < act_revision).find(|w| w.correlation_id != by)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_strictly_inside_the_window_by_another_supersedes() {
        let w = |revision, correlation_id| Write { revision, correlation_id };
        let writes = vec![w(3, "a"), w(5, "me"), w(7, "b"), w(9, "c")];
        assert!(superseded_between(&writes, 3, 7, "me").is_none(), "3 is what was checked, 5 is mine");
        assert_eq!(superseded_between(&writes, 3, 8, "me").unwrap().correlation_id, "b");
        assert_eq!(superseded_between(&writes, 2, 4, "me").unwrap().correlation_id, "a");
        assert!(superseded_between(&writes, 9, 12, "me").is_none());
    }
}
