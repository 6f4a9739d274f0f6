-- Enrolled nodes. Only the SHA-256 of a node token is stored, never the token.
CREATE TABLE nodes (
    node_id            TEXT    PRIMARY KEY,
    public_key         BYTEA   NOT NULL,  -- raw 32-byte Ed25519
    certificate        BYTEA   NOT NULL,  -- DSSE JSON bytes of the NodeCertificate
    token_sha256       TEXT    NOT NULL,
    registered_unix_ms BIGINT  NOT NULL
);
CREATE UNIQUE INDEX nodes_token ON nodes (token_sha256);

-- Policy documents; the highest version is in force.
CREATE TABLE policies (
    version         INTEGER PRIMARY KEY,
    document        TEXT    NOT NULL,
    digest          TEXT    NOT NULL,
    created_unix_ms BIGINT  NOT NULL
);

-- Sealed secrets (tether.crypto.sealing); the store keeps opaque bytes only.
CREATE TABLE secrets (
    name            TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    kek_id          TEXT    NOT NULL DEFAULT '',
    wrapped_dek     BYTEA   NOT NULL DEFAULT '\x'::bytea,
    nonce           BYTEA   NOT NULL DEFAULT '\x'::bytea,
    ciphertext      BYTEA   NOT NULL,
    created_unix_ms BIGINT  NOT NULL,
    PRIMARY KEY (name, version)
);

-- Budget reservations; amount is reserved until settled with the actual cost.
CREATE TABLE budget_reservations (
    task_id         TEXT    NOT NULL,
    reservation_id  TEXT    NOT NULL,
    amount_micros   BIGINT  NOT NULL,
    actual_micros   BIGINT  NOT NULL DEFAULT 0,
    settled         INTEGER NOT NULL DEFAULT 0,
    fencing_token   BIGINT  NOT NULL,
    created_unix_ms BIGINT  NOT NULL,
    PRIMARY KEY (task_id, reservation_id)
);

-- Idempotency records of tool calls: (task, key) -> outcome.
CREATE TABLE tool_calls (
    task_id          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    tool             TEXT    NOT NULL,
    arguments_sha256 TEXT    NOT NULL,
    phase            INTEGER NOT NULL,  -- 1 started, 2 completed (ToolCallPhase)
    result           BYTEA   NOT NULL DEFAULT '\x'::bytea,
    status           TEXT    NOT NULL DEFAULT '',
    fencing_token    BIGINT  NOT NULL,
    cost_micros      BIGINT  NOT NULL DEFAULT 0,
    updated_unix_ms  BIGINT  NOT NULL,
    PRIMARY KEY (task_id, idempotency_key)
);
