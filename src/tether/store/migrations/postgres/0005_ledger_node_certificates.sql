-- Every certificate a node was issued (mirrors sqlite/0005; re-registration
-- issues a new one), so an exported bundle can prove receipts signed under an
-- earlier registration.
CREATE TABLE ledger_node_certificates (
    cert_sha256      TEXT    PRIMARY KEY,  -- hex SHA-256 of the certificate envelope JSON
    node_id          TEXT    NOT NULL,
    recorded_unix_ms BIGINT  NOT NULL,
    certificate      BYTEA   NOT NULL      -- DSSE JSON envelope as issued
);
CREATE INDEX ledger_node_certificates_node ON ledger_node_certificates (node_id, recorded_unix_ms);
