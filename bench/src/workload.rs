//! The workloads and systems the bench knows, with their names, connection counts and labels.

use clap::ValueEnum;
use serde::Serialize;

/// The key every contended workload decrements (one hot key per system).
pub const STOCK_KEY: &str = "stock";

/// A workload: the same logical operation, expressed in each system's own terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Durable single-key writes, one key per connection.
    Puts,
    /// Read-only checks of `stock >= 1` (peers: a plain get, the closest analogue).
    Checks,
    /// Single-request conditional decrement of one hot key.
    Decrement,
    /// Check, then act on what was checked, on one hot key.
    CheckAct,
}

impl Workload {
    /// Every workload, in the order they run and print.
    pub const ALL: [Workload; 4] = [Workload::Puts, Workload::Checks, Workload::Decrement, Workload::CheckAct];

    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Puts => "puts",
            Workload::Checks => "checks",
            Workload::Decrement => "decrement",
            Workload::CheckAct => "check-act",
        }
    }

    /// A one-line title for the printed table.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Puts => "durable puts",
            Workload::Checks => "checks (peers: plain get, the closest analogue)",
            Workload::Decrement => "single-request conditional decrement, one hot key",
            Workload::CheckAct => "check -> act on one hot key",
        }
    }

    /// The connection counts this workload runs at.
    pub fn connections(self) -> &'static [usize] {
        match self {
            Workload::Puts => &[1, 16, 64],
            Workload::Checks | Workload::Decrement | Workload::CheckAct => &[16],
        }
    }

    /// Whether every connection fights over the one hot key (and stock is verified after).
    pub fn contended(self) -> bool {
        matches!(self, Workload::Decrement | Workload::CheckAct)
    }
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// gapguard's own server (embedded backend).
    Gapguard,
    /// etcd 3.x over gRPC.
    Etcd,
    /// Redis with `appendfsync always`.
    Redis,
}

impl System {
    /// The name used on the command line, in tables and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            System::Gapguard => "gapguard",
            System::Etcd => "etcd",
            System::Redis => "redis",
        }
    }

    /// What one operation of `workload` is on this system.
    pub fn operation(self, workload: Workload) -> &'static str {
        match (self, workload) {
            (System::Gapguard, Workload::Puts) => "PUT /v1/ns/bench/kv/k{conn}",
            (System::Etcd, Workload::Puts) => "Put k{conn}",
            (System::Redis, Workload::Puts) => "SET k{conn}, appendfsync always",
            (System::Gapguard, Workload::Checks) => "POST /check stock >= 1",
            (System::Etcd, Workload::Checks) => "Range stock (plain get, not a check)",
            (System::Redis, Workload::Checks) => "GET stock (plain get, not a check)",
            (System::Gapguard, Workload::Decrement) => "POST /act if stock >= 1: add -1",
            (System::Etcd, Workload::Decrement | Workload::CheckAct) => "Range, Txn(mod_revision ==) put n-1, retry",
            (System::Redis, Workload::Decrement) => "EVALSHA Lua conditional decrement",
            (System::Gapguard, Workload::CheckAct) => "check, act(ticket) add -1, retry",
            (System::Redis, Workload::CheckAct) => "WATCH GET MULTI SET EXEC, retry",
        }
    }
}
