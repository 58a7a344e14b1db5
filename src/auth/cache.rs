//! Introspection answers cached per token, so the control plane is off the hot path.
//!
//! Keyed by the token's SHA-256 (the token itself is never stored). A positive answer is served
//! as is while younger than `fresh` (10 min); after that it is still served, and the request
//! that notices starts one background revalidation. It is never served past `max_age` (25 min)
//! nor past the token's `exp`. Negative answers (inactive, or active without grants) live
//! `negative_ttl` (5 s). Concurrent misses for one token share one backend call. When the
//! backend fails, a token is not asked about again for a second (`PROBE_INTERVAL`), and only
//! answers younger than `max_age` keep serving; everything else is "unavailable".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;

use super::Token;
use super::introspection::{Introspected, IntrospectionClient, unix_now};

/// After a failed call, the next call about the same token waits this long.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Cache lifetimes and size.
#[derive(Clone, Copy, Debug)]
pub struct CacheSettings {
    pub fresh: Duration,
    pub max_age: Duration,
    pub negative_ttl: Duration,
    pub capacity: u64,
}

/// What the cache knows about a token.
pub enum Lookup {
    Known(Introspected),
    /// The backend cannot be asked and no usable answer is cached.
    Unavailable,
}

struct Entry {
    answer: Introspected,
    fetched: Instant,
    /// When this entry stops being usable at all.
    expires: Instant,
    revalidating: AtomicBool,
}

impl Entry {
    fn new(answer: Introspected, settings: &CacheSettings) -> Entry {
        let fetched = Instant::now();
        let lifetime = match &answer {
            Introspected::Active {
                grants: Some(_),
                exp,
                ..
            } => {
                let until_exp = exp.map(|exp| Duration::from_secs(exp.saturating_sub(unix_now())));
                until_exp.map_or(settings.max_age, |d| d.min(settings.max_age))
            }
            _ => settings.negative_ttl,
        };
        Entry {
            answer,
            fetched,
            expires: fetched + lifetime,
            revalidating: AtomicBool::new(false),
        }
    }

    fn is_positive(&self) -> bool {
        matches!(
            self.answer,
            Introspected::Active {
                grants: Some(_),
                ..
            }
        )
    }
}

/// Entries leave the cache when they stop being usable.
struct UntilUnusable;

impl Expiry<[u8; 32], Arc<Entry>> for UntilUnusable {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        entry: &Arc<Entry>,
        now: Instant,
    ) -> Option<Duration> {
        Some(entry.expires.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        entry: &Arc<Entry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires.saturating_duration_since(now))
    }
}

type TokenCacheBuilder<V> =
    moka::future::CacheBuilder<[u8; 32], V, moka::future::Cache<[u8; 32], V>>;

/// A cache of at most `capacity` tokens that evicts the least recently used one, as `auth.md`
/// says. moka's default policy (TinyLFU) may instead refuse a new token a place while the
/// cache is full of tokens used more often, and every request with it would ask the control
/// plane (and get no grace period when it is down).
fn least_recently_used<V: Clone + Send + Sync + 'static>(capacity: u64) -> TokenCacheBuilder<V> {
    moka::future::Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
}

/// The decision cache in front of an [`IntrospectionClient`]; cheap to clone.
#[derive(Clone)]
pub struct DecisionCache {
    entries: moka::future::Cache<[u8; 32], Arc<Entry>>,
    /// Tokens whose last backend call failed less than `PROBE_INTERVAL` ago.
    failed: moka::future::Cache<[u8; 32], ()>,
    client: Arc<IntrospectionClient>,
    settings: CacheSettings,
}

impl DecisionCache {
    pub fn new(client: IntrospectionClient, settings: CacheSettings) -> DecisionCache {
        DecisionCache {
            entries: least_recently_used(settings.capacity)
                .expire_after(UntilUnusable)
                .build(),
            failed: least_recently_used(settings.capacity)
                .time_to_live(PROBE_INTERVAL)
                .build(),
            client: Arc::new(client),
            settings,
        }
    }

    /// The answer for `token`: cached when possible, otherwise asked (once for all concurrent
    /// askers).
    pub async fn lookup(&self, token: &Token, request_id: Option<&str>) -> Lookup {
        let key = token.sha256();
        let cached = self.entries.get(&key).await;
        if let Some(entry) = cached.filter(|entry| Instant::now() < entry.expires) {
            let stale = entry.is_positive() && entry.fetched.elapsed() >= self.settings.fresh;
            if stale {
                self.revalidate(key, token, &entry, request_id).await;
            }
            count(if stale { "stale" } else { "hit" });
            return Lookup::Known(entry.answer.clone());
        }
        count("miss");
        if self.failed.contains_key(&key) {
            return Lookup::Unavailable;
        }
        let fetch = async {
            self.client
                .introspect(token, request_id)
                .await
                .map(|answer| Arc::new(Entry::new(answer, &self.settings)))
        };
        match self.entries.try_get_with(key, fetch).await {
            Ok(entry) => Lookup::Known(entry.answer.clone()),
            Err(_) => {
                self.failed.insert(key, ()).await;
                Lookup::Unavailable
            }
        }
    }

