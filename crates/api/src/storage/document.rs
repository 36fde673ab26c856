//! What the tables of JSON documents share (resources, operations, airlock requests):
//! each row is `id`, `etag` and `doc` beside the columns queries filter on, and each
//! write stamps a fresh etag.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::Tx;
use super::error::{Entity, StoreError};
use crate::domain::{AirlockRequest, Operation, Resource, new_id};
use crate::storage::millis;

/// A record kept as a JSON document with its etag.
pub(super) trait Document: Serialize + DeserializeOwned + Clone {
    /// What errors call it.
    const ENTITY: Entity;
    /// Its table.
    const TABLE: &'static str;
    /// Its id.
    fn id(&self) -> &str;
    /// Its etag, which the document does not hold: the row's.
    fn etag(&self) -> &str;
    /// Its etag, to set.
    fn etag_mut(&mut self) -> &mut String;
}

/// Implements [`Document`] for a record type with `id` and `etag` fields.
macro_rules! document {
    ($record:ty, $entity:expr, $table:literal) => {
        impl Document for $record {
            const ENTITY: Entity = $entity;
            const TABLE: &'static str = $table;
            fn id(&self) -> &str {
                &self.id
            }
            fn etag(&self) -> &str {
                &self.etag
            }
            fn etag_mut(&mut self) -> &mut String {
                &mut self.etag
            }
        }
    };
}

document!(Resource, Entity::Resource, "resources");
document!(Operation, Entity::Operation, "operations");
document!(AirlockRequest, Entity::AirlockRequest, "airlock_requests");

/// The record of a row selected with `id, etag, doc`.
pub(super) fn from_row<T: Document>(row: &AnyRow) -> Result<T, StoreError> {
    let id: String = row.try_get("id")?;
    let etag: String = row.try_get("etag")?;
    let doc: String = row.try_get("doc")?;
    let mut record: T =
        serde_json::from_str(&doc).map_err(|error| StoreError::corrupt(T::ENTITY, &id, error))?;
    *record.etag_mut() = etag;
    Ok(record)
}

/// `record` with a fresh etag, and its document, for an insert or a replace.
pub(super) fn with_new_etag<T: Document>(record: &T) -> Result<(T, String), StoreError> {
    let mut stored = record.clone();
    *stored.etag_mut() = new_id();
    let doc = serde_json::to_string(&stored)
        .map_err(|error| StoreError::corrupt(T::ENTITY, stored.id(), error))?;
    Ok((stored, doc))
}

