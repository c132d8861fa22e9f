//! `gapguard watch`: the namespace's changes as they are committed, one JSON line each.

use clap::Args;
use gapguard_client::{ClientError, WatchMessage, WatchQuery, WATCH_TYPES};

use crate::failure::{self, Failure};
use crate::{Ctx, ReadArgs};

/// `gapguard watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Namespace.
    pub ns: String,
    /// Only changes of keys (or pool, lease, reservation, orphan names) starting with this.
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// Replay the changes from this revision (inclusive) before the live ones [default: only changes after now].
    #[arg(long, value_name = "R")]
    pub from_revision: Option<u64>,
    /// Only these kinds of change (comma-separated or repeated) [default: all].
    #[arg(long, value_name = "TYPES", value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(WATCH_TYPES))]
    pub types: Vec<String>,
    #[command(flatten)]
    pub request: ReadArgs,
}

/// Prints every change as one JSON line (whatever `--compact` says) until Ctrl-C (exit 0).
/// A watcher that fell behind (`lagged`) is resumed where it left off, with a note on stderr;
/// history that is gone (`compacted`) ends it with exit 4; the server closing the stream, or
/// the connection breaking, ends it with exit 1 and the revision to resume from.
pub async fn run(ctx: &Ctx, args: &WatchArgs) -> anyhow::Result<()> {
    tokio::select! {
        result = follow(ctx, args) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

async fn follow(ctx: &Ctx, args: &WatchArgs) -> anyhow::Result<()> {
    let mut query =
        WatchQuery { prefix: args.prefix.clone(), from_revision: args.from_revision, types: args.types.clone() };
    loop {
        let mut watch = ctx.client.watch(&args.ns, &query).await?;
        loop {
            match watch.next().await {
                Some(Ok(WatchMessage::Change(change))) => {
                    ctx.out.line(&serde_json::to_string(&change)?)?;
                    if let Some(complete) = watch.last_revision() {
                        query.from_revision = Some(complete + 1);
                    }
                }
                Some(Ok(WatchMessage::Lagged { resume_from_revision })) => {
                    eprintln!(
                        "note: the server cut this watch off for falling behind; resuming from revision \
                         {resume_from_revision}"
                    );
                    query.from_revision = Some(resume_from_revision);
                    break;
                }
                Some(Ok(WatchMessage::Compacted { first_available_revision })) => {
                    return Err(compacted(first_available_revision).into());
                }
                Some(Err(ClientError::Transport { reason, .. })) => {
                    return Err(broken(query.from_revision, Some(&reason)).into());
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(broken(query.from_revision, None).into()),
            }
        }
    }
}

/// The failure of a watch whose history is gone.
fn compacted(first_available_revision: u64) -> Failure {
    Failure {
        code: failure::REFUSED,
        message: format!(
            "compacted: the changes before revision {first_available_revision} are no longer kept; \
             watch again with --from-revision {first_available_revision} (after reading the current \
             state), or without --from-revision for the changes from now on"
        ),
    }
}

/// The failure of a watch the server closed (`reason` None) or whose connection broke;
/// `resume_from` is the revision after the last one printed whole (or the one asked for, if
/// none was).
fn broken(resume_from: Option<u64>, reason: Option<&str>) -> Failure {
    let what = match reason {
        None => "the server closed the watch".to_owned(),
        Some(reason) => format!("the watch broke off: {reason}"),
    };
    let resume = match resume_from {
        Some(revision) => format!("; to go on, watch again with --from-revision {revision}"),
        None => String::new(),
    };
    Failure { code: failure::UNEXPECTED, message: format!("{what}{resume}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compacted_watch_is_refused_and_says_where_history_starts() {
        let failure = compacted(40);
        assert_eq!(failure.code, failure::REFUSED);
        assert!(failure.message.starts_with("compacted: "), "{}", failure.message);
        assert!(failure.message.contains("--from-revision 40"), "{}", failure.message);
    }

    #[test]
    fn a_closed_or_broken_watch_says_where_to_resume() {
        let closed = broken(Some(8), None);
        assert_eq!(closed.message, "the server closed the watch; to go on, watch again with --from-revision 8");
        assert_eq!(closed.code, failure::UNEXPECTED);
        assert_eq!(broken(None, None).message, "the server closed the watch");
        assert_eq!(
            broken(Some(3), Some("connection reset")).message,
            "the watch broke off: connection reset; to go on, watch again with --from-revision 3"
        );
    }
}
