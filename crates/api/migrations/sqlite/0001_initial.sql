-- steward-api schema, SQLite dialect (keep in step with postgres/0001_initial.sql).
-- Each record is a JSON document (`doc`, TRE's camelCase model) plus the columns
-- queries filter on. Times are milliseconds since the epoch; `etag` changes on every
-- write and guards compare-and-swap updates.

CREATE TABLE resources (
    id TEXT PRIMARY KEY NOT NULL,
    resource_type TEXT NOT NULL,
    template_name TEXT NOT NULL,
    template_version TEXT NOT NULL,
    deployment_status TEXT,
    resource_path TEXT NOT NULL,
    workspace_id TEXT,
    parent_workspace_service_id TEXT,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX resources_type_status ON resources (resource_type, deployment_status);
CREATE INDEX resources_template_name ON resources (template_name);
CREATE INDEX resources_workspace ON resources (workspace_id);
CREATE INDEX resources_created ON resources (created_at, id);

CREATE TABLE operations (
    id TEXT PRIMARY KEY NOT NULL,
    resource_id TEXT NOT NULL,
    action TEXT NOT NULL,
    status TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX operations_resource ON operations (resource_id, created_at);

CREATE TABLE resource_history (
    id TEXT PRIMARY KEY NOT NULL,
    resource_id TEXT NOT NULL,
    resource_version BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX resource_history_resource ON resource_history (resource_id, resource_version);

CREATE TABLE airlock_requests (
    id TEXT PRIMARY KEY NOT NULL,
    workspace_id TEXT NOT NULL,
    request_type TEXT,
    status TEXT NOT NULL,
    etag TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX airlock_requests_workspace ON airlock_requests (workspace_id, created_at);
CREATE INDEX airlock_requests_created ON airlock_requests (created_at, id);

-- Transactional outbox: written in the same transaction as the state change, published
-- and deleted by the outbox worker. `id` is the broker message id (never reused:
-- AUTOINCREMENT). At most one row per `aggregate_id` is in flight, so messages of one
-- aggregate go out in `id` order. A worker claims a row by setting `lease_owner` and
-- `lease_until`; an expired lease may be claimed again.
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    body TEXT NOT NULL,
    session_id TEXT,
    correlation_id TEXT,
    content_type TEXT,
    subject TEXT,
    properties TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    available_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT,
    last_error TEXT
);
CREATE INDEX outbox_aggregate ON outbox (aggregate_id, id);
CREATE INDEX outbox_available ON outbox (available_at, id);
