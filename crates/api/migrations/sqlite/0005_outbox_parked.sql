-- Parked outbox messages: rows that could not be sent (a non-retryable send error, or
-- too many failures while other sends to the transport succeeded), moved out of the
-- outbox so the later messages of their aggregate go on. `id` and `message_key` are
-- the outbox row's (its message id is theirs); `attempts` counts every failed send,
-- `error` is the last one.
CREATE TABLE outbox_parked (
    id INTEGER PRIMARY KEY,
    message_key TEXT,
    queue TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    body TEXT NOT NULL,
    session_id TEXT,
    correlation_id TEXT,
    content_type TEXT,
    subject TEXT,
    properties TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    parked_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    error TEXT NOT NULL
);
CREATE INDEX outbox_parked_parked_at ON outbox_parked (parked_at);
