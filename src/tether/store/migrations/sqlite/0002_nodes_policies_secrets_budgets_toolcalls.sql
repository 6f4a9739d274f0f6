-- Enrolled nodes. Only the SHA-256 of a node token is stored, never the token.
CREATE TABLE nodes (
    node_id            TEXT    PRIMARY KEY,
    public_key         BLOB    NOT NULL,  -- raw 32-byte Ed25519
    certificate        BLOB    NOT NULL,  -- DSSE JSON bytes of the NodeCertificate
    token_sha256       TEXT    NOT NULL,
    registered_unix_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX nodes_token ON nodes (token_sha256);

-- Policy documents; the highest version is in force.
CREATE TABLE policies (
    version         INTEGER PRIMARY KEY,
    document        TEXT    NOT NULL,
    digest          TEXT    NOT NULL,
    created_unix_ms INTEGER NOT NULL
);

-- Sealed secrets (tether.crypto.sealing); the store keeps opaque bytes only.
CREATE TABLE secrets (
    name            TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    kek_id          TEXT    NOT NULL DEFAULT '',
    wrapped_dek     BLOB    NOT NULL DEFAULT x'',
    nonce           BLOB    NOT NULL DEFAULT x'',
    ciphertext      BLOB    NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

-- Budget reservations; amount is reserved until settled with the actual cost.
CREATE TABLE budget_reservations (
    task_id         TEXT    NOT NULL,
    reservation_id  TEXT    NOT NULL,
    amount_micros   INTEGER NOT NULL,
    actual_micros   INTEGER NOT NULL DEFAULT 0,
    settled         INTEGER NOT NULL DEFAULT 0,
    fencing_token   INTEGER NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (task_id, reservation_id)
);

-- Idempotency records of tool calls: (task, key) -> outcome.
CREATE TABLE tool_calls (
    task_id          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    tool             TEXT    NOT NULL,
    arguments_sha256 TEXT    NOT NULL,
    phase            INTEGER NOT NULL,  -- 1 started, 2 completed (ToolCallPhase)
    result           BLOB    NOT NULL DEFAULT x'',
    status           TEXT    NOT NULL DEFAULT '',
    fencing_token    INTEGER NOT NULL,
    cost_micros      INTEGER NOT NULL DEFAULT 0,
    updated_unix_ms  INTEGER NOT NULL,
    PRIMARY KEY (task_id, idempotency_key)
);
