-- One leader per singleton job (sweeper, checkpoint signer), elected through the
-- database: a row per job, held by one replica until expires_unix_ms on the
-- DATABASE's clock; the holder renews it, anyone may take it once it lapsed.
-- epoch grows with each new term (a fencing token for the job).
CREATE TABLE leaders (
    job             TEXT   PRIMARY KEY,
    holder          TEXT   NOT NULL,
    epoch           INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL
);
