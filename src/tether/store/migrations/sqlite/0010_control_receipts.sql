-- Control receipts: how a lease or task ended without its holder (lapse, time
-- limit, release, cancel), signed by the control plane's key and written in the same
-- transaction as the state change. Exported with the task's leases.
CREATE TABLE control_receipts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id         TEXT    NOT NULL,
    fencing_token   INTEGER NOT NULL,
    end_reason      INTEGER NOT NULL,  -- EndReason
    envelope        BLOB    NOT NULL,  -- DSSE JSON bytes exactly as signed
    created_unix_ms INTEGER NOT NULL
);
CREATE INDEX control_receipts_task ON control_receipts (task_id, id);

-- The node whose lease wrote (or took over) an idempotency record: a holder
-- that lost its lease may still complete its own STARTED record.
ALTER TABLE tool_calls ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
