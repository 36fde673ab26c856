-- The owner of a user resource (its document's `ownerId`: who created it) as a column,
-- so that lists show a researcher only their own user resources in SQL, page by page.
-- NULL for the other resource types.

ALTER TABLE resources ADD COLUMN owner_id TEXT;

UPDATE resources SET owner_id = NULLIF(json_extract(doc, '$.ownerId'), '')
WHERE resource_type = 'user-resource';

CREATE INDEX resources_workspace_owner ON resources (workspace_id, owner_id);
