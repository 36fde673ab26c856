-- Which operation last wrote a resource's `deployment_status`: the creation time (ms)
-- of that operation. A status update of an older operation does not overwrite the
-- status a newer one wrote (a late `deployed` cannot bring a deleted resource back).
-- NULL: no operation wrote it yet.

ALTER TABLE resources ADD COLUMN status_operation_created_at BIGINT;
