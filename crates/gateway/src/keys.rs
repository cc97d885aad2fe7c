//! API keys: `sk-stipend-<id>-<secret>`. The id is public (it names the key in listings and
//! revocations); the secret is 256 random bits, shown once, stored only as its SHA-256, and
//! compared in constant time.

use crate::limits::{KEY_CACHE_MAX, UNKNOWN_KEYS_MAX};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use stipend_ledger::{AccountId, KeyRecord, Store, StoreError};
use subtle::ConstantTimeEq;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk-stipend-";
const ID_HEX_LEN: usize = 16;
const SECRET_HEX_LEN: usize = 64;

/// A new key, before it is stored: the only moment its secret exists in full.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The full key, to give to its person once.
    pub key: String,
    /// What is stored.
    pub record: KeyRecord,
}

fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer)?;
    Ok(buffer.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Makes a new key for an account.
pub fn generate(account: AccountId, now_ms: i64) -> Result<NewKey, StoreError> {
    let random_failed = |error: getrandom::Error| StoreError::Io(format!("no randomness: {error}"));
    let id = random_hex(ID_HEX_LEN / 2).map_err(random_failed)?;
    let secret = random_hex(SECRET_HEX_LEN / 2).map_err(random_failed)?;
    Ok(NewKey {
        key: format!("{KEY_PREFIX}{id}-{secret}"),
        record: KeyRecord {
            id,
            account,
            secret_sha256: sha256(&secret),
            created_at_ms: now_ms,
            revoked_at_ms: None,
            cap: None,
            name: None,
        },
    })
}

/// Splits a presented key into its id and secret, if it is shaped like one of ours.
pub fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    let hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|byte| byte.is_ascii_hexdigit())
    };
    (hex(id, ID_HEX_LEN) && hex(secret, SECRET_HEX_LEN)).then_some((id, secret))
}

/// Why a key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// No key was presented.
    #[error("no API key was given; send it as `Authorization: Bearer sk-stipend-…`")]
    Missing,
    /// The key is not one of ours, or its secret is wrong.
    #[error("the API key is not valid")]
    Invalid,
    /// The key was revoked.
    #[error("the API key was revoked")]
    Revoked,
    /// An operator key, which opens the operator's page and API, not model calls nor a
    /// person's page.
    #[error(
        "this is an operator key: it opens the operator's page (/admin), not model calls; \
         use a person's key"
    )]
    Operator,
    /// The key store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The keys a running server knows: read through from the store, cached, and changed in place
/// when a key is created or revoked, so a revocation takes effect on the next request.
///
/// Ids the store does not know are remembered too, so that a flood of made-up keys costs a
/// hash lookup each rather than a store read on the request's thread. That is sound because
/// while a server runs, keys are created only through its ring (the CLI's `key create` goes
/// through the server's control socket), and `create` forgets the new id there.
#[derive(Clone)]
pub struct KeyRing {
    store: Arc<dyn Store>,
    /// The account whose keys are operator keys: the issuer's.
    operator: AccountId,
    cache: Arc<RwLock<HashMap<String, Arc<KeyRecord>>>>,
    unknown: Arc<RwLock<HashSet<String>>>,
}

impl KeyRing {
    /// A key ring over a store. Keys of `operator` (the issuer's account, which holds no
    /// grants and makes no calls) are operator keys: they open the operator's page and API and
    /// nothing else, and no other key opens those.
    pub fn new(store: Arc<dyn Store>, operator: AccountId) -> KeyRing {
        KeyRing {
            store,
            operator,
            cache: Arc::new(RwLock::new(HashMap::new())),
            unknown: Arc::new(RwLock::new(HashSet::new())),
        }
    }

    /// Checks a presented key; returns its account.
    pub fn authenticate(&self, presented: &str) -> Result<AccountId, KeyError> {
        self.authenticate_key(presented)
            .map(|record| record.account)
    }

    /// Checks a presented key; returns its record (its account, and its cap if it has one).
    pub fn authenticate_key(&self, presented: &str) -> Result<Arc<KeyRecord>, KeyError> {
        let (id, secret) = parse(presented).ok_or(KeyError::Invalid)?;
        let record = self.record(id)?;
        // Constant time: how much of a guess matched must not show in how long the check took.
        if !bool::from(sha256(secret).ct_eq(&record.secret_sha256)) {
            return Err(KeyError::Invalid);
        }
        if record.revoked_at_ms.is_some() {
            return Err(KeyError::Revoked);
        }
        if record.account == self.operator {
            return Err(KeyError::Operator);
        }
        Ok(record)
    }

