//! gapguard's functional core: the state machine of the guard, pure and deterministic.
//!
//! Everything here is a function of its inputs. There is no I/O, no clock and no randomness:
//! the current time, the revision a write would get, ticket ids and signing keys are all
//! passed in by the caller (the engine). That is what lets the same code run against the
//! embedded store, a database, or a seeded simulation, and replay a failure exactly.
//!
//! The entry points are [`apply`] (a write request against a [`StateView`]) and [`check`]
//! (a read-only evaluation that yields [`TicketClaims`] for a ticket).

pub mod apply;
pub mod audit;
pub mod condition;
pub mod idempotency;
pub mod limits;
pub mod op;
pub mod primitives;
pub mod state;
pub mod ticket;

pub use apply::{
    apply, check, describe_failures, Act, Applied, CheckOutcome, CheckRequest, Meta, Outcome, Refusal, Txn,
    WriteRequest,
};
pub use audit::{AuditEvent, AuditKind, ChainError, CheckRef, SealedEvent};
pub use condition::{CompareOp, Condition, ConditionFailure};
pub use idempotency::{IdempotencyDecision, IdempotencyRecord};
pub use limits::Limits;
pub use op::{Op, OpError, OpResult};
pub use state::{Entry, NsKey, Record, Revision, StateView};
pub use ticket::{TicketClaims, TicketError, TicketId, VerifiedTicket};