    /// A newer answer for `token`, for a request its cached answer does not allow: auth.md
    /// caches "no grant" for `negative_ttl` only, so a grant added to the token since then
    /// counts. `None` (the cached answer stands) while that answer is younger than
    /// `negative_ttl`, while another call for this entry is underway, or when the backend failed
    /// for this token within the last second; a failure keeps the cached answer, which still
    /// allows what it allowed. A fresh answer replaces the cached one, so a client that keeps
    /// asking for a project it has no grant for costs one backend call per `negative_ttl`.
    pub async fn lookup_again(
        &self,
        token: &Token,
        request_id: Option<&str>,
    ) -> Option<Introspected> {
        let key = token.sha256();
        let entry = self.entries.get(&key).await?;
        if entry.fetched.elapsed() < self.settings.negative_ttl
            || self.failed.contains_key(&key)
            || entry.revalidating.swap(true, Ordering::SeqCst)
        {
            return None;
        }
        self.refetch(key, token, entry, request_id)
            .await
            .ok()
            .flatten()
    }

    /// Starts one background revalidation of a stale positive entry, unless one is running or
    /// the backend failed for this token within the last second.
    async fn revalidate(
        &self,
        key: [u8; 32],
        token: &Token,
        entry: &Arc<Entry>,
        request_id: Option<&str>,
    ) {
        if self.failed.contains_key(&key) || entry.revalidating.swap(true, Ordering::SeqCst) {
            return;
        }
        // In the background: the request is answered from the stale entry meanwhile.
        drop(self.refetch(key, token, entry.clone(), request_id));
    }

    /// Asks the backend again for `token` on a task of its own, for the caller of `entry` that
    /// set its `revalidating` flag. A fresh answer replaces the entry; a failure is remembered
    /// for a second and clears the flag. On its own task so that it finishes even when the
    /// request that asked is dropped: a flag left set would stop every later call for this
    /// entry, revalidation included, until it expires.
    fn refetch(
        &self,
        key: [u8; 32],
        token: &Token,
        entry: Arc<Entry>,
        request_id: Option<&str>,
    ) -> tokio::task::JoinHandle<Option<Introspected>> {
        let (cache, token) = (self.clone(), token.clone());
        let request_id = request_id.map(str::to_owned);
        tokio::spawn(async move {
            match cache.client.introspect(&token, request_id.as_deref()).await {
                Ok(answer) => {
                    let fresh = Arc::new(Entry::new(answer.clone(), &cache.settings));
                    cache.entries.insert(key, fresh).await;
                    Some(answer)
                }
                Err(_) => {
                    cache.failed.insert(key, ()).await;
                    entry.revalidating.store(false, Ordering::SeqCst);
                    None
                }
            }
        })
    }
}

/// Counts a lookup. The handles are resolved once: this runs on every authorized request.
fn count(result: &'static str) {
    use std::sync::LazyLock;
    static COUNTERS: LazyLock<[(&str, metrics::Counter); 3]> = LazyLock::new(|| {
        ["hit", "stale", "miss"].map(|r| {
            (
                r,
                metrics::counter!(crate::metrics::AUTH_CACHE_TOTAL, "result" => r),
            )
        })
    });
    if let Some((_, counter)) = COUNTERS.iter().find(|(r, _)| *r == result) {
        counter.increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_cache_takes_a_new_token_in_place_of_the_least_recently_used() {
        let cache = least_recently_used::<()>(2).build();
        let (old, busy, new) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        cache.insert(old, ()).await;
        cache.insert(busy, ()).await;
        // Used often: frequency is what TinyLFU would keep it (and `old`) for.
        for _ in 0..20 {
            assert!(cache.get(&busy).await.is_some());
            assert!(cache.get(&old).await.is_some());
        }
        assert!(cache.get(&busy).await.is_some());
        cache.run_pending_tasks().await;
        cache.insert(new, ()).await;
        cache.run_pending_tasks().await;
        assert!(
            cache.get(&new).await.is_some(),
            "the newest token is cached"
        );
        assert!(cache.get(&busy).await.is_some());
        assert!(
            cache.get(&old).await.is_none(),
            "the least recently used went"
        );
    }
}