    /// Forgets what this ring remembers of a key, so that its next use reads it again (after
    /// its cap was changed).
    pub fn forget(&self, id: &str) {
        self.cache.write().remove(id);
    }

    /// The store the keys live in.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The account whose keys are operator keys.
    pub fn operator(&self) -> AccountId {
        self.operator
    }

    /// Checks a presented operator key: valid, not revoked, and the operator's (a person's key
    /// is `Invalid` here).
    pub fn authenticate_operator(&self, presented: &str) -> Result<(), KeyError> {
        let (id, secret) = parse(presented).ok_or(KeyError::Invalid)?;
        let record = self.record(id)?;
        if !bool::from(sha256(secret).ct_eq(&record.secret_sha256)) {
            return Err(KeyError::Invalid);
        }
        if record.account != self.operator {
            return Err(KeyError::Invalid);
        }
        if record.revoked_at_ms.is_some() {
            return Err(KeyError::Revoked);
        }
        Ok(())
    }

    /// Whether the operator key named by its id still stands (an operator's web session checks
    /// it at each request).
    pub fn operator_key(&self, id: &str) -> Result<(), KeyError> {
        let record = self.record(id)?;
        if record.account != self.operator {
            return Err(KeyError::Invalid);
        }
        if record.revoked_at_ms.is_some() {
            return Err(KeyError::Revoked);
        }
        Ok(())
    }

    /// The account of a key named by its id alone, while the key is not revoked: how a web
    /// session, opened with the whole key, checks at each request that the key still stands
    /// (revoking the key ends its sessions).
    pub fn account_of(&self, id: &str) -> Result<AccountId, KeyError> {
        let record = self.record(id)?;
        if record.revoked_at_ms.is_some() {
            return Err(KeyError::Revoked);
        }
        if record.account == self.operator {
            return Err(KeyError::Operator);
        }
        Ok(record.account)
    }

    /// A key's record, from the cache or else the store.
    fn record(&self, id: &str) -> Result<Arc<KeyRecord>, KeyError> {
        if let Some(record) = self.cache.read().get(id).cloned() {
            return Ok(record);
        }
        if self.unknown.read().contains(id) {
            return Err(KeyError::Invalid);
        }
        let Some(record) = self.store.key(id)? else {
            let mut unknown = self.unknown.write();
            if unknown.len() >= UNKNOWN_KEYS_MAX {
                unknown.clear();
            }
            unknown.insert(id.to_string());
            return Err(KeyError::Invalid);
        };
        let record = Arc::new(record);
        let mut cache = self.cache.write();
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(id.to_string(), Arc::clone(&record));
        Ok(record)
    }

    /// Creates and stores a new key for an account.
    pub fn create(&self, account: AccountId, now_ms: i64) -> Result<NewKey, StoreError> {
        self.create_named(account, None, now_ms)
    }

    /// Creates and stores a new key for an account, with the name its person gave it.
    pub fn create_named(
        &self,
        account: AccountId,
        name: Option<String>,
        now_ms: i64,
    ) -> Result<NewKey, StoreError> {
        let mut new = generate(account, now_ms)?;
        new.record.name = name;
        self.store.insert_key(&new.record)?;
        self.unknown.write().remove(&new.record.id);
        Ok(new)
    }

    /// Revokes a key, in the store and at once in this ring. Returns false if it does not exist.
    pub fn revoke(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let found = self.store.revoke_key(id, now_ms)?;
        if found {
            self.cache.write().remove(id);
        }
        Ok(found)
    }

    /// The keys of an account.
    pub fn list(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
        self.store.keys_of(account)
    }

