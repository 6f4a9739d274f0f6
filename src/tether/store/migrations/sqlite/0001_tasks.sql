-- Tasks and their lease history. States are tether.core.states.State values.
CREATE TABLE tasks (
    seq                   INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, page cursor
    task_id               TEXT    NOT NULL UNIQUE,
    queue                 TEXT    NOT NULL,
    state                 INTEGER NOT NULL,
    payload               BLOB    NOT NULL,
    attempt               INTEGER NOT NULL DEFAULT 0,
    max_attempts          INTEGER NOT NULL,
    fencing_token         INTEGER NOT NULL DEFAULT 0,
    node_id               TEXT    NOT NULL DEFAULT '',
    agent_id              TEXT    NOT NULL DEFAULT '',
    lease_id              TEXT    NOT NULL DEFAULT '',
    lease_expires_unix_ms INTEGER NOT NULL DEFAULT 0,
    lease_ttl_ms          INTEGER NOT NULL,
    result                BLOB    NOT NULL DEFAULT x'',
    error                 TEXT    NOT NULL DEFAULT '',
    created_unix_ms       INTEGER NOT NULL,
    updated_unix_ms       INTEGER NOT NULL,
    not_before_unix_ms    INTEGER NOT NULL,
    idempotency_key       TEXT    NOT NULL DEFAULT '',
    budget_limit_micros   INTEGER NOT NULL DEFAULT 0,
    budget_spent_micros   INTEGER NOT NULL DEFAULT 0
);

-- AcquireLease: the oldest ready task of a queue is the first index entry.
CREATE INDEX tasks_ready ON tasks (queue, state, not_before_unix_ms, created_unix_ms);
-- Sweeper: live leases ordered by expiry.
CREATE INDEX tasks_lease_expiry ON tasks (state, lease_expires_unix_ms);
-- SubmitTask idempotency.
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key <> '';

-- Every signed lease envelope (grants and renewals) with how the lease ended.
CREATE TABLE lease_history (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id         TEXT    NOT NULL,
    lease_id        TEXT    NOT NULL,
    fencing_token   INTEGER NOT NULL,
    kind            TEXT    NOT NULL,  -- 'grant' or 'renew'
    envelope        BLOB    NOT NULL,  -- DSSE JSON bytes exactly as signed
    outcome         TEXT    NOT NULL,  -- active, released, lapsed, finished, canceled
    created_unix_ms INTEGER NOT NULL
);
CREATE INDEX lease_history_task ON lease_history (task_id, fencing_token);
