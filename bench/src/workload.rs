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
    /// Reserve one unit of one hot pool, then commit that reservation.
    Reserve,
}

impl Workload {
    /// Every workload, in the order they run and print.
    pub const ALL: [Workload; 5] =
        [Workload::Puts, Workload::Checks, Workload::Decrement, Workload::CheckAct, Workload::Reserve];

    /// The name used on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Puts => "puts",
            Workload::Checks => "checks",
            Workload::Decrement => "decrement",
            Workload::CheckAct => "check-act",
            Workload::Reserve => "reserve",
        }
    }

    /// A one-line title for the printed table.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Puts => "durable puts",
            Workload::Checks => "checks (peers: plain get, the closest analogue)",
            Workload::Decrement => "single-request conditional decrement, one hot key",
            Workload::CheckAct => "check -> act on one hot key",
            Workload::Reserve => {
                "reserve -> commit pairs on one hot pool (etcd: one CAS decrement = one pair; \
                 postgres, pgbench: one UPDATE .. n > 0 = one pair)"
            }
        }
    }

    /// Every connection count this workload runs at on some system, in order (each system
    /// runs a subset: [`System::connections`]).
    pub fn connections(self) -> &'static [usize] {
        match self {
            Workload::Puts => &[1, 16, 64],
            Workload::Checks | Workload::CheckAct => &[16],
            Workload::Decrement | Workload::Reserve => &[16, 64],
        }
    }

    /// Whether every connection fights over the one hot key or pool (and stock is verified
    /// after).
    pub fn contended(self) -> bool {
        matches!(self, Workload::Decrement | Workload::CheckAct | Workload::Reserve)
    }

    /// What one successful operation of a contended workload is, in the verification table.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::Reserve => "pairs",
            _ => "decrements",
        }
    }
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// gapguard's own server (embedded backend).
    Gapguard,
    /// etcd 3.x over gRPC.
    Etcd,
    /// Redis with `appendfsync always`.
    Redis,
    /// PostgreSQL 15 (`fsync=on`, `synchronous_commit=on`) driven by the bench's own
    /// `tokio-postgres` connections; runs the `reserve` workload only.
    Postgres,
    /// One gapguard node on the PostgreSQL backend (`serve --backend postgres://…`).
    GapguardPg1,
    /// Three gapguard nodes over one PostgreSQL database, connections spread round-robin.
    GapguardPg3,
    /// PostgreSQL 15 itself, driven by its own load generator `pgbench` (`-M prepared`):
    /// the raw database the PostgreSQL backend is measured against.
    Pgbench,
}

/// A value of `--systems`: a system, or `gapguard-pg` for both node counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum SystemArg {
    /// gapguard, embedded backend.
    Gapguard,
    /// etcd.
    Etcd,
    /// Redis.
    Redis,
    /// PostgreSQL through tokio-postgres (`reserve` only).
    Postgres,
    /// gapguard on PostgreSQL with 1 node and with 3 nodes.
    GapguardPg,
    /// gapguard on PostgreSQL, 1 node only.
    GapguardPg1,
    /// gapguard on PostgreSQL, 3 nodes only.
    GapguardPg3,
    /// PostgreSQL through pgbench.
    Pgbench,
}

impl SystemArg {
    /// The systems this value names.
    pub fn systems(self) -> &'static [System] {
        match self {
            SystemArg::Gapguard => &[System::Gapguard],
            SystemArg::Etcd => &[System::Etcd],
            SystemArg::Redis => &[System::Redis],
            SystemArg::Postgres => &[System::Postgres],
            SystemArg::GapguardPg => &[System::GapguardPg1, System::GapguardPg3],
            SystemArg::GapguardPg1 => &[System::GapguardPg1],
            SystemArg::GapguardPg3 => &[System::GapguardPg3],
            SystemArg::Pgbench => &[System::Pgbench],
        }
    }
}

impl System {
    /// The name used on the command line, in tables and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            System::Gapguard => "gapguard",
            System::Etcd => "etcd",
            System::Redis => "redis",
            System::Postgres => "postgres",
            System::GapguardPg1 => "gapguard-pg1",
            System::GapguardPg3 => "gapguard-pg3",
            System::Pgbench => "pgbench",
        }
    }

    /// Every system, in the order they start and print.
    pub const ALL: [System; 7] = [
        System::Gapguard,
        System::Etcd,
        System::Redis,
        System::Postgres,
        System::GapguardPg1,
        System::GapguardPg3,
        System::Pgbench,
    ];

    /// How many gapguard nodes serve, for gapguard on PostgreSQL.
    pub fn pg_nodes(self) -> Option<usize> {
        match self {
            System::GapguardPg1 => Some(1),
            System::GapguardPg3 => Some(3),
            _ => None,
        }
    }

    /// Whether this system runs on the PostgreSQL the bench starts.
    pub fn needs_postgres(self) -> bool {
        matches!(self, System::Postgres | System::GapguardPg1 | System::GapguardPg3 | System::Pgbench)
    }

    /// Whether the bench drives `workload` on this system.
    pub fn supports(self, workload: Workload) -> bool {
        match self {
            System::Gapguard | System::Etcd => true,
            System::Redis => workload != Workload::Reserve,
            System::Postgres => workload == Workload::Reserve,
            System::GapguardPg1 | System::GapguardPg3 | System::Pgbench => {
                matches!(workload, Workload::Puts | Workload::Decrement | Workload::Reserve)
            }
        }
    }

    /// The connection counts `workload` runs at on this system (a subset of
    /// [`Workload::connections`]): the hot-key decrement runs at 64 connections only on the
    /// PostgreSQL backend and pgbench.
    pub fn connections(self, workload: Workload) -> &'static [usize] {
        match (self, workload) {
            (System::GapguardPg1 | System::GapguardPg3 | System::Pgbench, Workload::Decrement) => &[16, 64],
            (_, Workload::Decrement) => &[16],
            _ => workload.connections(),
        }
    }

    /// Whether the stock-exhaustion verification runs on this system (pgbench cannot tell
    /// whether its `UPDATE` took a unit, so it has the timed accounting only).
    pub fn verifies_exhaustion(self) -> bool {
        self != System::Pgbench
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
            (System::Gapguard, Workload::Reserve) => "POST reserve 1, POST commit",
            (System::Etcd, Workload::Reserve) => "Range, Txn(mod_revision ==) put n-1, retry",
            (System::Postgres, Workload::Reserve) => "UPDATE pool SET n=n-1 WHERE id=1 AND n>0",
            (System::GapguardPg1 | System::GapguardPg3, Workload::Puts) => "PUT /v1/ns/bench/kv/k{conn}",
            (System::GapguardPg1 | System::GapguardPg3, Workload::Decrement) => "POST /act if stock >= 1: add -1",
            (System::GapguardPg1 | System::GapguardPg3, Workload::Reserve) => "POST reserve 1, POST commit",
            (System::Pgbench, Workload::Puts) => "INSERT kv ON CONFLICT DO UPDATE (upsert)",
            (System::Pgbench, Workload::Decrement | Workload::Reserve) => "UPDATE stock SET n=n-1 WHERE id=1 AND n>0",
            (System::Redis, Workload::Reserve)
            | (System::Postgres, _)
            | (System::GapguardPg1 | System::GapguardPg3 | System::Pgbench, _) => "(not run)",
        }
    }
}