    /// Forgets what this ring remembers of the keys created or revoked elsewhere since `since`
    /// (see [`Store::keys_changed_since`]), so that the next use reads them again; returns the
    /// position to follow from. On a database that several servers share, each server calls it
    /// every [`KEYS_FOLLOW_INTERVAL`](crate::limits::KEYS_FOLLOW_INTERVAL).
    pub fn follow(&self, since: Option<i64>) -> Result<i64, StoreError> {
        let (changed, next) = self.store.keys_changed_since(since)?;
        if !changed.is_empty() {
            let mut cache = self.cache.write();
            let mut unknown = self.unknown.write();
            for id in &changed {
                cache.remove(id);
                unknown.remove(id);
            }
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ids_are_remembered_and_a_created_key_works_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            stipend_store_sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        );
        let keys = KeyRing::new(Arc::clone(&store), AccountId(1));
        let made_up = generate(AccountId(7), 1).unwrap();
        assert_eq!(keys.authenticate(&made_up.key), Err(KeyError::Invalid));
        // Written behind the ring's back (which a running server never does): the ring still
        // says unknown, without reading the store; a new ring (a restart) reads it.
        store.insert_key(&made_up.record).unwrap();
        assert_eq!(keys.authenticate(&made_up.key), Err(KeyError::Invalid));
        assert_eq!(
            KeyRing::new(Arc::clone(&store), AccountId(1)).authenticate(&made_up.key),
            Ok(AccountId(7))
        );
        // Created through the ring: works at once, and keeps working from the cache.
        let new = keys.create(AccountId(8), 2).unwrap();
        assert_eq!(keys.authenticate(&new.key), Ok(AccountId(8)));
        assert_eq!(keys.authenticate(&new.key), Ok(AccountId(8)));
        // A wrong secret for a known id is refused; revoking works at once.
        let (id, _) = parse(&new.key).unwrap();
        let forged = format!("{KEY_PREFIX}{id}-{}", "0".repeat(SECRET_HEX_LEN));
        assert_eq!(keys.authenticate(&forged), Err(KeyError::Invalid));
        assert!(keys.revoke(id, 3).unwrap());
        assert_eq!(keys.authenticate(&new.key), Err(KeyError::Revoked));
    }

    #[test]
    fn operator_keys_open_only_what_is_the_operators() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            stipend_store_sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        );
        let operator = AccountId(1);
        let keys = KeyRing::new(Arc::clone(&store), operator);
        let admin = keys.create(operator, 1).unwrap();
        let person = keys.create(AccountId(9), 1).unwrap();
        let (admin_id, _) = parse(&admin.key).unwrap();
        let (person_id, _) = parse(&person.key).unwrap();
        // An operator key makes no calls and opens no person's page.
        assert_eq!(keys.authenticate(&admin.key), Err(KeyError::Operator));
        assert_eq!(keys.account_of(admin_id), Err(KeyError::Operator));
        assert_eq!(keys.authenticate_operator(&admin.key), Ok(()));
        assert_eq!(keys.operator_key(admin_id), Ok(()));
        // A person's key never opens the operator's page.
        assert_eq!(keys.authenticate(&person.key), Ok(AccountId(9)));
        assert_eq!(
            keys.authenticate_operator(&person.key),
            Err(KeyError::Invalid)
        );
        assert_eq!(keys.operator_key(person_id), Err(KeyError::Invalid));
        // Nor does a forged or revoked operator key.
        let forged = format!("{KEY_PREFIX}{admin_id}-{}", "0".repeat(SECRET_HEX_LEN));
        assert_eq!(keys.authenticate_operator(&forged), Err(KeyError::Invalid));
        assert!(keys.revoke(admin_id, 2).unwrap());
        assert_eq!(
            keys.authenticate_operator(&admin.key),
            Err(KeyError::Revoked)
        );
        assert_eq!(keys.operator_key(admin_id), Err(KeyError::Revoked));
    }

    #[test]
    fn keys_parse_only_in_our_shape() {
        let new = generate(AccountId(3), 1).unwrap();
        let (id, secret) = parse(&new.key).unwrap();
        assert_eq!(id, new.record.id);
        assert_eq!(sha256(secret), new.record.secret_sha256);
        assert!(!new.key.contains(&format!("{:?}", new.record.secret_sha256)));
        for bad in [
            "",
            "sk-other",
            "sk-stipend-",
            "sk-stipend-0123456789abcdef",
            "sk-stipend-0123456789abcdef-zz",
            &format!("sk-stipend-0123456789abcdeg-{}", "a".repeat(64)),
            &format!("sk-stipend-0123456789abcdef-{}", "a".repeat(63)),
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_ne!(generate(AccountId(3), 1).unwrap().key, new.key);
    }
}
