//! Which models each account may use. A model with no rule is open to everyone; a restricted
//! one only to the accounts its rule names and the members of the groups it names. A refused
//! model is answered as one that does not exist (404 `model_not_found`), so that nobody learns
//! what they may not use.
//!
//! The rules live in the store; a server holds them compiled (model → the accounts allowed),
//! replaced whole when they change: at once when changed through this server, and on a shared
//! database within a follow interval of a change made elsewhere (`follow`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;
use stipend_ledger::{AccessRules, AccountId, Store, StoreError};

/// The rules, compiled for the question asked on every call.
#[derive(Debug, Default)]
struct Compiled {
    version: i64,
    /// Each restricted model's allowed accounts (groups expanded).
    allowed: HashMap<String, HashSet<AccountId>>,
}

impl Compiled {
    fn of(rules: &AccessRules) -> Compiled {
        let groups: HashMap<&str, &Vec<AccountId>> = rules
            .groups
            .iter()
            .map(|(name, members)| (name.as_str(), members))
            .collect();
        let allowed = rules
            .models
            .iter()
            .map(|rule| {
                let mut accounts: HashSet<AccountId> = rule.accounts.iter().copied().collect();
                for group in &rule.groups {
                    if let Some(members) = groups.get(group.as_str()) {
                        accounts.extend(members.iter().copied());
                    }
                }
                (rule.model.clone(), accounts)
            })
            .collect();
        Compiled {
            version: rules.version,
            allowed,
        }
    }
}

/// Which models each account may use, as the store says.
pub struct Access {
    store: Arc<dyn Store>,
    compiled: RwLock<Arc<Compiled>>,
}

impl Access {
    /// The rules in `store` now.
    pub fn load(store: Arc<dyn Store>) -> Result<Access, StoreError> {
        let compiled = Compiled::of(&store.access_rules()?);
        Ok(Access {
            store,
            compiled: RwLock::new(Arc::new(compiled)),
        })
    }

    /// Whether `account` may use `model`.
    pub fn allows(&self, model: &str, account: AccountId) -> bool {
        let compiled = Arc::clone(&self.compiled.read());
        compiled
            .allowed
            .get(model)
            .is_none_or(|accounts| accounts.contains(&account))
    }

    /// Reads the rules again, now (after a change made through this server).
    pub fn reload(&self) -> Result<(), StoreError> {
        let compiled = Compiled::of(&self.store.access_rules()?);
        *self.compiled.write() = Arc::new(compiled);
        Ok(())
    }

    /// Reads the rules again if they changed since they were read (one small query when they
    /// did not): how servers sharing a database follow changes made elsewhere.
    pub fn follow(&self) -> Result<(), StoreError> {
        let version = self.store.access_version()?;
        if version != self.compiled.read().version {
            self.reload()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stipend_ledger::ModelAccess;

    #[test]
    fn a_rule_names_accounts_and_groups_and_other_models_stay_open() {
        let rules = AccessRules {
            models: vec![ModelAccess {
                model: "big".to_string(),
                accounts: vec![AccountId(1)],
                groups: vec!["staff".to_string(), "nobody-yet".to_string()],
            }],
            groups: vec![("staff".to_string(), vec![AccountId(2), AccountId(3)])],
            version: 4,
        };
        let compiled = Compiled::of(&rules);
        let allowed = &compiled.allowed["big"];
        assert_eq!(allowed.len(), 3);
        for id in [1, 2, 3] {
            assert!(allowed.contains(&AccountId(id)));
        }
        assert!(!allowed.contains(&AccountId(4)));
        assert!(!compiled.allowed.contains_key("small"));
    }
}
