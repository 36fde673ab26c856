-- Workers an operator paused, shared by every replica on this database: a paused
-- worker stays paused, across restarts too, until resumed. `paused` is 1 or 0;
-- `updated_by` is the operator's user id.
CREATE TABLE worker_controls (
    worker TEXT PRIMARY KEY,
    paused BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);
