-- Budgets and credentials (mirrors sqlite/0004; 0003 is the ledger's number).
-- The node that made a reservation: SettleBudget is allowed after the lease
-- ended, but only by that node.
ALTER TABLE budget_reservations ADD COLUMN node_id TEXT NOT NULL DEFAULT '';

-- IssueCredential and ReserveBudget resolve the policy a lease was granted
-- under by the digest it carries.
CREATE INDEX policies_digest ON policies (digest);
