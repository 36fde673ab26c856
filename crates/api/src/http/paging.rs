//! One paging scheme for every list route: `?limit=&cursor=`, answered with the items
//! and a `nextCursor` while more follow. A cursor is the key of the last record of its
//! page (creation time and id, or a template's name), so the next page starts right
//! after it whatever left the list meanwhile.
//!
//! A page holds at most [`Page::MAX_LIMIT`] items and stops early, with a `nextCursor`,
//! once its records pass [`MAX_PAGE_BYTES`]: a record's size is bounded only by the
//! request body limit and what the processors report back (outputs), so a count alone
//! does not bound a page's bytes. The first record of a page is always answered.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::storage::PageKey;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bounds {
    /// The page starts after this record; `None` for the first page.
    pub after: Option<PageKey>,
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
        let after = match &self.cursor {
            None => None,
            Some(cursor) => Some(
                decode(cursor)
                    .ok_or_else(|| ApiError::bad_request(format!("invalid cursor {cursor:?}")))?,
            ),
        };
        Ok(Bounds { after, limit: limit.min(Self::MAX_LIMIT) })
    }
}

/// The cursor of the page after `last`: its key, `<created_at>.<id>` in URL-safe
/// base64, so that it needs no escaping and clients take it as it is.
fn encode(last: &PageKey) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{}", last.created_at, last.id))
}

/// The key a cursor of [`encode`] holds; `None` for anything else.
fn decode(cursor: &str) -> Option<PageKey> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (created_at, id) = text.split_once('.')?;
    let digits = created_at.strip_prefix('-').unwrap_or(created_at);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
        return None;
    }
    Some(PageKey { created_at: created_at.parse().ok()?, id: id.to_owned() })
}

impl Bounds {
    /// The cursor of the page after this one, whose last record is `last`, when `more`
    /// follow.
    pub(super) fn next_cursor(last: Option<&PageKey>, more: bool) -> Option<String> {
        last.filter(|_| more).map(encode)
    }

    /// This page of `items` (all of them, held in memory, in the order of `key`), cut
    /// like a database page: after the cursor's record, at most `limit`, and no more
    /// than [`MAX_PAGE_BYTES`] of their JSON after the first. Returns the page and its
    /// `nextCursor`.
    pub(super) fn cut<T: Serialize>(
        &self,
        items: Vec<T>,
        key: impl Fn(&T) -> PageKey,
    ) -> (Vec<T>, Option<String>) {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let mut rest = items
            .into_iter()
            .filter(|item| self.after.as_ref().is_none_or(|after| key(item) > *after))
            .peekable();
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
        let cursor = Self::next_cursor(page.last().map(&key).as_ref(), more);
        (page, cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(limit: Option<u64>, cursor: Option<&str>) -> Page {
        Page { limit, cursor: cursor.map(str::to_owned) }
    }

    #[allow(clippy::ptr_arg)] // `cut` hands its key function a `&T`, here `&String`.
    fn key(name: &String) -> PageKey {
        PageKey { created_at: 0, id: name.clone() }
    }

    #[test]
    fn limits_default_and_are_capped() {
        assert_eq!(page(None, None).bounds().unwrap(), Bounds { after: None, limit: 50 });
        assert_eq!(page(Some(10_000), None).bounds().unwrap().limit, Page::MAX_LIMIT);
        assert!(page(Some(0), None).bounds().is_err());
    }

    #[test]
    fn cursors_round_trip_and_only_those_this_service_hands_out_are_taken() {
        let last = PageKey { created_at: 1_764_950_400_123, id: "a.b-c/é".to_owned() };
        let cursor = Bounds::next_cursor(Some(&last), true).unwrap();
        assert!(cursor.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(page(None, Some(&cursor)).bounds().unwrap().after, Some(last.clone()));
        assert_eq!(Bounds::next_cursor(Some(&last), false), None);
        let forged = |text: &str| URL_SAFE_NO_PAD.encode(text);
        for bad in [
            "o7".to_owned(),
            "!!".to_owned(),
            forged("17"),
            forged(".id"),
            forged("1x.id"),
            forged("+1.id"),
            forged("1."),
            forged("99999999999999999999.id"),
        ] {
            assert!(page(None, Some(&bad)).bounds().is_err(), "{bad}");
        }
    }

    #[test]
    fn in_memory_pages_follow_one_another_to_the_end() {
        let items: Vec<String> = ["a", "b", "c", "d", "e"].map(str::to_owned).to_vec();
        let (first, cursor) = page(Some(2), None).bounds().unwrap().cut(items.clone(), key);
        assert_eq!(first, ["a", "b"]);
        let (last, cursor) =
            page(Some(3), cursor.as_deref()).bounds().unwrap().cut(items.clone(), key);
        assert_eq!((last, cursor), (vec!["c".to_owned(), "d".to_owned(), "e".to_owned()], None));
        // A page after a record that is gone starts at the next one.
        let without_b: Vec<String> = ["a", "c"].map(str::to_owned).to_vec();
        let after_b = Bounds { after: Some(key(&"b".to_owned())), limit: 5 };
        assert_eq!(after_b.cut(without_b, key), (vec!["c".to_owned()], None));
    }

    #[test]
    fn in_memory_pages_stop_at_the_byte_budget_but_always_take_one_item() {
        let half = |c: &str| c.repeat(MAX_PAGE_BYTES / 2);
        let items = vec![half("a"), half("b"), half("c")];
        let (first, cursor) = page(Some(10), None).bounds().unwrap().cut(items.clone(), key);
        assert_eq!(first.len(), 1, "two halves and their quotes are past the budget");
        let (second, _) = page(Some(10), cursor.as_deref()).bounds().unwrap().cut(items, key);
        assert_eq!(second, [half("b")]);
        let huge = vec!["y".repeat(MAX_PAGE_BYTES + 1)];
        let (only, cursor) = page(None, None).bounds().unwrap().cut(huge, key);
        assert_eq!((only.len(), cursor), (1, None));
    }
}
