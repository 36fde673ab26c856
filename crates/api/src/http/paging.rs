//! One paging scheme for every list route: `?limit=&cursor=`, answered with the items
//! and a `nextCursor` while more follow.
//!
//! A page holds at most [`Page::MAX_LIMIT`] items and stops early, with a `nextCursor`,
//! once its records pass [`MAX_PAGE_BYTES`]: a record's size is bounded only by the
//! request body limit and what the processors report back (outputs), so a count alone
//! does not bound a page's bytes. The first record of a page is always answered.

use serde::{Deserialize, Serialize};

use super::error::ApiError;

/// The most bytes of records one page answers (4 MiB), besides its first record.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// The most items one page answers; a larger `limit` is lowered to it.
pub const MAX_PAGE_SIZE: u64 = 500;

/// `?limit=&cursor=` on list routes.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct Page {
    /// At most this many items (default 50, at most 500; a larger limit is lowered to
    /// 500). A page may hold fewer, and still have a `nextCursor`, when its items are
    /// large (4 MiB per page).
    pub limit: Option<u64>,
    /// Where to continue: the `nextCursor` of the previous page, as it was given.
    pub cursor: Option<String>,
}

/// Where a page starts and how long it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounds {
    /// Items before this page.
    pub offset: u64,
    /// The most items on this page.
    pub limit: u64,
}

impl Page {
    /// The default page size.
    pub(super) const DEFAULT_LIMIT: u64 = 50;
    /// The largest page size.
    pub(super) const MAX_LIMIT: u64 = MAX_PAGE_SIZE;

    /// Where this page starts and how long it may be.
    ///
    /// # Errors
    ///
    /// A cursor this service did not hand out, or a zero limit.
    pub(super) fn bounds(&self) -> Result<Bounds, ApiError> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        if limit == 0 {
            return Err(ApiError::bad_request("limit must be at least 1"));
        }
        let offset = match &self.cursor {
            None => 0,
            Some(cursor) => cursor
                .strip_prefix("o")
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| ApiError::bad_request(format!("invalid cursor {cursor:?}")))?,
        };
        Ok(Bounds { offset, limit: limit.min(Self::MAX_LIMIT) })
    }
}

impl Bounds {
    /// The cursor of the page after one of `returned` items starting here, when `more`
    /// follow.
    pub(super) fn next_cursor(self, returned: usize, more: bool) -> Option<String> {
        more.then(|| format!("o{}", self.offset.saturating_add(returned as u64)))
    }

    /// This page of `items` (all of them, in order, held in memory), cut like a
    /// database page: at most `limit`, and no more than [`MAX_PAGE_BYTES`] of their
    /// JSON after the first. Returns the page and its `nextCursor`.
    pub(super) fn cut<T: Serialize>(self, items: Vec<T>) -> (Vec<T>, Option<String>) {
        let skip = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let mut rest = items.into_iter().skip(skip).peekable();
        let mut page = Vec::new();
        let mut bytes = 0usize;
        while let Some(item) = rest.peek() {
            let size = serde_json::to_vec(item).map_or(0, |json| json.len());
            if page.len() >= limit || (!page.is_empty() && bytes + size > MAX_PAGE_BYTES) {
                break;
            }
            bytes += size;
            page.extend(rest.next());
        }
        let more = rest.peek().is_some();
        let cursor = self.next_cursor(page.len(), more);
        (page, cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(limit: Option<u64>, cursor: Option<&str>) -> Page {
        Page { limit, cursor: cursor.map(str::to_owned) }
    }

    #[test]
    fn limits_default_and_are_capped() {
        assert_eq!(page(None, None).bounds().unwrap(), Bounds { offset: 0, limit: 50 });
        assert_eq!(page(Some(10_000), None).bounds().unwrap().limit, Page::MAX_LIMIT);
        assert!(page(Some(0), None).bounds().is_err());
    }

    #[test]
    fn only_cursors_this_service_hands_out_are_taken() {
        assert_eq!(page(None, Some("o7")).bounds().unwrap().offset, 7);
        for bad in ["7", "o", "o-1", "o+1", "x7", "o1.5"] {
            assert!(page(None, Some(bad)).bounds().is_err(), "{bad}");
        }
    }

    #[test]
    fn in_memory_pages_follow_one_another_to_the_end() {
        let items: Vec<u32> = (0..5).collect();
        let first = page(Some(2), None).bounds().unwrap().cut(items.clone());
        assert_eq!(first, (vec![0, 1], Some("o2".to_owned())));
        let last = page(Some(3), Some("o2")).bounds().unwrap().cut(items.clone());
        assert_eq!(last, (vec![2, 3, 4], None));
        let past = page(Some(3), Some("o9")).bounds().unwrap().cut(items);
        assert_eq!(past, (vec![], None));
    }

    #[test]
    fn in_memory_pages_stop_at_the_byte_budget_but_always_take_one_item() {
        let big = "x".repeat(MAX_PAGE_BYTES / 2);
        let items = vec![big.clone(), big.clone(), big.clone()];
        let (first, cursor) = page(Some(10), None).bounds().unwrap().cut(items.clone());
        assert_eq!(first.len(), 1, "two halves and their quotes are past the budget");
        assert_eq!(cursor.as_deref(), Some("o1"));
        let huge = vec!["y".repeat(MAX_PAGE_BYTES + 1)];
        let (only, cursor) = page(None, None).bounds().unwrap().cut(huge);
        assert_eq!((only.len(), cursor), (1, None));
    }
}