/// The records `read` makes of the rows `sql` selects with its one parameter, `value`.
pub(super) async fn fetch_all<'c, T, E: Executor<'c, Database = Any>>(
    executor: E,
    sql: &str,
    value: &str,
    read: impl Fn(&AnyRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let rows = sqlx::query(sql).bind(value.to_owned()).fetch_all(executor).await?;
    rows.iter().map(read).collect()
}

/// The record with this id, if there is one.
pub(super) async fn fetch<'c, T: Document, E: Executor<'c, Database = Any>>(
    executor: E,
    id: &str,
) -> Result<Option<T>, StoreError> {
    let row = sqlx::query(&format!("SELECT id, etag, doc FROM {} WHERE id = $1", T::TABLE))
        .bind(id.to_owned())
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(from_row).transpose()
}

/// A list of records: equality conditions on columns, then one page in creation order.
#[derive(Debug)]
pub(super) struct Listing {
    sql: String,
    binds: Vec<String>,
}

impl Listing {
    /// Every record of `T`'s table.
    pub(super) fn of<T: Document>() -> Self {
        Self {
            sql: format!("SELECT id, etag, doc, created_at FROM {} WHERE 1 = 1", T::TABLE),
            binds: Vec::new(),
        }
    }

    /// Only the records whose `column` is `value`, when there is a value.
    pub(super) fn equal(&mut self, column: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.binds.push(value.to_owned());
            self.sql.push_str(&format!(" AND {column} = ${}", self.binds.len()));
        }
    }

    /// When there are `values`: only the records meeting `always` (SQL without
    /// parameters) or with one of `values` in any of `columns`.
    pub(super) fn any_of(&mut self, always: &str, columns: &[&str], values: Option<&[String]>) {
        let Some(values) = values else { return };
        self.sql.push_str(&format!(" AND ({always}"));
        for value in values {
            self.binds.push(value.clone());
            let n = self.binds.len();
            for column in columns {
                self.sql.push_str(&format!(" OR {column} = ${n}"));
            }
        }
        self.sql.push(')');
    }

    /// Only the records meeting `always` (SQL without parameters), or, for any
    /// `(column, values)` of `alternatives`, with one of `values` in `column`.
    pub(super) fn either(&mut self, always: &str, alternatives: &[(&str, &[String])]) {
        self.sql.push_str(&format!(" AND ({always}"));
        for (column, values) in alternatives {
            for value in *values {
                self.binds.push(value.clone());
                self.sql.push_str(&format!(" OR {column} = ${}", self.binds.len()));
            }
        }
        self.sql.push(')');
    }

    /// Only the records meeting `condition`, SQL without parameters.
    pub(super) fn only(&mut self, condition: &str) {
        self.sql.push_str(&format!(" AND {condition}"));
    }

    /// The records after `after` (when given) and then after the first `skip`, at most
    /// `limit` of them, in creation order, stopping early before the first record whose
    /// document would bring the page's documents past `max_bytes` (the first record is
    /// always taken). Rows are streamed, so at most one record past the page is read.
    pub(super) async fn page<'c, T: Document, E: Executor<'c, Database = Any>>(
        mut self,
        executor: E,
        window: Window<'_>,
    ) -> Result<Listed<T>, StoreError> {
        use futures::TryStreamExt as _;
        let mut after_created_at = None;
        if let Some(after) = window.after {
            // (created_at, id) > (after.created_at, after.id), spelt out for SQLite and
            // PostgreSQL alike.
            self.binds.push(after.id.clone());
            let id = self.binds.len();
            let at = id + 1;
            self.sql.push_str(&format!(
                " AND (created_at > ${at} OR (created_at = ${at} AND id > ${id}))"
            ));
            after_created_at = Some(after.created_at);
        }
        let n = self.binds.len() + usize::from(after_created_at.is_some());
        self.sql.push_str(&format!(" ORDER BY created_at, id LIMIT ${} OFFSET ${}", n + 1, n + 2));
        let mut query = sqlx::query(&self.sql);
        for bind in self.binds {
            query = query.bind(bind);
        }
        if let Some(created_at) = after_created_at {
            query = query.bind(created_at);
        }
        let count = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        // One more than the page, to tell whether there is a next one.
        let fetch = window.limit.map_or(i64::MAX, |limit| count(limit).saturating_add(1));
        let mut rows = query.bind(fetch).bind(count(window.skip)).fetch(executor);
        let mut listed = Listed { items: Vec::new(), more: false, last: None };
        let mut bytes = 0usize;
        while let Some(row) = rows.try_next().await? {
            let full = window.limit.is_some_and(|limit| listed.items.len() as u64 >= limit);
            let size = row.try_get::<&str, _>("doc").map_or(0, str::len);
            let too_big =
                window.max_bytes.is_some_and(|max| !listed.items.is_empty() && bytes + size > max);
            if full || too_big {
                listed.more = true;
                break;
            }
            bytes += size;
            listed.items.push(from_row(&row)?);
            listed.last =
                Some(PageKey { created_at: row.try_get("created_at")?, id: row.try_get("id")? });
        }
        Ok(listed)
    }
}

/// Where a listed record sits in creation order: lists are ordered by it, and a page
/// can start after one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageKey {
    /// The record's creation time (ms), as stored.
    pub created_at: i64,
    /// Its id, which orders records created in the same millisecond.
    pub id: String,
}

/// Which part of a list to read.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Window<'a> {
    /// Only records after this one.
    pub after: Option<&'a PageKey>,
    /// Then skip this many.
    pub skip: u64,
    /// At most this many.
    pub limit: Option<u64>,
    /// Stop before the documents pass this many bytes (the first is always taken).
    pub max_bytes: Option<usize>,
}

/// One page of records, and whether more follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed<T> {
    /// The records, in creation order.
    pub items: Vec<T>,
    /// Whether records follow this page (it was cut by its size or byte budget).
    pub more: bool,
    /// The key of the page's last record: pass it as `after` for the next page.
    pub last: Option<PageKey>,
}

impl Tx {
    /// Replaces a record whose table keeps `status` and `updated_at` beside the document,
    /// if its stored etag still equals `record`'s; returns it with its new etag.
    pub(super) async fn replace_document<T: Document>(
        &mut self,
        record: &T,
        status: &str,
        updated_when: f64,
    ) -> Result<T, StoreError> {
        let (stored, doc) = with_new_etag(record)?;
        let sql = format!(
            "UPDATE {} SET status = $1, etag = $2, updated_at = $3, doc = $4 WHERE id = $5 AND etag = $6",
            T::TABLE
        );
        let result = sqlx::query(&sql)
            .bind(status.to_owned())
            .bind(stored.etag().to_owned())
            .bind(millis(updated_when))
            .bind(doc)
            .bind(record.id().to_owned())
            .bind(record.etag().to_owned())
            .execute(self.conn())
            .await?;
        if result.rows_affected() == 1 {
            return Ok(stored);
        }
        Err(self.missing_or_changed(T::ENTITY, T::TABLE, record.id()).await)
    }
}
