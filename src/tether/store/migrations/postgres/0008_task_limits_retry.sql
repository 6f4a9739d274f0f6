-- Timeouts and retry policy of a task (tether.core.timeouts). 0 means "none"
-- for a limit, and "the control plane's default" for a retry field (rows from
-- before this migration; new tasks are stored with every field resolved).
ALTER TABLE tasks ADD COLUMN attempt_timeout_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN deadline_unix_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN schedule_to_start_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_initial_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_coefficient DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_max_interval_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_failures INTEGER NOT NULL DEFAULT 0;  -- 0 or 1
ALTER TABLE tasks ADD COLUMN non_retryable TEXT NOT NULL DEFAULT '';  -- newline-separated types
ALTER TABLE tasks ADD COLUMN attempt_started_unix_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN end_reason INTEGER NOT NULL DEFAULT 0;  -- tether.core.timeouts.EndReason

-- Sweeper: tasks with a deadline, by deadline (most tasks have none).
CREATE INDEX tasks_deadline ON tasks (deadline_unix_ms) WHERE deadline_unix_ms > 0;

-- Sweeper: queued tasks with a schedule-to-start timeout, by when they became ready.
CREATE INDEX tasks_schedule_to_start ON tasks (state, not_before_unix_ms) WHERE schedule_to_start_ms > 0;
-- Sweeper: leased tasks with an attempt timeout, by when the attempt began.
CREATE INDEX tasks_attempt_timeout ON tasks (state, attempt_started_unix_ms) WHERE attempt_timeout_ms > 0;
