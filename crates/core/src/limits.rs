//! Limits on everything a request can carry, with the defaults of DESIGN §5.

/// Limits on requests. Every field is checked at the edge (decoding) with a test at the limit
/// and one past it; core assumes requests within them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted (413 past it).
    pub max_body_bytes: usize,
    /// Longest key, in bytes of UTF-8.
    pub max_key_bytes: usize,
    /// Longest namespace name, in bytes.
    pub max_namespace_bytes: usize,
    /// Largest value, in bytes of its compact JSON encoding.
    pub max_value_bytes: usize,
    /// Most conditions in one check, act or txn.
    pub max_conditions: usize,
    /// Most ops in one act, or in one branch of a txn.
    pub max_ops: usize,
    /// Shortest ticket TTL.
    pub ticket_ttl_ms_min: u64,
    /// Longest ticket TTL: bounds the check-to-use window.
    pub ticket_ttl_ms_max: u64,
    /// TTL of a ticket whose check named none.
    pub ticket_ttl_ms_default: u64,
    /// Longest `Idempotency-Key` header.
    pub max_idempotency_key_bytes: usize,
    /// How long an idempotency record is kept.
    pub idempotency_retention_ms: u64,
    /// Longest correlation id (`X-Correlation-Id`).
    pub max_correlation_id_bytes: usize,
    /// Most items one list or audit query returns.
    pub max_list_limit: usize,
    /// Longest flow name.
    pub max_flow_bytes: usize,
    /// Shortest reservation or lease TTL.
    pub hold_ttl_ms_min: u64,
    /// Longest reservation or lease TTL.
    pub hold_ttl_ms_max: u64,
    /// Longest name of a pool, lease, holder, or grant subject, action or resource.
    pub max_name_bytes: usize,
    /// How long resolved reservations and orphans are kept (then forgotten: a late commit of
    /// such a reservation answers `reservation_not_found`).
    pub resolved_retention_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_key_bytes: 512,
            max_namespace_bytes: 128,
            max_value_bytes: 256 * 1024,
            max_conditions: 128,
            max_ops: 128,
            ticket_ttl_ms_min: 1,
            ticket_ttl_ms_max: 3_600_000,
            ticket_ttl_ms_default: 30_000,
            max_idempotency_key_bytes: 255,
            idempotency_retention_ms: 24 * 3_600_000,
            max_correlation_id_bytes: 128,
            max_list_limit: 10_000,
            max_flow_bytes: 64,
            hold_ttl_ms_min: 1,
            hold_ttl_ms_max: 24 * 3_600_000,
            max_name_bytes: 512,
            resolved_retention_ms: 24 * 3_600_000,
        }
    }
}
