-- Who submitted a task: "ROLE:NAME" of the operator's certificate (the same form
-- load shedding names callers by). A submitter may read or cancel only its own
-- tasks (tether.control.authz.may_access_task). Rows from before this migration
-- have '' (unknown): only an admin may cancel or read them.
ALTER TABLE tasks ADD COLUMN submitted_by TEXT NOT NULL DEFAULT '';
