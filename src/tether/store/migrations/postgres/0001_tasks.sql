-- Tasks and their lease history (mirrors sqlite/0001). States are
-- tether.core.states.State values.
CREATE TABLE tasks (
    seq                   BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- creation order, page cursor
    task_id               TEXT    NOT NULL UNIQUE,
    queue                 TEXT    NOT NULL,
    state                 INTEGER NOT NULL,
    payload               BYTEA   NOT NULL,
    attempt               INTEGER NOT NULL DEFAULT 0,
    max_attempts          INTEGER NOT NULL,
    fencing_token         BIGINT  NOT NULL DEFAULT 0,
    node_id               TEXT    NOT NULL DEFAULT '',
    agent_id              TEXT    NOT NULL DEFAULT '',
    lease_id              TEXT    NOT NULL DEFAULT '',
    lease_expires_unix_ms BIGINT  NOT NULL DEFAULT 0,
    lease_ttl_ms          BIGINT  NOT NULL,
    result                BYTEA   NOT NULL DEFAULT '\x'::bytea,
    error                 TEXT    NOT NULL DEFAULT '',
    created_unix_ms       BIGINT  NOT NULL,
    updated_unix_ms       BIGINT  NOT NULL,
    not_before_unix_ms    BIGINT  NOT NULL,
    idempotency_key       TEXT    NOT NULL DEFAULT '',
    budget_limit_micros   BIGINT  NOT NULL DEFAULT 0,
    budget_spent_micros   BIGINT  NOT NULL DEFAULT 0
);

-- AcquireLease: the oldest ready task of a queue is the first index entry
-- (seq breaks ties so replicas agree on "oldest").
CREATE INDEX tasks_ready ON tasks (queue, state, not_before_unix_ms, created_unix_ms, seq);
-- Sweeper: live leases ordered by expiry.
CREATE INDEX tasks_lease_expiry ON tasks (state, lease_expires_unix_ms);
-- SubmitTask idempotency.
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key) WHERE idempotency_key <> '';

-- Every signed lease envelope (grants and renewals) with how the lease ended.
CREATE TABLE lease_history (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         TEXT    NOT NULL,
    lease_id        TEXT    NOT NULL,
    fencing_token   BIGINT  NOT NULL,
    kind            TEXT    NOT NULL,  -- 'grant' or 'renew'
    envelope        BYTEA   NOT NULL,  -- DSSE JSON bytes exactly as signed
    outcome         TEXT    NOT NULL,  -- active, released, lapsed, finished, canceled
    created_unix_ms BIGINT  NOT NULL
);
CREATE INDEX lease_history_task ON lease_history (task_id, fencing_token);
