-- The Merkle tree kept in the database, so a control plane starts in constant
-- memory: the frontier (roots of the perfect subtrees the tree splits into,
-- largest first, 32 bytes each) for tree_size leaves, updated by every append,
-- and the hash of each complete perfect subtree whose height is a multiple of 4
-- (proofs read O(log n) of these instead of every leaf hash). A ledger stored
-- before this migration has tree_size 0 here and is caught up at start.
CREATE TABLE ledger_frontier (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size BIGINT  NOT NULL,
    hashes    BYTEA   NOT NULL
);
INSERT INTO ledger_frontier VALUES (1, 0, ''::bytea);

CREATE TABLE ledger_subtrees (
    height INTEGER NOT NULL,
    idx    BIGINT  NOT NULL,
    hash   BYTEA   NOT NULL,
    PRIMARY KEY (height, idx)
);
