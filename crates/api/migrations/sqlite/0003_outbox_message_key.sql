-- A random key per outbox row, part of its broker message id (`<id>-<message_key>`).
-- Row ids alone repeat across databases (a fresh or restored database numbers from
-- where it starts), and a broker that drops a repeated message id within a window
-- (JetStream, Service Bus duplicate detection) would drop the new message while
-- confirming the send. Rows written before this column existed keep their row id as
-- message id (NULL key), so a retry of one of them is still recognised as a duplicate.
ALTER TABLE outbox ADD COLUMN message_key TEXT;
